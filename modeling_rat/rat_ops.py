"""PyTorch computations of the RAT token mixer: a plain reference and a fast vectorised path.

Notation (see the SPEC of the model): B batch, T tokens, D hidden size, H heads of size d, G key/query groups,
L chunk size. Every function here takes the mixer's projections already computed (the model owns the `nn.Linear`
layers, so LoRA and other adapters always act on what reaches these functions).

* `chunk_scan` / `ChunkScan`: the intra-chunk gated recurrence `h_l = f_l * h_{l-1} + u_l`, vectorised over all
  chunks, with a hand-written backward (a reverse scan) so that autograd stores only the gates and the states.
* `linear_recurrence`: the same recurrence over whole sequences (the `rnn` layer), as two levels of chunk scans.
* `chunk_attention`: the inter-chunk softmax of every token over the summaries of earlier chunks plus its own
  running summary, as ONE call of `scaled_dot_product_attention` (see its docstring for how the per-token term is
  folded in). Memory stays O(T * (T / L) / block) and the backward never materialises the T x T/L score matrix.

Each fast function has a plain reference beside it (`*_reference`), the obviously correct version it is tested
against; `rat_backends.py` groups them into the "reference" and "fast" backends. The layout helpers that arrange
tokens of padded or packed batches on a grid of chunks live in `rat_layout.py`.
"""

