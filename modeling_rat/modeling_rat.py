"""PyTorch RAT model: `RatModel` and `RatForCausalLM`.

Read top to bottom:

1. `RatSequenceLayout`: where each token of a batch sits (its position inside its own sequence, padding, packed
   sequences, what a cache already holds), computed once per forward and shared by all layers.
2. The four token mixers of the paper's model family: `RatMixer` (chunked recurrence + inter-chunk attention),
   `RatRecurrentMixer` (the rnn layer), `RatAttention` (full or sliding-window softmax attention).
3. `RatDecoderLayer`: pre-norm residual block, mixer then GELU MLP.
4. `RatPreTrainedModel`, `RatModel`, `RatForCausalLM`.

The RAT mixer's computations live in `rat_ops.py` (PyTorch reference and fast path) and, on GPUs, `rat_triton.py`.
This folder's files are copied next to saved weights, so that `trust_remote_code=True` loading needs no install.
"""

import math
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from .cache_rat import RatChunkCacheLayer, RatRecurrentCacheLayer, cache_nbytes
from .rat_ops import (
    apply_rotary,
    chunk_attention,
    chunk_scan,
    decode_attention,
    gated_chunk_scan,
    linear_recurrence,
    rat_reference,
    rnn_reference,
    rotary_cos_sin,
    sliding_window_attention,
    tile_groups,
)


from .configuration_rat import RatConfig


logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`.
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


# ================================================================================================ sequence layout


class RatSequenceLayout:
    """
    Where every token of a batch sits, computed once per forward from `attention_mask`, `position_ids` and the cache.

    * `valid` (B, T): False for padding. Padding never enters any state and no real token attends to it.
    * `positions` (B, T): position of each token inside its own sequence (padding and earlier packed sequences do
      not count). Given `position_ids` win; otherwise they are derived from the mask (cumsum - 1), continuing what
      the cache holds, as `generate()` does.
    * A new sequence starts at a row's first real token and wherever a position does not continue the previous real
      token's (sequences packed in one row with positions restarting at 0).
    * `simple`: one sequence per row, from position 0 in column 0, no padding, empty cache: the mixers then reshape
      instead of gathering (the common training and prefill case).
    """

    def __init__(self, valid, positions, simple, past_seen=None, past_columns=0, key_valid=None, key_positions=None):
        self.valid = valid
        self.positions = positions
        self.simple = simple
        self.past_seen = past_seen  # (B,) real tokens the cache holds per row, or None
        self.past_columns = past_columns  # tokens the cache holds per row, padding included
        self.key_valid = key_valid  # (B, past + T): which columns are real tokens (attention layers)
        self.key_positions = key_positions  # (B, past + T): their positions
        self._segments = None
        self._chunk_grids = {}

    @classmethod
    def build(cls, batch_size, seq_len, device, attention_mask=None, position_ids=None, past_columns=0, has_padding=False):
        total = past_columns + seq_len
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(
                    f"RAT models take a 2-D padding mask (batch, tokens), got shape {tuple(attention_mask.shape)}: "
                    "pass the tokenizer's `attention_mask` (1 for real tokens, 0 for padding)."
                )
            if attention_mask.shape != (batch_size, total):
                raise ValueError(
                    f"`attention_mask` has shape {tuple(attention_mask.shape)}, expected ({batch_size}, {total}): one "
                    f"column per token, the {past_columns} the cache holds followed by the {seq_len} new ones."
                )
            key_valid = attention_mask.to(device=device, dtype=torch.bool)
        else:
            if has_padding:
                raise ValueError(
                    "The cache holds a padded batch: pass the full `attention_mask` (past and new tokens) with every "
                    "call, as generate() does, so that padding stays out of the state."
                )
            key_valid = None
        valid = key_valid[:, past_columns:] if key_valid is not None else torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
        key_positions = None
        if key_valid is not None:
            key_positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
            past_seen = key_valid[:, :past_columns].sum(-1)
        else:
            past_seen = torch.full((batch_size,), past_columns, dtype=torch.long, device=device)
        if position_ids is not None:
            positions = position_ids.to(device=device, dtype=torch.long)
            if positions.dim() == 1:
                positions = positions.unsqueeze(0)
            if positions.dim() != 2 or positions.shape[1] != seq_len or positions.shape[0] not in (1, batch_size):
                raise ValueError(
                    f"`position_ids` has shape {tuple(position_ids.shape)} but the input has {batch_size} rows of "
                    f"{seq_len} new tokens: give one position per new token, shape ({batch_size}, {seq_len})."
                )
            positions = positions.expand(batch_size, seq_len)
        elif key_positions is not None:
            positions = key_positions[:, past_columns:]
        else:
            positions = past_columns + torch.arange(seq_len, device=device).unsqueeze(0).expand(batch_size, seq_len)
        positions = torch.where(valid, positions, torch.zeros_like(positions))
        simple = False
        if past_columns == 0 and (key_valid is None or bool(key_valid.all())):
            simple = position_ids is None or bool((positions == torch.arange(seq_len, device=device)).all())
        if key_positions is None:
            key_positions = torch.arange(total, device=device).unsqueeze(0).expand(batch_size, total)
            if position_ids is not None and past_columns == 0:
                key_positions = positions
        return cls(valid, positions, simple, past_seen if past_columns else None, past_columns, key_valid, key_positions)

    # -------------------------------------------------------------------------------------------- segments

    @property
    def segments(self) -> dict:
        if self._segments is None:
            self._segments = self._find_segments()
        return self._segments

    def _find_segments(self) -> dict:
        """The sequences ("segments") of the batch: row, first position and length of each, and each token's one."""
        valid, positions = self.valid, self.positions
        batch_size, seq_len = valid.shape
        device = valid.device
        columns = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
        last_valid = torch.cummax(torch.where(valid, columns, torch.full_like(columns, -1)), dim=1).values
        previous = torch.cat([torch.full_like(last_valid[:, :1], -1), last_valid[:, :-1]], dim=1)
        has_previous = previous >= 0
        previous_position = positions.gather(1, previous.clamp(min=0))
        starts = valid & (~has_previous | (positions != previous_position + 1))
        segment_of_token = torch.where(valid, starts.reshape(-1).long().cumsum(0).reshape(batch_size, seq_len) - 1, -1)
        start_rows, start_columns = starts.nonzero(as_tuple=True)
        num_segments = start_rows.shape[0]
        lengths = torch.bincount(segment_of_token[valid], minlength=num_segments)
        first_positions = positions[start_rows, start_columns]
        continues_cache = torch.zeros(num_segments, dtype=torch.bool, device=device)
        if self.past_seen is not None:
            first_of_row = ~has_previous[start_rows, start_columns]
            continues_cache = first_of_row & (self.past_seen[start_rows] > 0)
            bad = continues_cache & (first_positions != self.past_seen[start_rows])
            if bool(bad.any()):
                row = int(start_rows[bad][0])
                raise ValueError(
                    f"Row {row} continues a cache holding {int(self.past_seen[row])} tokens, so its next position is "
                    f"{int(self.past_seen[row])}, but `position_ids` give {int(first_positions[bad][0])}. Omit "
                    "`position_ids` (they are derived from the attention mask) or make them continue the cache."
                )
            rows_with_history = start_rows[continues_cache]
            segments_per_row = torch.bincount(start_rows, minlength=batch_size)
            if bool((segments_per_row[rows_with_history] > 1).any()):
                raise ValueError("Packed sequences (positions restarting inside a row) cannot continue a cache.")
        return {
            "count": num_segments,
            "row": start_rows,
            "first_position": first_positions,
            "length": lengths,
            "of_token": segment_of_token,
            "continues_cache": continues_cache,
        }

    @property
    def num_sequences(self) -> int:
        """How many sequences (segments) have tokens in this forward."""
        return self.valid.shape[0] if self.simple else self.segments["count"]

    @property
    def has_packed_rows(self) -> bool:
        if self.simple or self.valid.shape[1] == 1:
            return False
        return self.segments["count"] > int(self.valid.any(dim=1).sum())

    def chunk_grid(self, chunk_size: int) -> "ChunkGrid":
        if chunk_size not in self._chunk_grids:
            self._chunk_grids[chunk_size] = ChunkGrid(self, chunk_size)
        return self._chunk_grids[chunk_size]

    def attention_mask_for(self, key_columns: torch.Tensor | None, sliding_window: int | None):
        """
        Boolean mask (B, 1, T, K) of which keys each query sees, or None when `is_causal` suffices. `key_columns`
        (K,) or (B, K) are the columns of the keys (None: the T new tokens themselves, no cache).
        """
        batch_size, seq_len = self.valid.shape
        if key_columns is None:
            if self.simple and sliding_window is None:
                return None
            query_columns = torch.arange(seq_len, device=self.valid.device)
            allowed = query_columns[None, None, :] <= query_columns[None, :, None]
            allowed = allowed & self.valid[:, None, :]
            if not self.simple:
                segment = self.segments["of_token"]
                allowed = allowed & (segment[:, :, None] == segment[:, None, :])
            if sliding_window is not None:
                distance = self.positions[:, :, None] - self.positions[:, None, :]
                allowed = allowed & (distance < sliding_window)
        else:
            query_columns = self.past_columns + torch.arange(seq_len, device=self.valid.device)
            key_columns = key_columns if key_columns.dim() == 2 else key_columns.unsqueeze(0).expand(batch_size, -1)
            total = self.key_positions.shape[1]
            in_range = key_columns < total
            safe_columns = key_columns.clamp(max=total - 1)
            allowed = (key_columns[:, None, :] <= query_columns[None, :, None]) & in_range[:, None, :]
            if self.key_valid is not None:
                allowed = allowed & self.key_valid.gather(1, safe_columns)[:, None, :]
            if sliding_window is not None:
                key_positions = self.key_positions.gather(1, safe_columns)
                distance = self.positions[:, :, None] - key_positions[:, None, :]
                allowed = allowed & (distance < sliding_window)
        # A padding query would see nothing; let it see anything (its output is never used) to avoid NaN.
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
        return allowed.unsqueeze(1)


class ChunkGrid:
    """
    Tokens arranged as (rows, chunks, chunk_size) so that every chunk of every sequence is one row of a tensor:
    each sequence of the batch becomes a grid row whose chunk i is its chunk `first_chunk + i`; token at position p
    sits at (its sequence, p // L - first_chunk, p % L). Empty slots get gate 1 and input 0, which leave a
    recurrence unchanged. In the `simple` layout this is a reshape; otherwise a gather/scatter.
    """

    def __init__(self, layout: RatSequenceLayout, chunk_size: int):
        self.chunk_size = chunk_size
        self.layout = layout
        batch_size, seq_len = layout.valid.shape
        device = layout.valid.device
        if layout.simple:
            self.num_rows = batch_size
            self.num_chunks = max(1, -(-seq_len // chunk_size))
            self.first_chunk = torch.zeros(batch_size, dtype=torch.long, device=device)
            self.row_of_batch = torch.arange(batch_size, device=device)
            self.continues_cache = torch.zeros(batch_size, dtype=torch.bool, device=device)
            self.last_position = torch.full((batch_size,), seq_len - 1, dtype=torch.long, device=device)
            return
        segments = layout.segments
        first_position = segments["first_position"]
        last_position = first_position + segments["length"] - 1
        self.first_chunk = torch.div(first_position, chunk_size, rounding_mode="floor")
        chunk_counts = torch.div(last_position, chunk_size, rounding_mode="floor") - self.first_chunk + 1
        self.num_rows = segments["count"]
        self.num_chunks = int(chunk_counts.max()) if self.num_rows else 1
        self.row_of_batch = segments["row"]
        self.continues_cache = segments["continues_cache"]
        self.last_position = last_position
        valid_flat = layout.valid.reshape(-1)
        self.token_index = valid_flat.nonzero(as_tuple=True)[0]  # flat (B*T) index of each real token
        segment = segments["of_token"].reshape(-1)[self.token_index]
        position = layout.positions.reshape(-1)[self.token_index]
        chunk = torch.div(position, chunk_size, rounding_mode="floor") - self.first_chunk[segment]
        self.grid_index = (segment * self.num_chunks + chunk) * chunk_size + position % chunk_size

    @classmethod
    def whole_sequences(cls, layout: "RatSequenceLayout") -> "ChunkGrid":
        """One grid row per sequence holding all its tokens as a single chunk (for recurrences over sequences)."""
        if layout.simple:
            return cls(layout, layout.valid.shape[1])
        grid = cls.__new__(cls)
        grid.layout = layout
        segments = layout.segments
        grid.num_rows = segments["count"]
        grid.chunk_size = int(segments["length"].max()) if grid.num_rows else 1
        grid.num_chunks = 1
        grid.first_chunk = torch.zeros_like(segments["row"])
        grid.row_of_batch = segments["row"]
        grid.continues_cache = segments["continues_cache"]
        grid.last_position = segments["length"] - 1  # positions counted from each sequence's first token
        grid.token_index = layout.valid.reshape(-1).nonzero(as_tuple=True)[0]
        segment = segments["of_token"].reshape(-1)[grid.token_index]
        offset = layout.positions.reshape(-1)[grid.token_index] - segments["first_position"][segment]
        grid.grid_index = segment * grid.chunk_size + offset
        return grid

    @property
    def chunk_index(self) -> torch.Tensor:
        """(rows, chunks): the absolute chunk index (rotary position) of every grid chunk."""
        return self.first_chunk[:, None] + torch.arange(self.num_chunks, device=self.first_chunk.device)

    def to_grid(self, tokens: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(B, T, *feature) -> (rows, chunks, L, *feature)."""
        batch_size, seq_len = tokens.shape[:2]
        feature = tokens.shape[2:]
        size = self.num_chunks * self.chunk_size
        if self.layout.simple:
            if size != seq_len:
                pad_shape = (batch_size, size - seq_len, *feature)
                tokens = torch.cat([tokens, tokens.new_full(pad_shape, fill)], dim=1)
            return tokens.reshape(batch_size, self.num_chunks, self.chunk_size, *feature)
        flat = tokens.reshape(batch_size * seq_len, *feature)[self.token_index]
        grid = tokens.new_full((self.num_rows * size, *feature), fill)
        grid = grid.index_copy(0, self.grid_index, flat)
        return grid.reshape(self.num_rows, self.num_chunks, self.chunk_size, *feature)

    def from_grid(self, grid: torch.Tensor, seq_len: int) -> torch.Tensor:
        """(rows, chunks, L, *feature) -> (B, T, *feature); padding tokens get zeros."""
        feature = grid.shape[3:]
        if self.layout.simple:
            return grid.reshape(self.num_rows, -1, *feature)[:, :seq_len]
        batch_size = self.layout.valid.shape[0]
        flat = grid.reshape(-1, *feature)[self.grid_index]
        tokens = grid.new_zeros(batch_size * seq_len, *feature).index_copy(0, self.token_index, flat)
        return tokens.reshape(batch_size, seq_len, *feature)

    def last_token(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows, chunks, L, *feature) -> (rows, *feature): the slot of each sequence's last token."""
        chunk = torch.div(self.last_position, self.chunk_size, rounding_mode="floor") - self.first_chunk
        index = chunk * self.chunk_size + self.last_position % self.chunk_size
        flat = grid.reshape(self.num_rows, -1, *grid.shape[3:])
        return flat[torch.arange(self.num_rows, device=grid.device), index]


# ======================================================================================================== mixers


class RatRMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * w, computed in fp32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class RatMLP(nn.Module):
    """down_proj(gelu(up_proj(x))), no biases."""

    def __init__(self, config: RatConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states):
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))


class RatMixer(nn.Module):
    """
    The RAT token mixer. With x the normalised input:

        z = sigmoid(output_gate_proj(x))       v = v_proj(x)       f = sigmoid(forget_gate_proj(x) + forget_gate_bias)
        q = q_proj(x), k = k_proj(x)           (G * d each, tiled over the H heads)

    inside each chunk of L tokens, value and key are summarised by the gated recurrence
    `s_t = f_t * s_{t-1} + (1 - f_t) * x_t` (restarting at each chunk); across chunks, each token attends with one
    softmax to the rotated summaries of all earlier chunks plus its own running summary (rotary angle = chunk
    index); the output is `o_proj(z * attention)`.
    """

    def __init__(self, config: RatConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.num_qk_groups = config.num_qk_groups
        self.chunk_size = config.chunk_size
        self.output_gate_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.forget_gate_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.forget_gate_bias = nn.Parameter(torch.zeros(self.hidden_size))
        self.q_proj = nn.Linear(self.hidden_size, self.num_qk_groups * self.head_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.num_qk_groups * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, layout: RatSequenceLayout, cache_layer=None) -> torch.Tensor:
        implementation = resolve_rat_implementation(self.config, hidden_states.device, hidden_states.dtype)
        if cache_layer is not None and not isinstance(cache_layer, RatChunkCacheLayer):
            raise ValueError(
                f"Layer {self.layer_idx} is a RAT layer but its cache layer is a {type(cache_layer).__name__}: the cache "
                "belongs to another model (or was not built from this model's config). Let the model create it, or use "
                "DynamicCache(config=model.config)."
            )
        if implementation == "reference":
            if cache_layer is not None:
                raise ValueError(
                    "rat_implementation='reference' is the plain test oracle and runs without a cache: call it with "
                    "use_cache=False, or use the 'fast' implementation."
                )
            attention = rat_reference(
                self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states),
                self._forget_gate(hidden_states), layout.positions, layout.valid,
                self.chunk_size, self.num_heads, self.config.rope_theta,
            )
        elif cache_layer is not None and hidden_states.shape[1] == 1 and cache_layer.is_initialized:
            attention = self._decode_step(
                self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states),
                self._forget_gate(hidden_states), layout, cache_layer, implementation,
            )
        else:
            attention = self._chunked(hidden_states, layout, cache_layer, implementation)
        # The output gate is computed last, so that it is not held while the attention is computed.
        return self.o_proj(torch.sigmoid(self.output_gate_proj(hidden_states)) * attention)

    def _forget_gate(self, hidden_states):
        """f = sigmoid(W_f x + b_f), in fp32."""
        return torch.sigmoid(self.forget_gate_proj(hidden_states).float() + self.forget_gate_bias.float())

    # ----------------------------------------------------------------------------------------- fast path

    def _chunked(self, hidden_states, layout, cache_layer, implementation="fast"):
        """
        Any number of tokens: the chunk scan on the grid of chunks, then one inter-chunk attention call. Projections
        are computed where they are needed and dropped after use, which keeps the peak memory low.
        """
        chunk_scan, chunk_attention = _rat_kernels(implementation)
        batch_size, seq_len, hidden_size = hidden_states.shape
        heads, head_dim, chunk_size = self.num_heads, self.head_dim, self.chunk_size
        groups, copies = self.num_qk_groups, heads // self.num_qk_groups
        device = hidden_states.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else self.v_proj.weight.dtype
        if cache_layer is not None:
            cache_layer.prepare(batch_size, heads, head_dim, chunk_size, dtype, device)
        if layout.num_sequences == 0:  # only padding: nothing enters the state, outputs are never used
            if cache_layer is not None:
                cache_layer.skip_columns(seq_len)
            return hidden_states.new_zeros(hidden_states.shape)
        grid = layout.chunk_grid(chunk_size)

        initial_state, history_keys, history_values, history_count = None, None, None, None
        if cache_layer is not None and bool(grid.continues_cache.any()):
            rows = grid.row_of_batch
            seen = cache_layer.seen[rows]
            resume = grid.continues_cache & (seen % chunk_size != 0)
            initial_state = torch.where(resume[:, None, None], cache_layer.running_state[rows], 0.0)
            history_count = torch.where(grid.continues_cache, cache_layer.completed_chunks()[rows], 0)
            num_history = int(history_count.max())
            history_keys = cache_layer.keys[rows, :, :num_history]
            history_values = cache_layer.values[rows, :, :num_history]

        states = gated_chunk_scan(  # (N, C, L, 2, D) fp32: running [value, key] sums
            grid.to_grid(self._forget_gate(hidden_states), fill=1.0),
            grid.to_grid(self.v_proj(hidden_states)),
            grid.to_grid(self.k_proj(hidden_states)),
            initial_state,
            scan=chunk_scan if implementation == "triton" else None,
        )
        num_rows, num_chunks = states.shape[:2]
        running_value, running_key = (  # one backward node for both (selects would each zero-fill a gradient)
            stream.reshape(num_rows, num_chunks, chunk_size, heads, head_dim) for stream in states.unbind(dim=-2)
        )
        # Queries stay in their G groups until the attention call: rotation and the own score need no tiling.
        query_grid = grid.to_grid(self.q_proj(hidden_states)).float().reshape(
            num_rows, num_chunks, chunk_size, 1, groups, head_dim
        )
        cos, sin = rotary_cos_sin(grid.chunk_index, head_dim, self.config.rope_theta, torch.float32)  # (N, C, d)
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
        if history_keys is not None:
            keys = torch.cat([history_keys, keys], dim=2)
            values = torch.cat([history_values, values], dim=2)
        attention = chunk_attention(
            query_rotated.permute(0, 2, 3, 1, 4),
            own_score.permute(0, 2, 3, 1),
            running_value.to(dtype).permute(0, 2, 3, 1, 4),
            keys,
            values,
            history_count,
            scale=1.0 / math.sqrt(head_dim),
        )  # (N, L, H, C, d)
        del query_rotated, query_grid, own_score, running_key  # free what autograd does not keep
        attention = attention.permute(0, 3, 1, 2, 4).reshape(num_rows, num_chunks, chunk_size, hidden_size)
        if cache_layer is not None:
            self._store(cache_layer, grid, layout, states, key_summaries, value_summaries)
        del states, running_value
        return grid.from_grid(attention, seq_len)

    def _store(self, cache_layer, grid, layout, states, key_summaries, value_summaries):
        """Write what the tokens of this call leave behind into the cache: new chunk summaries and running state."""
        seq_len = layout.valid.shape[1]
        rows = grid.row_of_batch  # one grid row per batch row with tokens (packed rows cannot use a cache)
        seen_after = grid.last_position + 1
        new_completed = torch.div(seen_after, self.chunk_size, rounding_mode="floor") - grid.first_chunk
        cache_layer.reserve(seq_len)
        most_completed = int(new_completed.max())
        if most_completed > 0:
            offsets = torch.arange(most_completed, device=rows.device)
            take = offsets[None, :] < new_completed[:, None]
            grid_rows = torch.arange(grid.num_rows, device=rows.device)[:, None].expand(-1, most_completed)[take]
            chunks = offsets[None, :].expand(grid.num_rows, -1)[take]
            cache_layer.write_summaries(
                rows[grid_rows], grid.first_chunk[grid_rows] + chunks,
                key_summaries[grid_rows, chunks], value_summaries[grid_rows, chunks],
            )
        running_state = cache_layer.running_state.clone()
        running_state[rows] = grid.last_token(states).to(running_state.dtype)
        seen = cache_layer.seen.clone()
        seen[rows] = seen_after
        column_states = None
        if cache_layer.record_past:
            per_token = grid.from_grid(states, seq_len)
            column_states = _states_after_each_column(per_token, layout.valid, cache_layer.running_state)
        cache_layer.commit(running_state, seen, seq_len, column_states, layout.valid)

    def _decode_step(self, query, key, value, forget_gate, layout, cache_layer, implementation="fast"):
        """One new column per row on top of the cache: O(chunks) work, no recomputation of the prefix."""
        batch_size, _, hidden_size = value.shape
        heads, head_dim, chunk_size = self.num_heads, self.head_dim, self.chunk_size
        dtype = value.dtype
        cache_layer.prepare(batch_size, heads, head_dim, chunk_size, dtype, value.device)
        cache_layer.reserve(1)
        valid = layout.valid[:, 0]
        seen = cache_layer.seen
        index_in_chunk = seen % chunk_size
        chunk = torch.div(seen, chunk_size, rounding_mode="floor")
        gate = forget_gate[:, 0]  # (B, D) fp32
        stream = torch.stack([value[:, 0], tile_groups(key[:, 0], self.num_qk_groups, heads)], dim=1).float()
        previous = torch.where((index_in_chunk == 0)[:, None, None], 0.0, cache_layer.running_state)
        state = gate[:, None] * previous + (1 - gate[:, None]) * stream  # (B, 2, D)
        running_value = state[:, 0].reshape(batch_size, heads, head_dim)
        running_key = state[:, 1].reshape(batch_size, heads, head_dim)
        query_heads = tile_groups(query[:, 0], self.num_qk_groups, heads).reshape(batch_size, heads, head_dim).float()
        cos, sin = rotary_cos_sin(chunk, head_dim, self.config.rope_theta, torch.float32)  # (B, d)
        query_rotated = apply_rotary(query_heads, cos[:, None], sin[:, None])
        own_score = (query_heads * running_key).sum(-1)
        capacity = cache_layer.keys.shape[2]
        # the first `chunk` cached summaries of each row are its earlier chunks
        if implementation == "triton":  # its decode kernel: one program per row and head
            _, triton_chunk_attention = _rat_kernels(implementation)
            attention = triton_chunk_attention(
                query_rotated.to(dtype)[:, None, :, None], own_score[:, None, :, None],
                running_value.to(dtype)[:, None, :, None], cache_layer.keys, cache_layer.values, chunk,
                scale=1.0 / math.sqrt(head_dim),
            )
        else:
            attention = decode_attention(
                query_rotated.to(dtype), own_score, running_value.to(dtype), cache_layer.keys, cache_layer.values,
                chunk, scale=1.0 / math.sqrt(head_dim),
            )  # (B, H, d)
        if capacity > 0:  # rows whose chunk this token completes store its summary in slot `chunk`
            completes = (valid & (index_in_chunk == chunk_size - 1))[:, None, None]
            rows = torch.arange(batch_size, device=value.device)
            slot = chunk.clamp(max=capacity - 1)
            new_key = apply_rotary(running_key, cos[:, None], sin[:, None])
            cache_layer.write_summaries(
                rows, slot,
                torch.where(completes, new_key.to(dtype), cache_layer.keys[rows, :, slot]),
                torch.where(completes, running_value.to(dtype), cache_layer.values[rows, :, slot]),
            )
        running_state = torch.where(valid[:, None, None], state, cache_layer.running_state)
        cache_layer.commit(running_state, seen + valid.long(), 1, running_state[:, None], valid[:, None])
        return attention.reshape(batch_size, 1, hidden_size)


def _states_after_each_column(per_token: torch.Tensor, valid: torch.Tensor, previous_state: torch.Tensor):
    """(B, T, S, D) state after each column, for rollback: padding columns repeat the state before them."""
    batch_size, seq_len = valid.shape
    columns = torch.arange(seq_len, device=valid.device).expand(batch_size, seq_len)
    last_valid = torch.cummax(torch.where(valid, columns, torch.full_like(columns, -1)), dim=1).values
    per_token = per_token.float()
    gathered = per_token.gather(1, last_valid.clamp(min=0)[:, :, None, None].expand_as(per_token))
    return torch.where((last_valid < 0)[:, :, None, None], previous_state[:, None].to(gathered.dtype), gathered)


class RatRecurrentMixer(nn.Module):
    """The rnn layer: the RAT recurrence over whole sequences (no chunks, no attention): o_proj(z * s_t)."""

    def __init__(self, config: RatConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.output_gate_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.v_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.forget_gate_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)
        self.forget_gate_bias = nn.Parameter(torch.zeros(self.hidden_size))
        self.o_proj = nn.Linear(self.hidden_size, self.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, layout: RatSequenceLayout, cache_layer=None) -> torch.Tensor:
        output_gate = torch.sigmoid(self.output_gate_proj(hidden_states))
        value = self.v_proj(hidden_states)
        forget_gate = torch.sigmoid(self.forget_gate_proj(hidden_states).float() + self.forget_gate_bias.float())
        if cache_layer is not None and not isinstance(cache_layer, RatRecurrentCacheLayer):
            raise ValueError(
                f"Layer {self.layer_idx} is an rnn layer but its cache layer is a {type(cache_layer).__name__}: the "
                "cache belongs to another model. Let the model create it, or use DynamicCache(config=model.config)."
            )
        if resolve_rat_implementation(self.config, hidden_states.device) == "reference":
            if cache_layer is not None:
                raise ValueError("rat_implementation='reference' runs without a cache: pass use_cache=False.")
            state = rnn_reference(value, forget_gate, layout.positions, layout.valid)
        elif cache_layer is not None and hidden_states.shape[1] == 1 and cache_layer.is_initialized:
            state = self._decode_step(value, forget_gate, layout, cache_layer)
        else:
            state = self._scan(value, forget_gate, layout, cache_layer)
        return self.o_proj(output_gate * state)

    def _scan(self, value, forget_gate, layout, cache_layer):
        """Any number of tokens: `linear_recurrence` over each sequence, continuing the cache's state."""
        batch_size, seq_len, hidden_size = value.shape
        inputs = ((1 - forget_gate) * value.float()).unsqueeze(-2)  # (B, T, 1, D)
        if cache_layer is not None:
            cache_layer.prepare(batch_size, hidden_size, value.device)
        if layout.num_sequences == 0:  # only padding
            if cache_layer is not None:
                cache_layer.skip_columns(seq_len)
            return value.new_zeros(value.shape)
        grid = ChunkGrid.whole_sequences(layout)
        gates = grid.to_grid(forget_gate, fill=1.0)[:, 0]  # (N, longest, D)
        grid_inputs = grid.to_grid(inputs)[:, 0]  # (N, longest, 1, D)
        initial = None
        if cache_layer is not None and bool(grid.continues_cache.any()):
            initial = torch.where(grid.continues_cache[:, None, None], cache_layer.running_state[grid.row_of_batch], 0.0)
        states = linear_recurrence(gates, grid_inputs, initial)  # (N, longest, 1, D)
        per_token = grid.from_grid(states.unsqueeze(1), seq_len)  # (B, T, 1, D)
        if cache_layer is not None:
            running_state = cache_layer.running_state.clone()
            running_state[grid.row_of_batch] = grid.last_token(states.unsqueeze(1)).to(running_state.dtype)
            column_states = None
            if cache_layer.record_past:
                column_states = _states_after_each_column(per_token, layout.valid, cache_layer.running_state)
            seen = cache_layer.seen + layout.valid.long().sum(1)
            cache_layer.commit(running_state, seen, seq_len, column_states, layout.valid)
        return per_token[:, :, 0].to(value.dtype)

    def _decode_step(self, value, forget_gate, layout, cache_layer):
        """One new column per row on top of the cache's state."""
        batch_size, _, hidden_size = value.shape
        cache_layer.prepare(batch_size, hidden_size, value.device)
        valid = layout.valid[:, 0]
        gate = forget_gate[:, :1]  # (B, 1, D)
        state = gate * cache_layer.running_state + (1 - gate) * value[:, :1].float()
        running_state = torch.where(valid[:, None, None], state, cache_layer.running_state)
        cache_layer.commit(running_state, cache_layer.seen + valid.long(), 1, running_state[:, None], valid[:, None])
        return state.to(value.dtype)


class RatAttention(nn.Module):
    """Multi-head softmax attention (full or sliding window) with token-level rotary embeddings, through SDPA."""

    def __init__(self, config: RatConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window if config.layer_types[layer_idx] == "sliding_attention" else None
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor, layout: RatSequenceLayout, cache_layer=None) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = rotary_cos_sin(layout.positions, self.head_dim, self.config.rope_theta, query.dtype)
        query = apply_rotary(query, cos[:, None], sin[:, None])
        key = apply_rotary(key, cos[:, None], sin[:, None])
        if cache_layer is None:
            mask = None if layout.simple and self.sliding_window is not None and seq_len > 2 * self.sliding_window else (
                layout.attention_mask_for(None, self.sliding_window)
            )
        else:
            self._check_cache_layer(cache_layer, batch_size, layout.past_columns)
            key, value = cache_layer.update(key, value)
            total = layout.past_columns + seq_len  # columns the cache holds now
            returned = key.shape[2]
            key_columns = max(total - returned, 0) + torch.arange(returned, device=key.device)
            mask = layout.attention_mask_for(key_columns, self.sliding_window)
        long_window_prefill = (
            self.sliding_window is not None and layout.simple and key.shape[2] == seq_len and seq_len > 2 * self.sliding_window
        )
        if long_window_prefill:  # blocks of queries: O(T * window) time and memory instead of a T x T mask
            out = sliding_window_attention(query, key, value, self.sliding_window)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(batch_size, seq_len, -1))

    def _check_cache_layer(self, cache_layer, batch_size, past_columns):
        kind = "sliding-window" if self.sliding_window is not None else "full"
        is_sliding = bool(getattr(cache_layer, "is_sliding", False))
        window = getattr(cache_layer, "sliding_window", None)
        if isinstance(cache_layer, (RatChunkCacheLayer, RatRecurrentCacheLayer)) or is_sliding != (
            self.sliding_window is not None
        ) or (window is not None and self.sliding_window is not None and window != self.sliding_window):
            raise ValueError(
                f"Layer {self.layer_idx} is a {kind} attention layer but its cache layer is a "
                f"{type(cache_layer).__name__}: the cache belongs to another model. Let the model create its cache."
            )
        if not cache_layer.is_compileable and int(cache_layer.get_seq_length()) != past_columns:
            raise ValueError(
                f"The cache layers disagree: layer {self.layer_idx} holds {int(cache_layer.get_seq_length())} tokens, "
                f"the cache {past_columns}. Was the cache modified by hand? Start from a new cache."
            )
        keys = getattr(cache_layer, "keys", None)
        if torch.is_tensor(keys) and keys.dim() == 4 and keys.numel() > 0:
            if keys.shape[0] != batch_size:
                raise ValueError(
                    f"The cache holds {keys.shape[0]} sequences but the input has batch size {batch_size}: pass "
                    "inputs with the cache's batch size, or start from a new cache."
                )
            if tuple(keys.shape[1:2]) + tuple(keys.shape[3:]) != (self.num_heads, self.head_dim):
                raise ValueError(
                    f"The cache of layer {self.layer_idx} holds {keys.shape[1]} heads of size {keys.shape[3]}, the model "
                    f"has {self.num_heads} of size {self.head_dim}: the cache belongs to another model."
                )


MIXER_CLASSES = {
    "rat": RatMixer,
    "rnn": RatRecurrentMixer,
    "full_attention": RatAttention,
    "sliding_attention": RatAttention,
}


def resolve_rat_implementation(config: RatConfig, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """
    The path RAT layers take: the configured one, or for "auto" the fastest available for the device: the Triton
    kernels on CUDA when triton is installed (and the dtype is one they take), else the fast PyTorch path.
    """
    requested = getattr(config, "rat_implementation", "auto")
    if requested == "triton":
        from .rat_triton import TRITON_IMPORT_ERROR, triton_is_usable

        if not triton_is_usable(device, dtype):
            reason = f"triton cannot be imported ({TRITON_IMPORT_ERROR})" if TRITON_IMPORT_ERROR else (
                f"the kernels take CUDA tensors (or CPU tensors under TRITON_INTERPRET=1) of dtype float32, bfloat16 or "
                f"float16, got {device} {dtype}"
            )
            raise ValueError(f"rat_implementation='triton' cannot run here: {reason}. Use 'auto' or 'fast'.")
        return "triton"
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda":
        from .rat_triton import triton_is_usable

        if triton_is_usable(device, dtype):
            _log_once(logger.info_once, "RAT layers run the Triton kernels (rat_implementation='auto' on CUDA).")
            return "triton"
        _log_once(
            logger.warning_once,
            "RAT layers run the fast PyTorch path on CUDA: the Triton kernels need `triton` installed and float32, "
            "bfloat16 or float16 activations.",
        )
        return "fast"
    _log_once(logger.info_once, "RAT layers run the fast PyTorch path (rat_implementation='auto' off CUDA).")
    return "fast"


def _log_once(log, message: str):
    """Log outside torch.compile tracing only (a logging call inside a traced forward breaks the graph)."""
    if not torch.compiler.is_compiling():
        log(message)


def _rat_kernels(implementation: str):
    """(chunk_scan, chunk_attention) of the chosen path: the Triton kernels or the PyTorch ones of `rat_ops`."""
    if implementation == "triton":
        from .rat_triton import chunk_attention as triton_chunk_attention
        from .rat_triton import chunk_scan as triton_chunk_scan

        return triton_chunk_scan, triton_chunk_attention
    return chunk_scan, chunk_attention


# ================================================================================================ decoder layer


class RatDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: h = x + mixer(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: RatConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.mixer_norm = RatRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = MIXER_CLASSES[self.layer_type](config, layer_idx)
        self.mlp_norm = RatRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = RatMLP(config)

    def forward(self, hidden_states: torch.Tensor, layout: RatSequenceLayout, cache_layer=None) -> torch.Tensor:
        hidden_states = hidden_states + self.mixer(self.mixer_norm(hidden_states), layout, cache_layer)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


# ====================================================================================================== models


class RatPreTrainedModel(PreTrainedModel):
    config_class = RatConfig
    config: RatConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["RatDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _is_stateful = False  # the cache rolls back exactly (see cache_rat.py), so assisted decoding works

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a safetensors weight file that cannot be read is named in the error."""
        from safetensors import SafetensorError, safe_open

        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:
            damaged = []
            if pretrained_model_name_or_path is not None and Path(pretrained_model_name_or_path).is_dir():
                for path in sorted(Path(pretrained_model_name_or_path).glob("*.safetensors")):
                    try:
                        with safe_open(path, framework="pt"):
                            pass
                    except SafetensorError:
                        damaged.append(str(path))
            where = ", ".join(damaged) or f"a safetensors weight file of {pretrained_model_name_or_path}"
            raise OSError(
                f"{where} cannot be read ({error}): it is truncated or not a safetensors file. Save the model again, or "
                "download it again (`force_download=True`)."
            ) from error

    @torch.no_grad()
    def _init_weights(self, module):
        """SPEC section 3: N(0, initializer_range) weights, unit norms, forget-gate bias log(U(1, L - 1))."""
        try:
            from transformers import initialization as init  # guards weights loaded from a checkpoint
        except ImportError:  # older transformers: its loader skips loaded weights itself
            init = nn.init
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RatRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, (RatMixer, RatRecurrentMixer)):
            # The official range U(1, L - 1) is empty for L <= 2 (chunks of one or two tokens): use U(1, 2) then.
            if isinstance(module, RatMixer):
                upper = max(self.config.chunk_size - 1, 2)
            else:
                upper = max(self.config.max_position_embeddings - 1, 2)
            bias = torch.empty_like(module.forget_gate_bias, dtype=torch.float32).uniform_(1.0, float(upper)).log_()
            if hasattr(init, "copy_"):
                init.copy_(module.forget_gate_bias, bias.to(module.forget_gate_bias.dtype))
            elif not getattr(module.forget_gate_bias, "_is_hf_initialized", False):
                module.forget_gate_bias.copy_(bias)


class RatModel(RatPreTrainedModel):
    """Embedding, blocks, final RMSNorm."""

    def __init__(self, config: RatConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([RatDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RatRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` and `inputs_embeds`.")
        if output_attentions:
            raise ValueError("RAT models do not return attention weights (RAT layers attend to chunk summaries).")
        if cache is None:
            cache = past_key_values
        elif past_key_values is not None:
            raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both.")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and (use_cache or cache is not None):
            logger.warning_once("A cache is not used with gradient checkpointing during training (`use_cache=False`).")
            use_cache, cache = False, None
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]
        if seq_len == 0:
            cached = int(cache.get_seq_length()) if cache is not None else 0
            raise ValueError(
                "The input has no new token" + (f" (the cache already holds {cached} tokens)" if cached else "") + ": "
                "with a cache, pass the whole sequence to generate() (the cached tokens followed by the new ones), or "
                "at least one new token to forward()."
            )
        if cache is not None and not isinstance(cache, Cache):
            raise TypeError(f"`cache` must be a transformers `Cache` (e.g. DynamicCache), got {type(cache).__name__}.")

        if cache is None:
            past_columns = 0
        elif attention_mask is not None and attention_mask.dim() == 2:  # no device sync (compiled decoding)
            past_columns = attention_mask.shape[1] - seq_len
            if not torch.compiler.is_compiling() and past_columns != int(cache.get_seq_length()):
                raise ValueError(
                    f"`attention_mask` has {attention_mask.shape[1]} columns but the cache holds "
                    f"{int(cache.get_seq_length())} tokens and {seq_len} are new: the mask must cover both "
                    f"(expected ({batch_size}, {int(cache.get_seq_length()) + seq_len}))."
                )
        else:
            past_columns = int(cache.get_seq_length())
        layout = RatSequenceLayout.build(
            batch_size, seq_len, inputs_embeds.device, attention_mask, position_ids, past_columns,
            has_padding=bool(getattr(cache, "_rat_has_padding", False)),
        )
        if use_cache and cache is None:
            if layout.has_packed_rows:
                use_cache = False  # packed sequences have no single state to continue
            else:
                cache = DynamicCache(config=self.config)
        if cache is not None:
            if layout.has_packed_rows:
                raise ValueError("Packed sequences (positions restarting inside a row) cannot be used with a cache.")
            if len(cache.layers) != self.config.num_hidden_layers:
                raise ValueError(
                    f"The cache has {len(cache.layers)} layers but the model has {self.config.num_hidden_layers}: it "
                    "belongs to another model."
                )
            if seq_len > 1 and layout.key_valid is not None and not bool(layout.key_valid.all()):
                cache._rat_has_padding = True  # later calls must bring the mask (checked in the layout)

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for layer_idx, decoder_layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            cache_layer = cache.layers[layer_idx] if cache is not None else None
            hidden_states = decoder_layer(hidden_states, layout, cache_layer=cache_layer)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            **{CACHE_FIELD: cache if use_cache or cache is not None else None},
        )


class RatForCausalLM(RatPreTrainedModel, GenerationMixin):
    """RAT language model: `RatModel` and a linear head tied to the embedding (by default)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: RatConfig):
        super().__init__(config)
        self.model = RatModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def set_rat_implementation(self, implementation: str):
        """Choose how RAT layers run: "auto", "fast", "reference" or "triton" (see `RatConfig`)."""
        self.config.rat_implementation = implementation
        self.config._check_rat_arguments(self.config.head_dim)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache if cache is not None else past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss_kwargs = {k: v for k, v in kwargs.items() if k in ("num_items_in_batch", "ignore_index", "shift_labels")}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        if return_dict is False:
            return output.to_tuple()
        return output


__all__ = ["RatPreTrainedModel", "RatModel", "RatForCausalLM", "RatSequenceLayout", "cache_nbytes"]
