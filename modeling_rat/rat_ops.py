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
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


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


def _scan_in_place(gates, states, initial_state):
    """h[:, c, l] = gates[:, c, l] * h[:, c, l-1] + x[:, c, l], step by step in `states`, which holds x on entry."""
    if initial_state is not None:
        states[:, 0, 0].addcmul_(gates[:, 0, 0].unsqueeze(-2), initial_state)
    for index in range(1, gates.shape[2]):
        states[:, :, index].addcmul_(gates[:, :, index].unsqueeze(-2), states[:, :, index - 1])
    return states


def _reverse_scan_in_place(gates, grad_states):
    """The reverse scan: turns the gradient given to each state into the gradient reaching it through every later
    step (the gradient of the scan's inputs), in place."""
    for index in range(gates.shape[2] - 2, -1, -1):
        grad_states[:, :, index].addcmul_(gates[:, :, index + 1].unsqueeze(-2), grad_states[:, :, index + 1])
    return grad_states


def _gate_gradients(grad_inputs, gates, states, initial_state, grad_gates):
    """
    dL/df_l = sum over streams of dL/dx_l * h_{l-1} (h_{-1}: the initial state in chunk 0 of each row, else 0), written
    into `grad_gates`, stream by stream without a temporary of the states' size; returns the initial state's gradient.
    """
    streams = grad_inputs.shape[-2]
    torch.mul(grad_inputs[:, :, 1:, 0], states[:, :, :-1, 0], out=grad_gates[:, :, 1:])
    for stream in range(1, streams):
        grad_gates[:, :, 1:].addcmul_(grad_inputs[:, :, 1:, stream], states[:, :, :-1, stream])
    grad_gates[:, :, 0] = 0
    if initial_state is None:
        return None
    grad_gates[:, 0, 0] = (grad_inputs[:, 0, 0] * initial_state).sum(-2)
    return gates[:, 0, 0].unsqueeze(-2) * grad_inputs[:, 0, 0]


def _scan_forward(gates, inputs, initial_state):
    """h[:, c, l] = gates[:, c, l] * h[:, c, l-1] + inputs[:, c, l]."""
    return _scan_in_place(gates, inputs.clone(), initial_state)


def _scan_backward(gates, states, initial_state, grad_states):
    """Reverse scan: (gradient reaching each state = gradient of the inputs, gradient of the gates, of the initial state)."""
    grad_inputs = _reverse_scan_in_place(gates, grad_states.clone())
    grad_gates = torch.empty_like(gates)
    grad_initial = _gate_gradients(grad_inputs, gates, states, initial_state, grad_gates)
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


def _gated_scan_forward(gates, value, key, initial_state):
    """
    States (N, C, L, 2, D) of the RAT recurrence from the forget gate and the raw streams: the gated inputs
    (1 - f) * [v, k tiled] are written straight into the states, which the scan then updates in place.
    """
    num_rows, num_chunks, chunk_size, hidden_size = gates.shape
    copies = hidden_size // key.shape[-1]
    states = gates.new_empty(num_rows, num_chunks, chunk_size, 2, hidden_size)
    input_gate = 1 - gates
    torch.mul(input_gate, value, out=states[..., 0, :])
    torch.mul(input_gate.unflatten(-1, (copies, -1)), key.unsqueeze(-2), out=states[..., 1, :].unflatten(-1, (copies, -1)))
    return _scan_in_place(gates, states, initial_state)


def _gated_scan_backward(grad_states, gates, value, key, states, initial_state, grad_gates, grad_value, grad_key):
    """
    Reverse scan of `_gated_scan_forward`: writes the gradients of the gates, the value and the (untiled) key into
    the given tensors and returns the initial state's (or None). Accumulates in place in `grad_states`, which then
    holds the gradient reaching each state through every later step. With x the ungated stream ([v, k tiled]),
    h_l = f_l h_{l-1} + (1 - f_l) x_l gives dh_l/df_l = h_{l-1} - x_l and dh_l/dx_l = 1 - f_l.
    """
    copies = gates.shape[-1] // key.shape[-1]
    _reverse_scan_in_place(gates, grad_states)
    grad_initial = _gate_gradients(grad_states, gates, states, initial_state, grad_gates)
    grad_value_stream, grad_key_stream = grad_states.unbind(dim=-2)
    grad_gates.addcmul_(grad_value_stream, value, value=-1)
    grad_key_tiled = grad_key_stream.unflatten(-1, (copies, -1))
    grad_gates.unflatten(-1, (copies, -1)).addcmul_(grad_key_tiled, key.unsqueeze(-2), value=-1)
    input_gate = 1 - gates
    torch.mul(input_gate, grad_value_stream, out=grad_value)
    torch.sum(grad_key_tiled.mul_(input_gate.unflatten(-1, (copies, -1))), dim=-2, out=grad_key)
    return grad_initial


