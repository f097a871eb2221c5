"""The tests' oracles: the RAT and rnn mixers written token by token, exactly as the equations of the SPEC read.

They share no code with the model's paths (no chunk grid, no cache, no fused attention), so comparing a model with
`token_by_token_mixers(model)` applied against the model as it runs checks the layout, the cache and every backend
at once. Slow (Python loops over tokens): tiny shapes only.
"""

import math
from contextlib import contextmanager

import torch

from modeling_rat.modeling_rat import RatMixer, RatRecurrentMixer
from modeling_rat.rat_ops import apply_rotary, rotary_cos_sin, tile_groups


def rat_mixer_equations(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    forget_gate: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
    chunk_size: int,
    num_heads: int,
    rope_theta: float,
) -> torch.Tensor:
    """
    The RAT mixer before its output gate and projection, token by token, exactly as the equations read.

    Args:
        query, key: (B, T, G*d) projections. value: (B, T, D). forget_gate: (B, T, D), already `sigmoid`-ed, fp32.
        positions: (B, T) position of each token inside its own sequence; a new sequence starts wherever the
            position does not continue the previous real token's (packing), and chunks follow positions.
        valid: (B, T) bool, False for padding, which never enters any state (its output is zero).
    Returns:
        (B, T, D) attention outputs a_t (heads concatenated), in the dtype of `value`.
    """
    batch_size, seq_len, hidden_size = value.shape
    num_groups = query.shape[-1] * num_heads // hidden_size
    head_dim = hidden_size // num_heads
    scale = 1.0 / math.sqrt(head_dim)
    out = torch.zeros(batch_size, seq_len, num_heads, head_dim, dtype=torch.float32, device=value.device)
    for b in range(batch_size):
        previous_position = None
        for t in range(seq_len):
            if not bool(valid[b, t]):
                continue
            p = int(positions[b, t])
            chunk, index_in_chunk = divmod(p, chunk_size)
            f = forget_gate[b, t].float()
            v = value[b, t].float()
            k = tile_groups(key[b, t].float(), num_groups, num_heads)
            q = tile_groups(query[b, t].float(), num_groups, num_heads)
            if previous_position is None or p != previous_position + 1:  # a new sequence starts here
                key_summaries, value_summaries = [], []
                running_value, running_key = torch.zeros_like(v), torch.zeros_like(k)
            elif index_in_chunk == 0:  # a new chunk starts here
                running_value, running_key = torch.zeros_like(v), torch.zeros_like(k)
            previous_position = p
            running_value = f * running_value + (1 - f) * v
            running_key = f * running_key + (1 - f) * k
            cos, sin = rotary_cos_sin(torch.tensor(chunk, device=value.device), head_dim, rope_theta, torch.float32)
            q_rot = apply_rotary(q.view(num_heads, head_dim), cos, sin)
            own_key = apply_rotary(running_key.view(num_heads, head_dim), cos, sin)
            keys = torch.stack(key_summaries + [own_key], dim=1)  # (H, c+1, d)
            values = torch.stack(value_summaries + [running_value.view(num_heads, head_dim)], dim=1)
            scores = torch.einsum("hd,hnd->hn", q_rot, keys) * scale
            out[b, t] = torch.einsum("hn,hnd->hd", scores.softmax(dim=-1), values)
            if index_in_chunk == chunk_size - 1:  # the chunk is complete: keep its summary
                key_summaries.append(own_key)
                value_summaries.append(running_value.view(num_heads, head_dim))
    return out.reshape(batch_size, seq_len, hidden_size).to(value.dtype)


def rnn_mixer_equations(value: torch.Tensor, forget_gate: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
    """The rnn mixer's recurrence `h_t = f_t h_{t-1} + (1 - f_t) v_t` over whole sequences, token by token."""
    out = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    for b in range(value.shape[0]):
        previous_position, state = None, None
        for t in range(value.shape[1]):
            if not bool(valid[b, t]):
                continue
            p = int(positions[b, t])
            if previous_position is None or p != previous_position + 1:
                state = torch.zeros_like(value[b, t], dtype=torch.float32)
            previous_position = p
            f = forget_gate[b, t].float()
            state = f * state + (1 - f) * value[b, t].float()
            out[b, t] = state
    return out.to(value.dtype)


@contextmanager
def token_by_token_mixers(model):
    """Within the block, every RAT and rnn mixer of `model` computes with the equations above (no cache)."""

    def rat_forward(mixer, hidden_states, layout, cache_layer=None, backend=None):
        assert cache_layer is None, "the token-by-token oracle runs without a cache"
        attention = rat_mixer_equations(
            mixer.q_proj(hidden_states), mixer.k_proj(hidden_states), mixer.v_proj(hidden_states),
            mixer.forget_gate(hidden_states), layout.positions, layout.valid,
            mixer.chunk_size, mixer.num_heads, mixer.config.rope_theta,
        )
        return mixer.o_proj(torch.sigmoid(mixer.output_gate_proj(hidden_states)) * attention)

    def rnn_forward(mixer, hidden_states, layout, cache_layer=None, backend=None):
        assert cache_layer is None, "the token-by-token oracle runs without a cache"
        state = rnn_mixer_equations(mixer.v_proj(hidden_states), mixer.forget_gate(hidden_states), layout.positions, layout.valid)
        return mixer.o_proj(torch.sigmoid(mixer.output_gate_proj(hidden_states)) * state)

    patched = []
    for module in model.modules():
        if isinstance(module, RatMixer):
            patched.append(module)
            module.forward = rat_forward.__get__(module)
        elif isinstance(module, RatRecurrentMixer):
            patched.append(module)
            module.forward = rnn_forward.__get__(module)
    try:
        yield model
    finally:
        for module in patched:
            del module.forward