import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------------- rotary


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1], with x1, x2 the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin of angle `position * theta**(-2i/d)`, duplicated over both halves: shape `positions.shape + (d,)`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (..., d) by angles given as cos/sin broadcastable to it ("rotate_half" convention)."""
    return x * cos + rotate_half(x) * sin


def tile_groups(x: torch.Tensor, num_groups: int, num_heads: int) -> torch.Tensor:
    """(..., G*d) -> (..., H*d) by tiling the G groups H/G times: head h reads group h % G (official layout)."""
    return x.repeat(*([1] * (x.dim() - 1)), num_heads // num_groups)


# ------------------------------------------------------------------------------------------------ chunk scan


def chunk_scan_reference(gates: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None = None):
    """
    `h[:, c, l] = gates[:, c, l] * h[:, c, l-1] + inputs[:, c, l]`, each chunk c starting from zero, except chunk 0
    which starts from `initial_state` when given. gates: (N, C, L, F); inputs: (N, C, L, S, F) (S streams sharing
    the gates); initial_state: (N, S, F). Plain autograd, for tests.
    """
    states = []
    previous = torch.zeros_like(inputs[:, :, 0])
    if initial_state is not None:
        previous = torch.cat([initial_state.unsqueeze(1), previous[:, 1:]], dim=1)
    for index in range(gates.shape[2]):
        previous = gates[:, :, index].unsqueeze(-2) * previous + inputs[:, :, index]
        states.append(previous)
    return torch.stack(states, dim=2)


def gated_chunk_scan_reference(gates, value, key, initial_state=None):
    """`gated_chunk_scan` written plainly: the inputs (1 - f) * [v, k tiled] formed, then `chunk_scan_reference`."""
    dtype = torch.promote_types(value.dtype, torch.float32)
    gates, value, key = gates.to(dtype), value.to(dtype), key.to(dtype)
    copies = value.shape[-1] // key.shape[-1]
    inputs = torch.stack([(1 - gates) * value, (1 - gates) * key.repeat(*([1] * (key.dim() - 1)), copies)], dim=-2)
    return chunk_scan_reference(gates, inputs, None if initial_state is None else initial_state.to(dtype))


def linear_recurrence_reference(gates, inputs, initial_state=None):
    """`linear_recurrence` written plainly: one step per token along dim 1."""
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    state = torch.zeros_like(inputs[:, 0], dtype=dtype) if initial_state is None else initial_state.to(dtype)
    states = []
    for index in range(gates.shape[1]):
        state = gates[:, index].to(dtype).unsqueeze(-2) * state + inputs[:, index].to(dtype)
        states.append(state)
    return torch.stack(states, dim=1)


def _scan_forward(gates, inputs, initial_state):
    """h[:, c, l] = gates[:, c, l] * h[:, c, l-1] + inputs[:, c, l], written in place step by step."""
    states = torch.empty_like(inputs)
    states[:, :, 0] = inputs[:, :, 0]
    if initial_state is not None:
        states[:, 0, 0] += gates[:, 0, 0].unsqueeze(-2) * initial_state
    for index in range(1, gates.shape[2]):
        torch.addcmul(inputs[:, :, index], gates[:, :, index].unsqueeze(-2), states[:, :, index - 1], out=states[:, :, index])
    return states


def _scan_backward(gates, states, initial_state, grad_states):
    """Reverse scan: (gradient reaching each state = gradient of the inputs, gradient of the gates, of the initial state)."""
    chunk_size = gates.shape[2]
    grad_inputs = torch.empty_like(grad_states)
    grad_gates = torch.empty_like(gates)
    grad_inputs[:, :, chunk_size - 1] = grad_states[:, :, chunk_size - 1]
    for index in range(chunk_size - 2, -1, -1):
        torch.addcmul(
            grad_states[:, :, index], gates[:, :, index + 1].unsqueeze(-2), grad_inputs[:, :, index + 1],
            out=grad_inputs[:, :, index],
        )
    if chunk_size > 1:
        torch.sum(grad_inputs[:, :, 1:] * states[:, :, :-1], dim=-2, out=grad_gates[:, :, 1:])
    grad_gates[:, :, 0] = 0
    grad_initial = None
    if initial_state is not None:
        grad_gates[:, 0, 0] = (grad_inputs[:, 0, 0] * initial_state).sum(-2)
        grad_initial = gates[:, 0, 0].unsqueeze(-2) * grad_inputs[:, 0, 0]
    return grad_inputs, grad_gates, grad_initial


class ChunkScan(torch.autograd.Function):
    """`chunk_scan_reference` with a reverse-scan backward: saves only the gates and the states."""

    @staticmethod
    def forward(ctx, gates, inputs, initial_state):
        states = _scan_forward(gates, inputs, initial_state)
        ctx.save_for_backward(gates, states, initial_state)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        gates, states, initial_state = ctx.saved_tensors
        grad_inputs, grad_gates, grad_initial = _scan_backward(gates, states, initial_state, grad_states)
        return grad_gates, grad_inputs, grad_initial if ctx.needs_input_grad[2] else None


class GatedChunkScan(torch.autograd.Function):
    """
    The RAT recurrence from the gate and the raw streams: inputs (1 - f) * [v, k_tiled] are formed inside, so
    autograd keeps only f (already kept by its sigmoid), v, the untiled k and the states, not the gated copies.
    """

    @staticmethod
    def forward(ctx, gates, value, key, initial_state):
        input_gate = 1 - gates
        copies = value.shape[-1] // key.shape[-1]
        inputs = torch.stack([input_gate * value, (input_gate.unflatten(-1, (copies, -1)) * key.unsqueeze(-2)).flatten(-2)], dim=-2)
        del input_gate
        states = _scan_forward(gates, inputs, initial_state)
        ctx.save_for_backward(gates, value, key, states, initial_state)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        gates, value, key, states, initial_state = ctx.saved_tensors
        grad_inputs, grad_gates, grad_initial = _scan_backward(gates, states, initial_state, grad_states)
        grad_value_input, grad_key_input = grad_inputs.unbind(dim=-2)
        copies = value.shape[-1] // key.shape[-1]
        key_tiled_grad = grad_key_input.unflatten(-1, (copies, -1))
        grad_gates -= grad_value_input * value + (key_tiled_grad * key.unsqueeze(-2)).flatten(-2)
        input_gate = 1 - gates
        grad_value = input_gate * grad_value_input
        grad_key = (input_gate.unflatten(-1, (copies, -1)) * key_tiled_grad).sum(-2)
        return grad_gates, grad_value, grad_key, grad_initial if ctx.needs_input_grad[3] else None


def gated_chunk_scan(gates, value, key, initial_state=None):
    """
    States of the RAT recurrence on a grid of chunks: gates (N, C, L, D) the forget gate f; value (N, C, L, D);
    key (N, C, L, G*d), tiled over the heads; returns (N, C, L, 2, D) fp32, [value, key] running sums.
    """
    dtype = torch.promote_types(value.dtype, torch.float32)
    gates, value, key = gates.to(dtype).contiguous(), value.to(dtype).contiguous(), key.to(dtype).contiguous()
    if initial_state is not None:
        initial_state = initial_state.to(dtype).contiguous()
    return GatedChunkScan.apply(gates, value, key, initial_state)


def chunk_scan(gates: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None = None) -> torch.Tensor:
    """See `chunk_scan_reference`; computed by `ChunkScan` in fp32 (or fp64 for fp64 inputs)."""
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    gates = gates.to(dtype).contiguous()
    inputs = inputs.to(dtype).contiguous()
    if initial_state is not None:
        initial_state = initial_state.to(dtype).contiguous()
    return ChunkScan.apply(gates, inputs, initial_state)


def linear_recurrence(
    gates: torch.Tensor, inputs: torch.Tensor, initial_state: torch.Tensor | None = None, block_size: int = 64, scan=None
) -> torch.Tensor:
    """
    `h_t = gates_t * h_{t-1} + inputs_t` along whole rows (dim 1), from `initial_state` (or zero).
    gates: (N, T, F); inputs: (N, T, S, F); initial_state: (N, S, F). Two levels of `chunk_scan`: inside blocks of
    `block_size` tokens from zero, then the carries between blocks, then each block's share of its carry (the
    product of its gates so far, itself a scan), so the Python loops run O(T / block + block) steps, not T.
    `scan`: the chunk scan to use (`chunk_scan` by default; the Triton backend passes its kernel).
    """
    scan = scan or chunk_scan
    num_rows, seq_len = gates.shape[:2]
    padded_len = -(-seq_len // block_size) * block_size
    if padded_len != seq_len:  # padding: gate 1, input 0 leaves the state unchanged
        gates = F.pad(gates, (0, 0, 0, padded_len - seq_len), value=1.0)
        inputs = F.pad(inputs, (0, 0, 0, 0, 0, padded_len - seq_len))
    num_blocks = padded_len // block_size
    feature_shape = inputs.shape[2:]
    block_gates = gates.reshape(num_rows, num_blocks, block_size, -1)
    block_inputs = inputs.reshape(num_rows, num_blocks, block_size, *feature_shape)
    local = scan(block_gates, block_inputs)  # each block from zero
    # Product of the gates since the block start (how much of the incoming state survives).
    decay = _cumulative_gate_product(block_gates, scan)
    # Carries: state at the end of block j = decay_end_j * state_end_{j-1} + local_end_j.
    carries = scan(
        decay[:, :, -1].unsqueeze(1), local[:, :, -1].unsqueeze(1), initial_state
    ).squeeze(1)  # (N, num_blocks, S, F): state at the end of every block
    incoming = torch.cat(
        [
            (initial_state.to(carries.dtype) if initial_state is not None else torch.zeros_like(carries[:, 0])).unsqueeze(1),
            carries[:, :-1],
        ],
        dim=1,
    )  # state entering each block
    states = local + decay.unsqueeze(-2) * incoming.unsqueeze(2)
    return states.reshape(num_rows, padded_len, *feature_shape)[:, :seq_len]


def _cumulative_gate_product(block_gates: torch.Tensor, scan) -> torch.Tensor:
    """Running product of the gates inside each block (N, C, L, F), as a chunk scan from state 1 with input 0."""
    ones = torch.ones_like(block_gates[:, :, 0]).unsqueeze(-2)  # (N, C, 1, F)
    zeros = torch.zeros_like(block_gates).unsqueeze(-2)
    num_rows, num_blocks = block_gates.shape[:2]
    # Treat each block as its own row so that every block starts from the initial state 1.
    flat_gates = block_gates.reshape(num_rows * num_blocks, 1, *block_gates.shape[2:])
    flat_zeros = zeros.reshape(num_rows * num_blocks, 1, *zeros.shape[2:])
    flat_ones = ones.reshape(num_rows * num_blocks, *ones.shape[2:])
    product = scan(flat_gates, flat_zeros, flat_ones)
    return product.reshape(num_rows, num_blocks, *block_gates.shape[2:])


# ------------------------------------------------------------------------------------------ chunk attention


def chunk_attention_reference(query, own_score, own_value, key_summaries, value_summaries, num_cached_chunks, scale):
    """
    `chunk_attention` written out: every token's scores against its own term and every summary, the summaries it may
    not see removed by selects (so that nothing it may not see, not even a NaN, reaches it), one softmax.
    """
    num_rows, chunk_size, num_heads, num_chunks, head_dim = query.shape
    num_keys = key_summaries.shape[2]
    num_cached = num_keys - (num_chunks - 1)
    dtype = torch.promote_types(query.dtype, torch.float32)
    slot = torch.arange(num_keys, device=query.device)
    chunk = torch.arange(num_chunks, device=query.device)
    count = torch.zeros(num_rows, dtype=torch.long, device=query.device) if num_cached_chunks is None else num_cached_chunks
    sees_cached = (slot[None, :] < num_cached) & (slot[None, :] < count[:, None])  # (N, K)
    sees_new = (slot[None, :] >= num_cached) & (slot[None, :] - num_cached < chunk[:, None])  # (C, K)
    allowed = (sees_cached[:, None, :] | sees_new[None]).reshape(num_rows, 1, 1, num_chunks, num_keys, 1)
    keys = torch.where(allowed, key_summaries.to(dtype)[:, None, :, None], 0.0)  # (N, 1, H, C, K, d)
    values = torch.where(allowed, value_summaries.to(dtype)[:, None, :, None], 0.0)
    scores = (query.to(dtype).unsqueeze(-2) * keys).sum(-1) * scale  # (N, L, H, C, K)
    scores = torch.where(allowed[..., 0], scores, float("-inf"))
    weights = torch.cat([own_score.to(dtype).unsqueeze(-1) * scale, scores], dim=-1).softmax(dim=-1)
    out = weights[..., :1] * own_value.to(dtype) + (weights[..., 1:].unsqueeze(-1) * values).sum(-2)
    return out.to(query.dtype)


def decode_attention_reference(query, own_score, own_value, key_summaries, value_summaries, num_cached_chunks, scale):
    """`decode_attention` as `chunk_attention_reference` of one token per row: (B, H, d) in and out."""
    out = chunk_attention_reference(
        query[:, None, :, None], own_score[:, None, :, None], own_value[:, None, :, None],
        key_summaries, value_summaries, num_cached_chunks, scale,
    )
    return out[:, 0, :, 0]


def padded_head_dim(head_dim: int, device: torch.device | str = "cuda") -> int:
    """Head size of the augmented attention inputs: d + 1, rounded up to a multiple of 8 for GPU kernels (the CPU
    flash kernel takes any size, and padding would only add work)."""
    if torch.device(device).type == "cpu":
        return head_dim + 1
    return -(-(head_dim + 1) // 8) * 8


def chunk_attention_mask(num_cached_chunks: torch.Tensor, num_cached: int, num_chunks: int) -> torch.Tensor:
    """
    (N, 1, C, 1 + P + C - 1) bool: which of [own slot, P cached summaries, C - 1 new summaries] each query chunk
    sees. Query chunk i of row n sees the own slot, cached slots j < num_cached_chunks[n], and new summaries k < i.
    """
    device = num_cached_chunks.device
    rows = num_cached_chunks.shape[0]
    own = torch.ones(rows, num_chunks, 1, dtype=torch.bool, device=device)
    cached = torch.arange(num_cached, device=device)[None, None, :] < num_cached_chunks[:, None, None]
    new = torch.arange(num_chunks - 1, device=device)[None, :] < torch.arange(num_chunks, device=device)[:, None]
    return torch.cat([own, cached.expand(-1, num_chunks, -1), new[None].expand(rows, -1, -1)], dim=-1).unsqueeze(1)


def holds_nonfinite(*tensors: torch.Tensor, dim) -> torch.Tensor:
    """
    Which slices of `tensors` hold a NaN or inf: those whose float32 sum over `dim` is not finite (a sum of finite
    values overflows only for elements near 1e36, where attention scores overflow anyway). Many times faster than
    `isfinite(x).all(dim)` on CPUs.
    """
    return ~torch.isfinite(sum(tensor.sum(dim=dim, dtype=torch.float32) for tensor in tensors))


def nan_where(condition: torch.Tensor) -> torch.Tensor:
    """0 where `condition` is False, NaN where True: added to a tensor, it sets those entries to NaN (x + 0 == x)."""
    return torch.where(condition, float("nan"), 0.0)


def contain_summary_faults(own_value, key_summaries, value_summaries, num_cached_chunks):
    """
    Keep a non-finite summary (a NaN or inf in some token) away from the queries that may not see it, whatever kernel
    is given these inputs. Attention kernels multiply the summaries a query may not see by zero weights, and 0 * NaN is
    NaN: the fault would reach earlier tokens. Summaries holding a NaN or inf are replaced by zeros, and every query
    that may see one gets a NaN own value, so that its output is NaN, as the single softmax of the SPEC makes it
    (kernels add the own value with its weight, and w * NaN is NaN for any w; a NaN score would not do: fused kernels
    may turn a row of NaN scores into zeros). Shapes as in `chunk_attention`; returns the three tensors to give the
    kernel instead.

    Cost: a sum and a select over the summaries (1/L of the tokens), one addition over the own values; no
    synchronisation.
    """
    num_chunks = own_value.shape[3]
    num_cached = key_summaries.shape[2] - (num_chunks - 1)
    faulty = holds_nonfinite(key_summaries, value_summaries, dim=-1)  # (N, H, P + C - 1)
    key_summaries = key_summaries.masked_fill(faulty[..., None], 0.0)
    value_summaries = value_summaries.masked_fill(faulty[..., None], 0.0)
    # Query chunk i sees the new summaries k < i, and the cached slots below its row's count.
    # (Through the first faulty new summary rather than a cumulative sum, which torch.export cannot trace for
    # dynamic lengths.)
    chunks = torch.arange(num_chunks, device=faulty.device)
    new_faulty = torch.cat([faulty[..., num_cached:], faulty.new_zeros(*faulty.shape[:2], 1)], dim=-1)  # (N, H, C)
    first_fault = torch.where(new_faulty, chunks, num_chunks).amin(-1, keepdim=True)  # (N, H, 1)
    sees_fault = chunks > first_fault  # (N, H, C)
    if num_cached_chunks is not None:
        cached_visible = torch.arange(num_cached, device=faulty.device)[None, :] < num_cached_chunks[:, None]
        sees_fault = sees_fault | (faulty[..., :num_cached] & cached_visible[:, None, :]).any(-1, keepdim=True)
    own_value = own_value + nan_where(sees_fault)[:, None, :, :, None].to(own_value.dtype)  # (N, L, H, C, d)
    return own_value, key_summaries, value_summaries


def chunk_attention(
    query: torch.Tensor,
    own_score: torch.Tensor,
    own_value: torch.Tensor,
    key_summaries: torch.Tensor,
    value_summaries: torch.Tensor,
    num_cached_chunks: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """
    Each token's softmax over the summaries of earlier chunks plus its own running summary, in one SDPA call.

    The token's own key differs from token to token, so it cannot be one more shared key. It is folded in with one
    extra coordinate: queries get `[q, s_own]` with `s_own = q . k_own` (unscaled), the key list gets a first "own"
    slot `[0, 1]` (its score is then exactly `s_own`), and values get `[V, 0]` with the own slot `[0, 1]`, so the
    extra output coordinate is the own term's softmax weight `p_own` and `out = o[:d] + p_own * v_own` is exactly
    the single softmax over `{K_0..K_{c-1}} U {k_own}` of the SPEC. Zero coordinates pad the head size to a
    multiple of 8. The fused SDPA kernels then do the blocked online softmax (forward and backward). A NaN or inf
    summary reaches only the queries that may see it (`contain_summary_faults`).

    Shapes (N independent rows, L tokens per chunk, H heads, C query chunks, d head size):
        query: (N, L, H, C, d), rotated by each token's chunk index.
        own_score: (N, L, H, C) fp32; own_value: (N, L, H, C, d).
        key_summaries, value_summaries: (N, H, P + C - 1, d): P summaries from earlier calls (held by a
            cache), then the summaries of query chunks 0..C-2 of this call. Keys are rotated.
        num_cached_chunks: None when P = 0 (plain chunk-causal attention: query chunk i sees new summaries < i),
            else (N,) how many of the P cached slots of each row are valid (all of them come before chunk 0).
    Returns (N, L, H, C, d).
    """
    num_rows, chunk_size, num_heads, num_chunks, head_dim = query.shape
    width = padded_head_dim(head_dim, query.device)
    dtype = query.dtype
    own_value, key_summaries, value_summaries = contain_summary_faults(
        own_value, key_summaries, value_summaries, num_cached_chunks
    )
    # The L tokens of a chunk see the same keys: they become L query heads sharing one key/value head
    # (grouped-query attention), query head h * L + l for token l of head h.
    query_aug = torch.cat(
        [
            query.transpose(1, 2),
            own_score.transpose(1, 2).to(dtype).unsqueeze(-1),
            query.new_zeros(num_rows, num_heads, chunk_size, num_chunks, width - head_dim - 1),
        ],
        dim=-1,
    ).reshape(num_rows, num_heads * chunk_size, num_chunks, width)
    num_keys = key_summaries.shape[2]
    own_slot = key_summaries.new_zeros(num_rows, num_heads, 1, width)
    own_slot[..., head_dim] = 1
    zeros = key_summaries.new_zeros(num_rows, num_heads, num_keys, width - head_dim)
    key_aug = torch.cat([own_slot, torch.cat([key_summaries, zeros], -1)], dim=2)
    value_aug = torch.cat([own_slot, torch.cat([value_summaries, zeros], -1)], dim=2)
    if num_cached_chunks is None:
        if num_keys != num_chunks - 1:
            raise ValueError(f"Without cached summaries, {num_chunks} query chunks need {num_chunks - 1} key summaries, got {num_keys}.")
        out = F.scaled_dot_product_attention(query_aug, key_aug, value_aug, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = chunk_attention_mask(num_cached_chunks, num_keys - (num_chunks - 1), num_chunks)
        out = F.scaled_dot_product_attention(query_aug, key_aug, value_aug, attn_mask=mask, scale=scale, enable_gqa=True)
    attended, own_weight, _ = out.reshape(num_rows, num_heads, chunk_size, num_chunks, width).split(
        [head_dim, 1, width - head_dim - 1], dim=-1
    )
    return (attended + own_weight * own_value.transpose(1, 2)).transpose(1, 2)


def decode_attention(
    query: torch.Tensor,
    own_score: torch.Tensor,
    own_value: torch.Tensor,
    key_summaries: torch.Tensor,
    value_summaries: torch.Tensor,
    num_cached_chunks: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """
    `chunk_attention` for one new token per row (decoding), reading the cached summaries in place (no augmented
    copies): query (B, H, d) rotated, own_score (B, H) fp32, own_value (B, H, d), key/value summaries (B, H, P, d)
    of which the first num_cached_chunks[b] are valid. Returns (B, H, d).

    The other slots are removed from the scores by a select; their values get weight zero and are zeros (the cache
    keeps every slot beyond a row's count at zero, see `RatChunkCacheLayer.crop`), so that no NaN of a discarded
    token can reach the output through 0 * NaN, and no select over the whole cache is needed on every step.
    """
    scores = torch.matmul(query.unsqueeze(2), key_summaries.transpose(-1, -2)).squeeze(2).float()  # (B, H, P)
    slots = torch.arange(key_summaries.shape[2], device=query.device)
    scores = scores.masked_fill((slots[None, :] >= num_cached_chunks[:, None])[:, None, :], float("-inf"))
    weights = torch.cat([own_score.float().unsqueeze(-1), scores], dim=-1).mul(scale).softmax(dim=-1)
    out = torch.matmul(weights[..., 1:].unsqueeze(2).to(value_summaries.dtype), value_summaries).squeeze(2)
    return (out.float() + weights[..., :1] * own_value.float()).to(own_value.dtype)


def sliding_window_attention(query, key, value, window: int, block_size: int | None = None) -> torch.Tensor:
    """
    Causal attention of (B, H, T, d) queries to the keys at most `window - 1` tokens back (a query sees `window`
    tokens, itself included), computed in blocks of queries so that time and memory grow as T * window instead of
    T^2: each block of queries attends, through SDPA, to the keys from `window - 1` before it to its end.
    """
    seq_len = query.shape[2]
    block_size = block_size or max(window, 128)
    outputs = []
    for start in range(0, seq_len, block_size):
        end = min(start + block_size, seq_len)
        key_start = max(0, start - window + 1)
        query_columns = torch.arange(start, end, device=query.device)[:, None]
        key_columns = torch.arange(key_start, end, device=query.device)[None, :]
        allowed = (key_columns <= query_columns) & (query_columns - key_columns < window)
        outputs.append(
            F.scaled_dot_product_attention(
                query[:, :, start:end], key[:, :, key_start:end], value[:, :, key_start:end], attn_mask=allowed
            )
        )
    return torch.cat(outputs, dim=2)


def attention_containing_faults(query, key, value, attn_mask=None, sliding_window=None, query_valid=None):
    """
    Softmax attention of queries (B, H, T, d) over keys and values (B, H, K, d) in which a non-finite key or value (a
    NaN or inf in some token) reaches only the queries that may see it. SDPA multiplies what a query may not see by zero
    weights, and 0 * NaN is NaN: the fault would reach earlier tokens. Columns holding a NaN or inf are replaced by
    zeros for the call, and the output of every query that may see one is set to NaN after it, as plain attention
    gives it (fused kernels may turn a row of NaN scores into zeros instead).

    attn_mask: (B, 1, T, K) bool, which keys each query sees; None: causal attention over T = K tokens, within the last
    `sliding_window` tokens when given (then computed block by block, `sliding_window_attention`). query_valid (B, T):
    padding queries are never set to NaN (they may see anything, and would carry the fault into the padding of later
    layers and of the cache).

    Cost: a sum, a select and their backward over the keys and values, one addition over the output; no
    synchronisation.
    """
    faulty = holds_nonfinite(key, value, dim=(1, 3))  # (B, K): in any head
    key = key.masked_fill(faulty[:, None, :, None], 0.0)
    value = value.masked_fill(faulty[:, None, :, None], 0.0)
    if attn_mask is not None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
        sees_fault = (attn_mask[:, 0] & faulty[:, None, :]).any(-1)  # (B, T)
    else:
        faults_so_far = faulty.long().cumsum(-1)
        if sliding_window is None:
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True)
            sees_fault = faults_so_far > 0
        else:
            out = sliding_window_attention(query, key, value, sliding_window)
            sees_fault = faults_so_far - F.pad(faults_so_far, (sliding_window, 0))[:, : faults_so_far.shape[1]] > 0
    if query_valid is not None:
        sees_fault = sees_fault & query_valid
    return out + nan_where(sees_fault)[:, None, :, None].to(out.dtype)