class GatedChunkScan(torch.autograd.Function):
    """
    The RAT recurrence from the gate and the raw streams: inputs (1 - f) * [v, k_tiled] are formed inside, so
    autograd keeps only f (already kept by its sigmoid), v, the untiled k and the states, not the gated copies.
    """

    @staticmethod
    def forward(ctx, gates, value, key, initial_state):
        states = _gated_scan_forward(gates, value, key, initial_state)
        ctx.save_for_backward(gates, value, key, states, initial_state)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        gates, value, key, states, initial_state = ctx.saved_tensors
        grad_gates, grad_value, grad_key = torch.empty_like(gates), torch.empty_like(value), torch.empty_like(key)
        grad_initial = _gated_scan_backward(
            grad_states.clone(), gates, value, key, states, initial_state, grad_gates, grad_value, grad_key
        )
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


def holds_nonfinite(*tensors: torch.Tensor, dim, keepdim: bool = False) -> torch.Tensor:
    """
    Which slices of `tensors` hold a NaN or inf: those whose float32 sum over `dim` is not finite (a sum of finite
    values overflows only for elements near 1e36, where attention scores overflow anyway). Many times faster than
    `isfinite(x).all(dim)` on CPUs.
    """
    return ~torch.isfinite(sum(tensor.sum(dim=dim, keepdim=keepdim, dtype=torch.float32) for tensor in tensors))


def zero_nonfinite_pairs(key: torch.Tensor, value: torch.Tensor, dim, in_place: bool = False):
    """
    The key/value pairs (slices over `dim`, in the key or the value) that hold a NaN or inf, replaced by zeros for an
    attention kernel, which would otherwise spread them through zero weights (0 * NaN is NaN). Returns the key, the
    value (the same tensors when `in_place`) and which pairs were faulty (keeping `dim` as size-1 dimensions).
    """
    faulty = holds_nonfinite(key, value, dim=dim, keepdim=True)
    if in_place:
        return key.masked_fill_(faulty, 0.0), value.masked_fill_(faulty, 0.0), faulty
    return key.masked_fill(faulty, 0.0), value.masked_fill(faulty, 0.0), faulty


def follows_a_fault(faulty: torch.Tensor) -> torch.Tensor:
    """
    (..., C) bool -> (..., C): True at the positions after the first faulty one (position c sees positions < c).
    Through the first fault rather than a cumulative sum, which torch.export cannot trace for dynamic lengths.
    """
    positions = torch.arange(faulty.shape[-1], device=faulty.device)
    first_fault = torch.where(faulty, positions, faulty.shape[-1]).amin(-1, keepdim=True)
    return positions > first_fault


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
    key_summaries, value_summaries, faulty = zero_nonfinite_pairs(key_summaries, value_summaries, dim=-1)
    faulty = faulty[..., 0]  # (N, H, P + C - 1)
    # Query chunk i sees the new summaries k < i, and the cached slots below its row's count.
    new_faulty = torch.cat([faulty[..., num_cached:], faulty.new_zeros(*faulty.shape[:2], 1)], dim=-1)  # (N, H, C)
    sees_fault = follows_a_fault(new_faulty)  # (N, H, C)
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


# ------------------------------------------------------------------------------ fused chunk mixing (CPU)

#: The backward of `chunk_mixing` works on blocks of chunks of about this many tokens (all rows together), holding
#: about 8 KB per token of a block (fp32) besides its inputs. Its forward without gradients uses blocks
#: `INFERENCE_BLOCK_FACTOR` times larger: each block after the first costs a masked kernel call and its own round of
#: small operations (measured on 2 CPU cores: 0.1-0.3 s per extra block at 32K tokens, D 512), and the forward holds
#: less per token than the backward.
MIXING_BLOCK_TOKENS = 8192
INFERENCE_BLOCK_FACTOR = 4


