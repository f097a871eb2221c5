"""PyTorch RAT model: `RatModel`, `RatForCausalLM` and task heads.

Read top to bottom:

1. `RatRMSNorm`, `RatMLP`: the block's norm and GELU MLP.
2. The token mixers of the paper's model family: `RatMixer` (chunked recurrence + inter-chunk attention) and
   `RatRecurrentMixer` (the rnn layer), both on `RatGatedRecurrence`; `RatAttention` (full or sliding window).
3. `RatDecoderLayer`: pre-norm residual block, mixer then MLP.
4. `RatPreTrainedModel`, `RatModel`, `RatForCausalLM`.
5. Task heads (transformers' generic heads): `RatForSequenceClassification`, `RatForTokenClassification`,
   `RatForQuestionAnswering`.

Beside this file: `rat_inputs.py` (clear errors for inputs that cannot be right), `rat_layout.py` (where each
token of a batch sits: padding, packing, the grid of chunks),
`rat_backends.py` (the table of ways RAT layers compute: reference, fast PyTorch, Triton), `rat_ops.py` (the PyTorch
computations), `rat_triton.py` (GPU kernels), `cache_rat.py` (the cache layers, which own their state). These files
are copied next to saved weights, so that `trust_remote_code=True` loading needs no install.
"""

import functools
import math
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import (
    GenericForQuestionAnswering,
    GenericForSequenceClassification,
    GenericForTokenClassification,
    GradientCheckpointingLayer,
)
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutputWithPast
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple

from .cache_rat import (
    RatChunkCacheLayer,
    RatRecurrentCacheLayer,
    adopt_cache_layers,
    cache_dtype_error,
    cache_nbytes,
    detach_cache,
    holds_padding,
    note_padding,
)
from .rat_backends import RatBackend, select_rat_backend
from .rat_inputs import validate_loss_inputs, validate_model_inputs
from .rat_layout import RatSequenceLayout
from .rat_ops import apply_rotary, attention_containing_faults, rotary_cos_sin, tile_groups


from .configuration_rat import RatConfig


logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache`.
CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"


def accepts_past_key_values(forward):
    """
    The forwards take the cache as `cache` and accept the name transformers used before 5.24, `past_key_values`: with
    5.24's deprecation warning (as its own models give), or silently before 5.24, where it is the name that generate()
    and the generic task heads pass.
    """
    if CACHE_FIELD == "cache":
        return deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")(forward)

    @functools.wraps(forward)
    def forward_taking_past_key_values(self, *args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            if kwargs.get("cache") is not None:
                raise ValueError("Pass the cache as `cache` or as `past_key_values`, not both.")
            kwargs["cache"] = past_key_values
        return forward(self, *args, **kwargs)

    return forward_taking_past_key_values


# ========================================================================================================= blocks


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


# ======================================================================================================== mixers


class RatGatedRecurrence(nn.Module):
    """
    What the RAT and rnn mixers share: the gated recurrence `s_t = f_t * s_{t-1} + (1 - f_t) * v_t` with the forget
    gate `f = sigmoid(forget_gate_proj(x) + forget_gate_bias)` (fp32), the output gate `z = sigmoid(
    output_gate_proj(x))`, `o_proj(z * mixed)`; a cache layer of their own kind; one new token on a filled cache
    (decoding) or any number of tokens (a sequence). Subclasses compute `mixed` in `_sequence` and `_decode`.
    """

    cache_layer_class = None

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

    def forward(self, hidden_states, layout: RatSequenceLayout, cache_layer=None, backend: RatBackend | None = None):
        if backend is None:
            backend = select_rat_backend(self.config, hidden_states.device, hidden_states.dtype)
        if cache_layer is not None and not isinstance(cache_layer, self.cache_layer_class):
            raise ValueError(
                f"Layer {self.layer_idx} is a {self.config.layer_types[self.layer_idx]} layer but its cache layer is a "
                f"{type(cache_layer).__name__}: the cache belongs to another model (or was not built from this model's "
                "config). Let the model create it, or use DynamicCache(config=model.config)."
            )
        if cache_layer is not None and hidden_states.shape[1] == 1 and not cache_layer.is_empty:
            mixed = self._decode(hidden_states, layout, cache_layer, backend)
        else:
            mixed = self._sequence(hidden_states, layout, cache_layer, backend)
        # The output gate is computed last, so that it is not held while the mixing is computed.
        return self.o_proj(torch.sigmoid(self.output_gate_proj(hidden_states)) * mixed)

    def forget_gate(self, hidden_states):
        """f = sigmoid(W_f x + b_f), in fp32."""
        return torch.sigmoid(self.forget_gate_proj(hidden_states).float() + self.forget_gate_bias.float())

    def compute_dtype(self, hidden_states):
        """The dtype of the projections' outputs (autocast's when it is on)."""
        device_type = hidden_states.device.type
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else self.v_proj.weight.dtype


class RatMixer(RatGatedRecurrence):
    """
    The RAT token mixer. With x the normalised input:

        z = sigmoid(output_gate_proj(x))       v = v_proj(x)       f = sigmoid(forget_gate_proj(x) + forget_gate_bias)
        q = q_proj(x), k = k_proj(x)           (G * d each, tiled over the H heads: head h reads group h % G)

    inside each chunk of L tokens, value and key are summarised by the gated recurrence (restarting at each chunk);
    across chunks, each token attends with one softmax to the rotated summaries of all earlier chunks plus its own
    running summary (rotary angle = chunk index); the output is `o_proj(z * attention)`.
    """

    cache_layer_class = RatChunkCacheLayer

    def __init__(self, config: RatConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.num_qk_groups = config.num_qk_groups
        self.chunk_size = config.chunk_size
        self.q_proj = nn.Linear(self.hidden_size, self.num_qk_groups * self.head_dim, bias=False)
        self.k_proj = nn.Linear(self.hidden_size, self.num_qk_groups * self.head_dim, bias=False)

    def _sequence(self, hidden_states, layout, cache_layer, backend):
        """
        Any number of tokens: the chunk scan and the inter-chunk attention on the grid of chunks, in one call from
        the projections to the attention output (on the fast path a blocked function that recomputes the states in
        its backward, so that a training step keeps little more than the projections).
        """
        batch_size, seq_len, _ = hidden_states.shape
        if cache_layer is not None:
            cache_layer.prepare(
                batch_size, self.num_heads, self.head_dim, self.chunk_size, self.compute_dtype(hidden_states), hidden_states.device
            )
        grid = layout.chunk_grid(self.chunk_size)
        resume = cache_layer.resume(grid.batch_row) if cache_layer is not None else None
        cos, sin = rotary_cos_sin(grid.chunk_index, self.head_dim, self.config.rope_theta, torch.float32)  # (N, C, d)
        result = backend.chunk_mixing(
            grid.to_grid(self.forget_gate(hidden_states), fill=1.0),
            grid.to_grid(self.v_proj(hidden_states)),
            grid.to_grid(self.k_proj(hidden_states)),
            grid.to_grid(self.q_proj(hidden_states)),
            cos,
            sin,
            1.0 / math.sqrt(self.head_dim),
            *((resume.initial_state, resume.keys, resume.values, resume.num_chunks) if resume is not None else ()),
            return_states=cache_layer is not None,
        )
        if cache_layer is not None:
            cache_layer.append(
                grid.batch_row, grid.new_tokens, grid.last_token(result.states), layout.valid,
                column_states=lambda: grid.from_grid(result.states, seq_len),
                key_summaries=result.key_summaries, value_summaries=result.value_summaries,
            )
        return grid.from_grid(result.mixed, seq_len)

    def _decode(self, hidden_states, layout, cache_layer, backend):
        """One new column per row on top of the cache: O(chunks) work, no recomputation of the prefix."""
        batch_size, _, hidden_size = hidden_states.shape
        heads, head_dim = self.num_heads, self.head_dim
        dtype = self.compute_dtype(hidden_states)
        cache_layer.prepare(batch_size, heads, head_dim, self.chunk_size, dtype, hidden_states.device)
        step = cache_layer.next_token()
        gate = self.forget_gate(hidden_states)[:, 0, None]  # (B, 1, D) fp32
        key = tile_groups(self.k_proj(hidden_states)[:, 0], self.num_qk_groups, heads)
        stream = torch.stack([self.v_proj(hidden_states)[:, 0], key], dim=1).float()
        state = gate * step.previous_state + (1 - gate) * stream  # (B, 2, D)
        running_value = state[:, 0].reshape(batch_size, heads, head_dim)
        running_key = state[:, 1].reshape(batch_size, heads, head_dim)
        query = tile_groups(self.q_proj(hidden_states)[:, 0], self.num_qk_groups, heads)
        query = query.reshape(batch_size, heads, head_dim).float()
        cos, sin = rotary_cos_sin(step.chunk, head_dim, self.config.rope_theta, torch.float32)  # (B, d)
        attention = backend.decode_attention(
            apply_rotary(query, cos[:, None], sin[:, None]).to(dtype),
            (query * running_key).sum(-1),
            running_value.to(dtype),
            step.keys,
            step.values,
            step.chunk,
            scale=1.0 / math.sqrt(head_dim),
        )  # (B, H, d)
        cache_layer.append_token(
            state, layout.valid[:, 0],
            key_summary=apply_rotary(running_key, cos[:, None], sin[:, None]), value_summary=running_value,
        )
        return attention.reshape(batch_size, 1, hidden_size)


class RatRecurrentMixer(RatGatedRecurrence):
    """The rnn layer: the RAT recurrence over whole sequences (no chunks, no attention): o_proj(z * s_t)."""

    cache_layer_class = RatRecurrentCacheLayer

    def _sequence(self, hidden_states, layout, cache_layer, backend):
        """Any number of tokens: the recurrence over each sequence, continuing the cache's state."""
        batch_size, seq_len, hidden_size = hidden_states.shape
        gate = self.forget_gate(hidden_states)
        inputs = ((1 - gate) * self.v_proj(hidden_states).float()).unsqueeze(-2)  # (B, T, 1, D)
        if cache_layer is not None:
            cache_layer.prepare(batch_size, hidden_size, hidden_states.device)
        grid = layout.sequence_grid()
        resume = cache_layer.resume(grid.batch_row) if cache_layer is not None else None
        states = backend.linear_recurrence(
            grid.to_grid(gate, fill=1.0)[:, 0],
            grid.to_grid(inputs)[:, 0],
            resume.initial_state if resume is not None else None,
        ).unsqueeze(1)  # (N, 1, longest, 1, D)
        if cache_layer is not None:
            cache_layer.append(
                grid.batch_row, grid.new_tokens, grid.last_token(states), layout.valid,
                column_states=lambda: grid.from_grid(states, seq_len),
            )
        return grid.from_grid(states, seq_len)[:, :, 0].to(self.compute_dtype(hidden_states))

    def _decode(self, hidden_states, layout, cache_layer, backend):
        """One new column per row on top of the cache's state."""
        batch_size, _, hidden_size = hidden_states.shape
        cache_layer.prepare(batch_size, hidden_size, hidden_states.device)
        gate = self.forget_gate(hidden_states)  # (B, 1, D)
        state = gate * cache_layer.next_token().previous_state + (1 - gate) * self.v_proj(hidden_states).float()
        cache_layer.append_token(state, layout.valid[:, 0])
        return state.to(self.compute_dtype(hidden_states))


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

    def forward(self, hidden_states: torch.Tensor, layout: RatSequenceLayout, cache_layer=None, backend=None) -> torch.Tensor:
        batch_size, seq_len, _ = hidden_states.shape
        shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = rotary_cos_sin(layout.positions, self.head_dim, self.config.rope_theta, query.dtype)
        query = apply_rotary(query, cos[:, None], sin[:, None])
        key = apply_rotary(key, cos[:, None], sin[:, None])
        if cache_layer is None:
            mask = None if layout.columns_are_positions and self.sliding_window is not None and seq_len > 2 * self.sliding_window else (
                layout.attention_mask_for(None, self.sliding_window)
            )
        else:
            self._check_cache_layer(cache_layer, batch_size, layout.cached_columns, key.dtype)
            if layout.key_valid is not None:  # padding enters the cache as zeros, so that decoding never meets a NaN
                keep = layout.valid[:, None, :, None]  # there (zero weights times NaN would be NaN)
                key, value = torch.where(keep, key, 0.0), torch.where(keep, value, 0.0)
            key, value = cache_layer.update(key, value)
            total = layout.cached_columns + seq_len  # columns the cache holds now
            returned = key.shape[2]
            # The returned keys are the last columns the cache holds (a static layer returns all its slots).
            first_column = total - returned
            first_column = first_column.clamp(min=0) if torch.is_tensor(first_column) else max(first_column, 0)
            key_columns = first_column + torch.arange(returned, device=key.device)
            mask = layout.attention_mask_for(key_columns, self.sliding_window)
        if seq_len == 1:  # decoding: the columns one query does not see are padding (cached as zeros) or older tokens
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None)
        else:  # a NaN or inf in one token reaches only the queries that see it; without a mask, sliding layers
            # attend in blocks of queries: O(T * window) time and memory instead of a T x T mask
            out = attention_containing_faults(query, key, value, mask, self.sliding_window, layout.valid)
        return self.o_proj(out.transpose(1, 2).reshape(batch_size, seq_len, -1))

    def _check_cache_layer(self, cache_layer, batch_size, cached_columns, dtype):
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
        # A host-side check, skipped while tracing: torch.export rebuilds transformers' sliding-window layers from the
        # tensors they keep, and their count is then only the window.
        if not torch.compiler.is_compiling() and not cache_layer.is_compileable and int(cache_layer.get_seq_length()) != cached_columns:
            raise ValueError(
                f"The cache layers disagree: layer {self.layer_idx} holds {int(cache_layer.get_seq_length())} tokens, "
                f"the cache {cached_columns}. Was the cache modified by hand? Start from a new cache."
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
            if keys.dtype != dtype:
                raise cache_dtype_error(keys.dtype, dtype)


MIXER_CLASSES = {
    "rat": RatMixer,
    "rnn": RatRecurrentMixer,
    "full_attention": RatAttention,
    "sliding_attention": RatAttention,
}


def covers_static_cache(attention_mask: torch.Tensor, cache: Cache) -> bool:
    """Whether a 2-D mask spans the whole length of a preallocated (static) cache (see `create_masks_for_generate`)."""
    return bool(cache.is_compileable) and attention_mask.shape[1] == cache.get_max_length()


class RatDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm residual block: h = x + mixer(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, config: RatConfig, layer_idx: int):
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.mixer_norm = RatRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mixer = MIXER_CLASSES[self.layer_type](config, layer_idx)
        self.mlp_norm = RatRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = RatMLP(config)

    def forward(self, hidden_states, layout: RatSequenceLayout, cache_layer=None, backend: RatBackend | None = None):
        hidden_states = hidden_states + self.mixer(self.mixer_norm(hidden_states), layout, cache_layer, backend)
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
    _can_compile_fullgraph = True  # with a static cache, a decode step compiles without graph breaks, once

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
        elif isinstance(module, RatGatedRecurrence):
            # The official range U(1, L - 1) is empty for L <= 2 (chunks of one or two tokens): use U(1, 2) then.
            if isinstance(module, RatMixer):
                upper = max(self.config.chunk_size - 1, 2)
            else:
                upper = max(self.config.rnn_forget_gate_init_length - 1, 2)
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

    @accepts_past_key_values
    @can_return_tuple
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
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """A `BaseModelOutputWithPast`, or its tuple with `return_dict=False` (or `config.return_dict=False`)."""
        validate_model_inputs(self.config, self.embed_tokens, input_ids, inputs_embeds, cache, output_attentions)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and (use_cache or cache is not None):
            logger.warning_once("A cache is not used with gradient checkpointing during training (`use_cache=False`).")
            use_cache, cache = False, None
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len = inputs_embeds.shape[:2]

        if cache is None:
            cached_columns = 0
        elif attention_mask is not None and attention_mask.dim() == 2 and covers_static_cache(attention_mask, cache):
            # Compiled decoding (see `create_masks_for_generate`): the count of cached tokens stays a tensor, so that
            # every step runs the same graph (a copy: the cache layers update theirs in place during this forward).
            # Eager calls read it and drop the mask's columns after the new tokens.
            cached_columns = cache.get_seq_length()
            if torch.compiler.is_compiling() and torch.is_tensor(cached_columns):
                cached_columns = cached_columns.clone()
            else:
                cached_columns = int(cached_columns)
                attention_mask = attention_mask[:, : cached_columns + seq_len]
        elif attention_mask is not None and attention_mask.dim() == 2:  # no device sync (compiled decoding)
            cached_columns = attention_mask.shape[1] - seq_len
            if not torch.compiler.is_compiling() and cached_columns != int(cache.get_seq_length()):
                raise ValueError(
                    f"`attention_mask` has {attention_mask.shape[1]} columns but the cache holds "
                    f"{int(cache.get_seq_length())} tokens and {seq_len} are new: the mask must cover both "
                    f"(expected ({batch_size}, {int(cache.get_seq_length()) + seq_len}))."
                )
        else:
            cached_columns = int(cache.get_seq_length())
        layout = RatSequenceLayout.build(
            batch_size, seq_len, inputs_embeds.device, attention_mask, position_ids, cached_columns,
            cache_has_padding=cache is not None and holds_padding(cache),
            continues_given_cache=cache is not None,  # built here otherwise, after the layout
            window_cache="sliding_attention" in self.config.layer_types,
        )
        if use_cache and cache is None and not layout.packed:  # packed sequences have no single state to continue
            cache = DynamicCache(config=self.config)
        if cache is not None:
            if layout.packed:
                raise ValueError("Packed sequences (positions restarting inside a row) cannot be used with a cache.")
            if len(cache.layers) != self.config.num_hidden_layers:
                raise ValueError(
                    f"The cache has {len(cache.layers)} layers but the model has {self.config.num_hidden_layers}: it "
                    "belongs to another model."
                )
            adopt_cache_layers(cache, self.config.layer_types)
            note_padding(cache, layout.has_padding)

        backend = None
        if any(layer_type in ("rat", "rnn") for layer_type in self.config.layer_types):
            backend = select_rat_backend(self.config, inputs_embeds.device, inputs_embeds.dtype)
        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        for layer_idx, decoder_layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            cache_layer = cache.layers[layer_idx] if cache is not None else None
            hidden_states = decoder_layer(hidden_states, layout, cache_layer=cache_layer, backend=backend)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        if cache is not None and torch.is_grad_enabled():
            detach_cache(cache)
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

    @accepts_past_key_values
    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, cache=None, **kwargs):
        """
        The mask generate() passes to the forward when the cache is preallocated (static, for compiled decoding).
        transformers' mask builders do not know RAT's layer types and would hand over the 2-D padding mask, one column
        longer at every token, so that a compiled decode step would be compiled again for each. Here the padding mask is
        widened with zeros to the whole length of the cache: the same shape at every step (the forward takes the number
        of cached tokens from the cache).
        """
        batch_size, seq_len = inputs_embeds.shape[:2]
        if attention_mask is None:
            columns = int(cache.get_seq_length()) + seq_len
            attention_mask = torch.ones(batch_size, columns, dtype=torch.long, device=inputs_embeds.device)
        missing = cache.get_max_length() - attention_mask.shape[1]
        if missing < 0:  # more tokens than the cache holds: the forward says so
            return attention_mask
        return F.pad(attention_mask, (0, missing))

    def set_rat_implementation(self, implementation: str):
        """Choose how RAT layers run: "auto", "fast", "reference" or "triton" (see `RatConfig`)."""
        self.config.rat_implementation = implementation
        self.config._check_rat_arguments(self.config.head_dim)

    @accepts_past_key_values
    @can_return_tuple
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
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """A `CausalLMOutputWithPast`, or its tuple with `return_dict=False` (or `config.return_dict=False`)."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        validate_loss_inputs(labels, logits_to_keep, hidden_states.shape[:2], self.config.vocab_size, kwargs)
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep > 0 else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss_kwargs = {k: v for k, v in kwargs.items() if k in ("num_items_in_batch", "ignore_index", "shift_labels")}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


# ==================================================================================================== task heads
# transformers' generic heads (their forward, loss and output), on `RatModel`. Each builds its `RatModel` itself:
# the generic `__init__` asks `AutoModel` for it, which knows RAT only where this package registered it, not in a
# checkpoint loaded with `trust_remote_code=True` elsewhere.


class RatForSequenceClassification(GenericForSequenceClassification, RatPreTrainedModel):
    """A linear `score` of each row's last real token (left and right padding alike): one label per sequence."""

    def __init__(self, config: RatConfig):
        RatPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = RatModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @accepts_past_key_values
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast:
        """
        Scores of each row's last real token: the last column that `attention_mask` keeps; without a mask, the last
        token that is not `pad_token_id` (transformers' rule), else the last column.
        """
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        batch_size, seq_len = hidden_states.shape[:2]
        if attention_mask is not None and attention_mask.dim() == 2:
            real = attention_mask[:, -seq_len:].to(hidden_states.device, torch.bool)
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = (input_ids != self.config.pad_token_id).to(hidden_states.device)
        else:
            real = torch.ones(batch_size, seq_len, dtype=torch.bool, device=hidden_states.device)
        columns = torch.arange(seq_len, device=hidden_states.device)
        last_real = torch.where(real, columns, 0).amax(dim=-1)
        logits = self.score(hidden_states[torch.arange(batch_size, device=hidden_states.device), last_real])
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )


class RatForTokenClassification(GenericForTokenClassification, RatPreTrainedModel):
    """A linear `score` of every token after dropout (`config.classifier_dropout`, default 0.1): one label per token."""

    def __init__(self, config: RatConfig):
        RatPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = RatModel(config)
        classifier_dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if classifier_dropout is None else classifier_dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=getattr(config, "token_classification_bias", True))
        self.post_init()


class RatForQuestionAnswering(GenericForQuestionAnswering, RatPreTrainedModel):
    """Extractive question answering: start and end scores of every token (`qa_outputs`)."""

    def __init__(self, config: RatConfig):
        RatPreTrainedModel.__init__(self, config)
        self.model = RatModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()


__all__ = [
    "RatPreTrainedModel",
    "RatModel",
    "RatForCausalLM",
    "RatForSequenceClassification",
    "RatForTokenClassification",
    "RatForQuestionAnswering",
    "cache_nbytes",
]