class ChunkMixingOutput(NamedTuple):
    mixed: torch.Tensor  # (N, C, L, H*d): every token's attention output, in the dtype of `value`
    key_summaries: torch.Tensor  # (N, C, H, d): each chunk's running key at its end, rotated
    value_summaries: torch.Tensor  # (N, C, H, d)
    states: torch.Tensor | None  # (N, C, L, 2, H*d) fp32 running [value, key] sums, when asked for


def _chunk_blocks(num_rows: int, num_chunks: int, chunk_size: int, block_tokens: int | None) -> list[tuple[int, int]]:
    """Ranges [start, end) of chunks processed together, about `block_tokens` tokens over all rows (None: one block)."""
    step = num_chunks if block_tokens is None else max(1, block_tokens // (num_rows * chunk_size))
    return [(start, min(start + step, num_chunks)) for start in range(0, num_chunks, step)]


def _block_mask(start, end, num_cached, num_cached_chunks, device):
    """
    Additive mask (N or 1, 1, end - start, num_cached + end) of what query chunks [start, end) see among the slots
    [own, cached summaries, summaries of chunks 0 .. end - 2]; None when top-left causal order is exactly that.
    Query chunk c sees the own slot, the first num_cached_chunks[n] cached slots and the summaries of chunks < c,
    that is, every slot up to num_cached + c except the cached ones past the row's count.
    """
    if start == 0 and num_cached == 0:
        return None
    slot = torch.arange(num_cached + end, device=device)
    hidden = slot > (num_cached + torch.arange(start, end, device=device))[:, None]  # (Cb, K)
    if num_cached:
        invalid_cached = (slot > num_cached_chunks[:, None]) & (slot <= num_cached)  # (N, K)
        hidden = hidden | invalid_cached[:, None, :]
    mask = torch.where(hidden, float("-inf"), 0.0)  # (Cb, K), or (N, Cb, K) with cached slots
    return mask.unsqueeze(-3) if num_cached else mask[None, None]


def _as_heads(tensor):
    """(N, Cb, H, L, ...) -> (N, H * L, Cb, ...): the layout of the SDPA kernel's queries, as a view."""
    return tensor.flatten(2, 3).transpose(1, 2)


def _from_heads(tensor, num_heads):
    """Inverse of `_as_heads`."""
    return tensor.transpose(1, 2).unflatten(2, (num_heads, -1))


def _add_rotated(target, x, cos, sin):
    """`target += apply_rotary(x, cos, sin)` in three in-place operations."""
    half = x.shape[-1] // 2
    target.addcmul_(x, cos)
    target[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    target[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return target


def _rotated(x, cos, sin):
    """`apply_rotary(x, cos, sin)` in three operations, for code that autograd does not trace."""
    half = x.shape[-1] // 2
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


def _zero_faulty_slots(key_slots, value_slots, slots: slice) -> torch.Tensor:
    """Zeroes the key and value slots `slots` (N, H, slots, d + 2) that hold a NaN or inf; returns which (N, H, slots)."""
    return zero_nonfinite_pairs(key_slots[:, :, slots], value_slots[:, :, slots], dim=-1, in_place=True)[2][..., 0]


_flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_attention_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _MixingBlock:
    """
    Chunks [start, end) of every row: their inputs, states (recomputed), own scores and rotated queries, and the
    pieces of the SDPA call. The heads of the call are the augmented heads of `chunk_attention` with one coordinate
    more, zero in queries, keys and values (see `ChunkMixing`): width d + 2.
    """

    def __init__(self, inputs, start, end, num_cached, num_cached_chunks):
        gates, value, key, query, cos, sin, initial_state = inputs
        self.start, self.end, self.num_slots = start, end, num_cached + end
        self.gates, self.value, self.key = gates[:, start:end], value[:, start:end], key[:, start:end]
        self.cos, self.sin = cos[:, start:end, None, None], sin[:, start:end, None, None]
        head_dim = cos.shape[-1]
        self.groups = query.shape[-1] // head_dim
        self.heads, self.copies = gates.shape[-1] // head_dim, gates.shape[-1] // query.shape[-1]
        self.initial_state = initial_state if start == 0 else None
        self.states = _gated_scan_forward(self.gates, self.value, self.key, self.initial_state)
        self.running_value, self.running_key = (
            stream.unflatten(-1, (self.heads, head_dim)) for stream in self.states.unbind(dim=-2)
        )  # (N, Cb, L, H, d)
        self.query = query[:, start:end].to(gates.dtype).unflatten(-1, (self.groups, head_dim))  # (N, Cb, L, G, d)
        # q . k_own per head (N, Cb, H, L): the unrotated query and key (rotation preserves the dot product)
        self.own_score = (
            self.running_key.unflatten(3, (self.copies, self.groups)) * self.query.unsqueeze(3)
        ).sum(-1).flatten(3).transpose(2, 3)
        self.rotated_query = _rotated(self.query, self.cos, self.sin)
        self.mask = _block_mask(start, end, num_cached, num_cached_chunks, gates.device)

    def augmented_query(self, copies: slice, dtype):
        """(N, Cb, h, L, d + 2): [rotated query, own score, 0] for the heads of `copies` (h = G per copy), the L
        tokens of a chunk as the kernel's query heads h * L + l."""
        num_rows, num_chunks, chunk_size, groups, head_dim = self.query.shape
        shape = (num_rows, num_chunks, copies.stop - copies.start, groups, chunk_size)
        own_score = self.own_score[:, :, copies.start * groups : copies.stop * groups].unflatten(2, (-1, groups))
        query = torch.cat(
            [
                self.rotated_query.transpose(2, 3).unsqueeze(2).expand(*shape, head_dim).to(dtype),
                own_score.unsqueeze(-1).to(dtype),
                own_score.new_zeros((), dtype=dtype).expand(*shape, 1),
            ],
            dim=-1,
        )
        return query.flatten(2, 3)

    def head_groups(self):
        """The kernel's backward runs on half of the copies of the heads at a time (half the working memory)."""
        middle = (self.copies + 1) // 2
        return [slice(0, middle), slice(middle, self.copies)] if self.copies > 1 else [slice(0, 1)]


class ChunkMixing(torch.autograd.Function):
    """
    `chunk_mixing` on the CPU. Autograd keeps only the inputs (gates and projections, kept by their producers anyway),
    the log-sum-exp per token and head and the key/value slots (1/L of the tokens): the backward works block by
    block of chunks, recomputes each block's states, own scores and augmented queries, and calls the flash kernel's
    backward directly.

    Not even the output is kept. The kernel reads its output only through the row sums `grad_out . out`, which for
    the augmented output [attended, own weight] equal `grad_mixed . mixed` per token and head; `_MixingRowSums`,
    applied to the output, computes them in its backward and hands them back as the gradient of the second output,
    `row_sums`. The augmented heads carry one coordinate more, zero in queries, keys and values, where the backward
    puts 1 in the output's gradient and the row sum in the output.
    """

    @staticmethod
    def forward(ctx, gates, value, key, query, cos, sin, initial_state, cached_keys, cached_values, num_cached_chunks, scale, return_states):
        num_rows, num_chunks, chunk_size, hidden_size = gates.shape
        head_dim = cos.shape[-1]
        heads = hidden_size // head_dim
        num_cached = 0 if cached_keys is None else cached_keys.shape[2]
        # Slots [own, cached summaries, summaries of chunks 0 .. C-2]: keys [K, 0, 0] and own [0, 1, 0], values alike.
        key_slots = value.new_zeros(num_rows, heads, num_cached + num_chunks, head_dim + 2)
        key_slots[:, :, 0, head_dim] = 1
        value_slots = key_slots.clone()
        # Fault containment as in `contain_summary_faults`: slots holding a NaN or inf are zeroed for the kernel, and
        # the output of every query chunk that may see one is set to NaN. `seen_fault` (N, H): one was seen so far.
        seen_fault = gates.new_zeros(num_rows, heads, dtype=torch.bool)
        if num_cached:
            key_slots[:, :, 1 : 1 + num_cached, :head_dim] = cached_keys
            value_slots[:, :, 1 : 1 + num_cached, :head_dim] = cached_values
            faulty = _zero_faulty_slots(key_slots, value_slots, slice(1, 1 + num_cached))  # (N, H, P)
            valid = torch.arange(num_cached, device=gates.device) < num_cached_chunks[:, None]  # (N, P)
            seen_fault = (faulty & valid[:, None]).any(-1)
        key_summaries = value.new_empty(num_rows, num_chunks, heads, head_dim)
        value_summaries = torch.empty_like(key_summaries)
        mixed = value.new_empty(num_rows, num_chunks, chunk_size, hidden_size)
        log_normalizer = gates.new_empty(num_rows, num_chunks, heads, chunk_size)
        states = gates.new_empty(num_rows, num_chunks, chunk_size, 2, hidden_size) if return_states else None
        inputs = (gates, value, key, query, cos, sin, initial_state)
        # When training, the forward holds less than the backward will, so it runs in one block (fewest operations).
        block_tokens = None if any(ctx.needs_input_grad) else INFERENCE_BLOCK_FACTOR * MIXING_BLOCK_TOKENS
        for start, end in _chunk_blocks(num_rows, num_chunks, chunk_size, block_tokens):
            block = _MixingBlock(inputs, start, end, num_cached, num_cached_chunks)
            if return_states:
                states[:, start:end] = block.states
            key_summaries[:, start:end] = _rotated(block.running_key[:, :, -1], block.cos[:, :, 0], block.sin[:, :, 0])
            value_summaries[:, start:end] = block.running_value[:, :, -1]
            keys_end = min(end, num_chunks - 1)  # the last chunk's summary is nobody's key
            faulty = seen_fault.new_zeros(num_rows, heads, end - start)  # (N, H, Cb): the chunk's summary is faulty
            if keys_end > start:
                slots = slice(1 + num_cached + start, 1 + num_cached + keys_end)
                key_slots[:, :, slots, :head_dim] = key_summaries[:, start:keys_end].transpose(1, 2)
                value_slots[:, :, slots, :head_dim] = value_summaries[:, start:keys_end].transpose(1, 2)
                faulty[..., : keys_end - start] = _zero_faulty_slots(key_slots, value_slots, slots)
            sees_fault = seen_fault[..., None] | follows_a_fault(faulty)  # chunk c sees the summaries of chunks < c
            seen_fault = sees_fault[..., -1] | faulty[..., -1]
            out, lse = _flash_attention(
                _as_heads(block.augmented_query(slice(0, block.copies), value.dtype)), key_slots[:, :, : block.num_slots],
                value_slots[:, :, : block.num_slots], 0.0, block.mask is None, attn_mask=block.mask, scale=scale,
            )
            lse = _from_heads(lse, heads)  # (N, Cb, H, L)
            log_normalizer[:, start:end] = lse
            own_weight = torch.exp(block.own_score * scale - lse)
            mixed_block = mixed[:, start:end].unflatten(-1, (heads, head_dim))  # (N, Cb, L, H, d)
            mixed_block.copy_(_from_heads(out, heads)[..., :head_dim].transpose(2, 3))
            mixed_block.addcmul_(own_weight.transpose(2, 3).unsqueeze(-1), block.running_value)
            if sees_fault.any():  # (CPU tensors: no synchronisation to avoid)
                mixed_block.add_(nan_where(sees_fault.transpose(1, 2))[:, :, None, :, None].to(mixed.dtype))
            del block, out, lse, own_weight, mixed_block
        ctx.save_for_backward(gates, value, key, query, cos, sin, initial_state, num_cached_chunks, log_normalizer, key_slots, value_slots)
        ctx.scale, ctx.num_cached = scale, num_cached
        ctx.mark_non_differentiable(key_summaries, value_summaries, *([states] if return_states else []))
        ctx.set_materialize_grads(False)
        row_sums = gates.new_zeros(()).expand(num_rows, num_chunks, chunk_size, heads)
        return mixed, row_sums, key_summaries, value_summaries, states

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mixed, row_sums, *unused):
        if grad_mixed is None:
            return (None,) * 12
        gates, value, key, query, cos, sin, initial_state, num_cached_chunks, log_normalizer, key_slots, value_slots = ctx.saved_tensors
        num_rows, num_chunks, chunk_size, hidden_size = gates.shape
        grad_gates, grad_key, grad_query = (torch.empty_like(t) for t in (gates, key, query))
        # `grad_mixed` is a copy made for this backward (see `_MixingRowSums`): each block's slice, once used, takes the
        # value's gradient (same shape and dtype), which saves a tensor the size of the value.
        grad_value = grad_mixed
        grad_slots = (torch.zeros_like(key_slots, dtype=gates.dtype), torch.zeros_like(value_slots, dtype=gates.dtype))
        grad_initial = None
        inputs = (gates, value, key, query, cos, sin, initial_state)
        for start, end in reversed(_chunk_blocks(num_rows, num_chunks, chunk_size, MIXING_BLOCK_TOKENS)):
            block = _MixingBlock(inputs, start, end, ctx.num_cached, num_cached_chunks)
            grad_states = _mixing_block_backward(
                block, grad_mixed[:, start:end], row_sums[:, start:end], log_normalizer[:, start:end], key_slots,
                value_slots, grad_slots, ctx.scale, ctx.num_cached, num_chunks, grad_query[:, start:end],
            )
            block_grad_initial = _gated_scan_backward(
                grad_states, block.gates, block.value, block.key, block.states, block.initial_state,
                grad_gates[:, start:end], grad_value[:, start:end], grad_key[:, start:end],
            )
            if start == 0:
                grad_initial = block_grad_initial
            del block, grad_states
        grad_cached_keys = grad_cached_values = None
        if ctx.num_cached:
            cached = slice(1, 1 + ctx.num_cached)
            grad_cached_keys = grad_slots[0][:, :, cached, : cos.shape[-1]].to(key_slots.dtype)
            grad_cached_values = grad_slots[1][:, :, cached, : cos.shape[-1]].to(value_slots.dtype)
        return (
            grad_gates, grad_value if ctx.needs_input_grad[1] else None, grad_key, grad_query, None, None, grad_initial,
            grad_cached_keys, grad_cached_values, None, None, None,
        )


def _mixing_block_backward(block, grad_mixed, row_sums, lse, key_slots, value_slots, grad_slots, scale, num_cached, num_chunks, grad_query):
    """
    The attention part of `ChunkMixing.backward` for one block: the kernel's backward (adding to the slots'
    gradients `grad_slots`), the query's gradient (written into `grad_query`), and the gradient reaching the block's
    states (returned), for the reverse scan.
    """
    heads, groups, head_dim = block.heads, block.groups, block.query.shape[-1]
    dtype = key_slots.dtype
    own_weight = torch.exp(block.own_score * scale - lse)  # (N, Cb, H, L)
    grad_block = grad_mixed.unflatten(-1, (heads, head_dim))  # (N, Cb, L, H, d)
    # The kernel's output is [attended, own weight, 0]: its gradient is [g, g . v_own, 1] (dL/dp = g . v_own), and an
    # "output" [0, 0, row sum] has the real one's row sums with it (see `ChunkMixing`).
    grad_own_weight = (grad_block * block.running_value).sum(-1).transpose(2, 3).to(dtype)
    row_sums = row_sums.transpose(2, 3).to(dtype)
    grad_own_score = torch.empty_like(own_weight)
    grad_rotated = None  # (N, Cb, L, G, d)
    for copies in block.head_groups():
        head_range = slice(copies.start * groups, copies.stop * groups)
        shape = lse[:, :, head_range].shape
        grad_out = torch.cat(
            [grad_block[:, :, :, head_range].transpose(2, 3), grad_own_weight[:, :, head_range, :, None],
             grad_own_weight.new_ones(()).expand(*shape, 1)],
            dim=-1,
        )
        out = torch.cat([row_sums.new_zeros(()).expand(*shape, head_dim + 1), row_sums[:, :, head_range, :, None]], dim=-1)
        grad_query_aug, grad_keys, grad_values = _flash_attention_backward(
            _as_heads(grad_out), _as_heads(block.augmented_query(copies, dtype)),
            key_slots[:, head_range, : block.num_slots], value_slots[:, head_range, : block.num_slots], _as_heads(out),
            _as_heads(lse[:, :, head_range]), 0.0, block.mask is None, attn_mask=block.mask, scale=scale,
        )
        del grad_out, out
        grad_slots[0][:, head_range, : block.num_slots] += grad_keys
        grad_slots[1][:, head_range, : block.num_slots] += grad_values
        grad_query_aug = _from_heads(grad_query_aug, head_range.stop - head_range.start)  # (N, Cb, h, L, d + 2)
        grad_own_score[:, :, head_range] = grad_query_aug[..., head_dim]
        group_grad = grad_query_aug[..., :head_dim].unflatten(2, (-1, groups)).sum(2).transpose(2, 3)
        grad_rotated = group_grad if grad_rotated is None else grad_rotated.add_(group_grad)
        del grad_query_aug, grad_keys, grad_values, group_grad
    grad_own_score = grad_own_score.transpose(2, 3)  # (N, Cb, L, H)
    # The query's gradient: back through the rotation (the inverse rotation), and through the own scores.
    grad_query_block = grad_query.view_as(block.query)
    torch.sum(
        (grad_own_score.unsqueeze(-1) * block.running_key).unflatten(3, (block.copies, groups)), dim=3, out=grad_query_block
    )
    _add_rotated(grad_query_block, grad_rotated.to(grad_query.dtype), block.cos, -block.sin)
    del grad_rotated
    # The gradient reaching the states: the own value's (weight p), the own score's (the query), and, at each chunk's
    # last token, its summaries' (the key's back through the rotation).
    grad_states = torch.empty_like(block.states)
    grad_value_stream, grad_key_stream = (s.unflatten(-1, (heads, head_dim)) for s in grad_states.unbind(dim=-2))
    torch.mul(own_weight.transpose(2, 3).unsqueeze(-1), grad_block, out=grad_value_stream)
    torch.mul(
        grad_own_score.unflatten(-1, (block.copies, groups)).unsqueeze(-1), block.query.unsqueeze(3),
        out=grad_key_stream.unflatten(3, (block.copies, groups)),
    )
    keys_end = min(block.end, num_chunks - 1)
    if keys_end > block.start:
        count = keys_end - block.start
        slots = slice(1 + num_cached + block.start, 1 + num_cached + keys_end)
        grad_value_stream[:, :count, -1] += grad_slots[1][:, :, slots, :head_dim].transpose(1, 2)
        _add_rotated(
            grad_key_stream[:, :count, -1], grad_slots[0][:, :, slots, :head_dim].transpose(1, 2),
            block.cos[:, :count, 0], -block.sin[:, :count, 0],
        )
    return grad_states


class _MixingRowSums(torch.autograd.Function):
    """
    Identity on `ChunkMixing`'s output whose backward also returns, as the gradient of `row_sums`, the row sums
    `grad_mixed . mixed` per token and head that `ChunkMixing`'s backward needs (so that it does not keep its output).
    """

    @staticmethod
    def forward(ctx, mixed, row_sums):
        ctx.save_for_backward(mixed)
        ctx.num_heads = row_sums.shape[-1]
        return mixed

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mixed):
        (mixed,) = ctx.saved_tensors
        heads = ctx.num_heads
        compute = torch.promote_types(mixed.dtype, torch.float32)
        row_sums = (grad_mixed.unflatten(-1, (heads, -1)).to(compute) * mixed.unflatten(-1, (heads, -1))).sum(-1)
        # A copy that only `ChunkMixing.backward` sees, so that it may write into it.
        return grad_mixed.clone(memory_format=torch.contiguous_format), row_sums


def chunk_mixing(
    gates, value, key, query, cos, sin, scale, initial_state=None, cached_keys=None, cached_values=None,
    num_cached_chunks=None, return_states=False,
) -> ChunkMixingOutput:
    """
    The RAT mixing on a grid of chunks, from the forget gate and the projections to every token's attention output:
    the gated chunk scan, the own scores, the chunk summaries and the single softmax over them (`chunk_attention`).

    gates (N, C, L, D) fp32; value (N, C, L, D); key, query (N, C, L, G*d), unrotated; cos, sin (N, C, d) the rotary
    angle of each chunk; initial_state (N, 2, D) the state chunk 0 continues; cached_keys/values (N, H, P, d) rotated
    summaries of earlier calls, of which num_cached_chunks (N,) are valid. `return_states` also returns the states.

    CPU tensors only (it calls the CPU flash-attention kernel and its backward directly), and opaque to tracing:
    on other devices and under torch.compile/torch.export the model uses `composed_chunk_mixing`. A NaN or inf
    reaches only the tokens that may see it, as with `contain_summary_faults`.
    """
    if value.device.type != "cpu":
        raise ValueError(f"chunk_mixing runs on CPU tensors only, got {value.device}: use composed_chunk_mixing.")
    dtype = torch.promote_types(value.dtype, torch.float32)
    cos, sin = cos.to(dtype), sin.to(dtype)
    if initial_state is not None:
        initial_state = initial_state.to(dtype)
    mixed, row_sums, key_summaries, value_summaries, states = ChunkMixing.apply(
        gates.to(dtype), value, key, query, cos, sin, initial_state, cached_keys, cached_values, num_cached_chunks,
        scale, return_states,
    )
    return ChunkMixingOutput(_MixingRowSums.apply(mixed, row_sums), key_summaries, value_summaries, states)


def composed_chunk_mixing(
    scan, attention, gates, value, key, query, cos, sin, scale, initial_state=None, cached_keys=None,
    cached_values=None, num_cached_chunks=None, return_states=False,
) -> ChunkMixingOutput:
    """
    `chunk_mixing` from a backend's two functions: `scan` (a `gated_chunk_scan`) gives the states, from which the
    own scores, own values and summaries are formed for `attention` (a `chunk_attention`). Plain autograd around
    them, so autograd keeps whatever they and these steps keep.
    """
    num_rows, num_chunks, chunk_size, hidden_size = gates.shape
    head_dim = cos.shape[-1]
    heads, groups = hidden_size // head_dim, query.shape[-1] // head_dim
    copies = heads // groups
    dtype = value.dtype
    states = scan(gates, value, key, initial_state)  # (N, C, L, 2, D) fp32: running [value, key] sums
    running_value, running_key = (  # one backward node for both (selects would each zero-fill a gradient)
        stream.reshape(num_rows, num_chunks, chunk_size, heads, head_dim) for stream in states.unbind(dim=-2)
    )
    # Queries stay in their G groups until the attention call: rotation and the own score need no tiling.
    query_grid = query.float().reshape(num_rows, num_chunks, chunk_size, 1, groups, head_dim)
    cos, sin = cos.float(), sin.float()
    query_rotated = apply_rotary(query_grid, cos[:, :, None, None, None], sin[:, :, None, None, None])
    query_rotated = query_rotated.to(dtype).expand(-1, -1, -1, copies, -1, -1).reshape(
        num_rows, num_chunks, chunk_size, heads, head_dim
    )
    own_score = (  # rotation preserves the dot product, so the unrotated query and key give the own score
        query_grid * running_key.view(num_rows, num_chunks, chunk_size, copies, groups, head_dim)
    ).sum(-1).reshape(num_rows, num_chunks, chunk_size, heads)
    key_summaries = apply_rotary(running_key[:, :, -1], cos[:, :, None], sin[:, :, None]).to(dtype)  # (N, C, H, d)
    value_summaries = running_value[:, :, -1].to(dtype)
    keys = key_summaries[:, :-1].transpose(1, 2)  # chunk c sees summaries of chunks < c: the last is never a key
    values = value_summaries[:, :-1].transpose(1, 2)
    if cached_keys is not None:
        keys = torch.cat([cached_keys, keys], dim=2)
        values = torch.cat([cached_values, values], dim=2)
    mixed = attention(
        query_rotated.permute(0, 2, 3, 1, 4),
        own_score.permute(0, 2, 3, 1),
        running_value.to(dtype).permute(0, 2, 3, 1, 4),
        keys,
        values,
        num_cached_chunks if cached_keys is not None else None,
        scale=scale,
    )  # (N, L, H, C, d)
    mixed = mixed.permute(0, 3, 1, 2, 4).reshape(num_rows, num_chunks, chunk_size, hidden_size)
    return ChunkMixingOutput(mixed, key_summaries, value_summaries, states if return_states else None)


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
    key, value, faulty = zero_nonfinite_pairs(key, value, dim=(1, 3))  # a token's pair, in any head
    faulty = faulty[:, 0, :, 0]  # (B, K)
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
