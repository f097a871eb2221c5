"""Cache layers for RAT and rnn layers, on transformers' cache API.

A RAT layer's cache holds, per sequence of the batch:

* the rotated key and value summaries of its completed chunks: `keys`, `values` of shape (B, H, capacity, d),
  the first `seen // chunk_size` slots of each row valid (rows of a left-padded batch have their own chunk grid);
* the running state of the unfinished chunk, `running_state` (B, 2, D) in fp32 (unrotated value and key sums);
* `seen` (B,), the real tokens of each row, and `columns`, all tokens fed, padding included (what
  `get_seq_length` reports, as transformers expects).

That is 2 * floor(n / L) * D values plus 2 * D per sequence: 1/L of a key/value cache. An rnn layer keeps only
its state (B, 1, D). Attention layers of hybrid models use transformers' own cache layers.

Both classes register themselves for their layer type (`"rat"`, `"rnn"`), so `DynamicCache(config=config)` and
`generate()` build them; `StaticCache` builds the preallocated variants used by compiled decoding.

Rolling back (`crop`), needed by assisted and prompt-lookup decoding, is exact: once `activate_past_recording`
was called, the layer keeps the state after each recent column, which is all a rollback needs (summaries of
completed chunks stay in place; a rollback only lowers the count of valid ones).
"""

import torch
from transformers.cache_utils import CacheLayerMixin, StaticLayer


class _RecurrentCacheMixin:
    """Storage and batch operations shared by the RAT and rnn cache layers."""

    is_sliding = False
    #: a rollback of at least this many tokens is always exact once past recording is active
    min_rollback = 32

    def _init_recurrent_fields(self):
        self.keys = None  # chunk summaries (RAT) or None (rnn)
        self.values = None
        self.running_state = None  # (B, S, D) fp32
        self.seen = None  # (B,) long
        self.columns = 0
        self.record_past = False
        self.history = None  # (B, n, S, D): state after each of the last n columns, while recording
        self.history_base = None  # (B, S, D): the state before the first of them
        self.history_valid = None  # (B, n) bool: which of those columns were real tokens
        self.is_initialized = False
        self.geometry = None

    # ----------------------------------------------------------------------------------------------- set-up

    def _check_geometry(self, geometry: dict, batch_size: int):
        if self.geometry is not None and self.geometry != geometry:
            raise ValueError(
                f"This cache was filled by a model with {self.geometry} but is used with {geometry}: a cache "
                "belongs to one model; create a new one (or let the model create it) for this model."
            )
        if self.seen is not None and self.seen.shape[0] != batch_size:
            raise ValueError(
                f"The cache holds {self.seen.shape[0]} sequences but the input has batch size {batch_size}: pass "
                "inputs with the cache's batch size, or start from a new cache."
            )
        self.geometry = geometry

    def _init_state(self, batch_size: int, num_streams: int, hidden_size: int, device):
        self.running_state = torch.zeros(batch_size, num_streams, hidden_size, dtype=torch.float32, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.device = device
        self.batch_size = batch_size
        self.is_initialized = True

    # ------------------------------------------------------------------------------------- transformers API

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns + query_length, 0

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} holds recurrent state and chunk summaries, which the RAT model updates itself; "
            "it has no per-token key/value states to `update`."
        )

    def _tensors(self) -> list[str]:
        return ["keys", "values", "running_state", "seen", "history", "history_valid", "history_base"]

    def _apply_to_batch(self, function):
        for name in self._tensors():
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, function(tensor))
        if self.seen is not None:
            self.batch_size = self.seen.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes the former row beam_idx[i]."""
        if self.is_initialized:
            self._apply_to_batch(lambda tensor: tensor.index_select(0, beam_idx.to(tensor.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._apply_to_batch(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._apply_to_batch(lambda tensor: tensor[indices.to(tensor.device) if torch.is_tensor(indices) else indices])

    def reset(self) -> None:
        geometry = self.geometry
        record_past = self.record_past
        self._init_recurrent_fields()
        self.geometry, self.record_past = geometry, record_past

    def offload(self):
        if self.is_initialized:
            self._apply_to_batch(lambda tensor: tensor.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.running_state.device != self.device:
            self._apply_to_batch(lambda tensor: tensor.to(self.device, non_blocking=True))

    # -------------------------------------------------------------------------------------------- rollback

    def activate_past_recording(self):
        """Keep the state after each column from now on, so that `crop` can roll back exactly."""
        self.record_past = True

    @property
    def is_croppable(self) -> bool:
        return self.record_past or self.columns == 0

    def record(self, column_states: torch.Tensor, column_valid: torch.Tensor):
        """Append the state after each new column (B, T, S, D) and the columns' validity (B, T), if recording."""
        if not self.record_past:
            return
        column_states = column_states.detach().to(torch.float32)
        if self.history is None:
            self.history_base = self.running_state.detach().clone()  # the state before the first recorded column
            self.history, self.history_valid = column_states, column_valid.clone()
        else:
            self.history = torch.cat([self.history, column_states], dim=1)
            self.history_valid = torch.cat([self.history_valid, column_valid], dim=1)

    def crop(self, tokens_to_remove: int) -> None:
        """
        Remove the last `-tokens_to_remove` columns (a number <= 0, as in transformers' cache layers). Exact for any
        rollback within the columns fed since the previous `crop`, and for at least `min_rollback` columns before
        it, once past recording is active.
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"`crop` takes a negative number of tokens to remove, got {tokens_to_remove}: use crop(-n) to drop the "
                "last n tokens."
            )
        remove = -tokens_to_remove
        if remove <= 0 or not self.is_initialized:
            self._trim_history()
            return
        if remove > self.columns:
            raise ValueError(f"Cannot remove {remove} tokens from a cache that holds {self.columns}.")
        kept = 0 if self.history is None else self.history.shape[1]
        if not self.record_past or remove > kept:
            raise ValueError(
                f"Cannot roll this {type(self).__name__} back by {remove} tokens: "
                + (
                    "past recording is off. Call `cache.activate_past_recording()` before feeding the tokens you may "
                    "want to remove (generate() does this for assisted and prompt-lookup decoding)."
                    if not self.record_past
                    else f"it kept the states of only the last {kept} tokens."
                )
            )
        removed_valid = self.history_valid[:, kept - remove :].sum(dim=1)
        self.seen = self.seen - removed_valid.to(self.seen.device)
        if kept - remove > 0:
            self.running_state = self.history[:, kept - remove - 1].to(self.running_state.device).clone()
        else:  # back to the state before the first recorded column
            self.running_state = self.history_base.to(self.running_state.device).clone()
        self.history = self.history[:, : kept - remove]
        self.history_valid = self.history_valid[:, : kept - remove]
        self.columns -= remove
        self._trim_history()

    def commit(self, running_state, seen, num_columns, column_states=None, column_valid=None):
        """
        Store what a forward leaves behind: the state after each row's last real token, the real-token counts, and
        `num_columns` more columns (padding included). `column_states` (B, T, S, D), the state after each new
        column, is recorded for rollback when recording is active. Updates are in place, so that the buffers keep
        their addresses (compiled decoding).
        """
        if self.record_past and column_states is not None:
            self.record(column_states, column_valid)
        self.running_state.copy_(running_state.detach())
        self.seen.copy_(seen)
        self.columns += num_columns

    def reserve(self, num_new_columns: int):
        """Make room for `num_new_columns` more columns (chunk summaries grow with them; see the RAT layer)."""

    def skip_columns(self, count: int):
        """Account for `count` padding columns: the state does not change."""
        if self.record_past:
            batch_size = self.running_state.shape[0]
            repeated = self.running_state[:, None].expand(batch_size, count, *self.running_state.shape[1:])
            self.record(repeated, torch.zeros(batch_size, count, dtype=torch.bool, device=self.running_state.device))
        self.columns += count

    def _trim_history(self):
        if self.history is not None and self.history.shape[1] > self.min_rollback:
            self.history_base = self.history[:, -self.min_rollback - 1]
            self.history = self.history[:, -self.min_rollback :]
            self.history_valid = self.history_valid[:, -self.min_rollback :]

    # -------------------------------------------------------------------------------------------- accounting

    @property
    def nbytes(self) -> int:
        """Bytes of the state the layer needs to continue (rollback history excluded)."""
        total = 0
        for name in ("keys", "values", "running_state"):
            tensor = getattr(self, name)
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
        return total


class RatChunkCacheLayer(_RecurrentCacheMixin, CacheLayerMixin):
    """Cache of one RAT layer: chunk summaries, the running state of the unfinished chunk, and the counts."""

    _layer_type = "rat"

    def __init__(self, **kwargs):
        super().__init__()
        self._init_recurrent_fields()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """transformers' early initialisation; RAT layers initialise themselves at the first forward."""

    def prepare(self, batch_size, num_heads, head_dim, chunk_size, dtype, device):
        """Check that this cache fits the model and input (clear errors otherwise) and allocate it if empty."""
        self._check_geometry(
            {"kind": "rat", "num_heads": num_heads, "head_dim": head_dim, "chunk_size": chunk_size}, batch_size
        )
        self.chunk_size = chunk_size
        if not self.is_initialized:
            self._init_state(batch_size, 2, num_heads * head_dim, device)
            self.keys = torch.zeros(batch_size, num_heads, 0, head_dim, dtype=dtype, device=device)
            self.values = torch.zeros(batch_size, num_heads, 0, head_dim, dtype=dtype, device=device)

    def reserve(self, num_new_columns: int):
        """Grow the summary buffers so that `num_new_columns` more columns fit: one slot per chunk they complete."""
        self.ensure_capacity((self.columns + num_new_columns) // self.chunk_size)

    def ensure_capacity(self, num_chunks: int):
        """Grow the summary buffers to hold at least `num_chunks` chunks per row."""
        missing = num_chunks - self.keys.shape[2]
        if missing > 0:
            pad = self.keys.new_zeros(*self.keys.shape[:2], missing, self.keys.shape[3])
            self.keys = torch.cat([self.keys, pad], dim=2)
            self.values = torch.cat([self.values, pad], dim=2)

    def write_summaries(self, rows, slots, key_summaries, value_summaries):
        """Store chunk summaries (n, H, d) at (rows[i], :, slots[i]), in place."""
        self.keys[rows, :, slots] = key_summaries.to(self.keys.dtype)
        self.values[rows, :, slots] = value_summaries.to(self.values.dtype)

    def completed_chunks(self) -> torch.Tensor:
        return torch.div(self.seen, self.chunk_size, rounding_mode="floor")


class RatRecurrentCacheLayer(_RecurrentCacheMixin, CacheLayerMixin):
    """Cache of one rnn layer: its state and the counts."""

    _layer_type = "rnn"

    def __init__(self, **kwargs):
        super().__init__()
        self._init_recurrent_fields()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """transformers' early initialisation; rnn layers initialise themselves at the first forward."""

    def prepare(self, batch_size, hidden_size, device):
        self._check_geometry({"kind": "rnn", "hidden_size": hidden_size}, batch_size)
        if not self.is_initialized:
            self._init_state(batch_size, 1, hidden_size, device)


class RatStaticChunkCacheLayer(RatChunkCacheLayer, StaticLayer):
    """Preallocated RAT cache layer (`cache_implementation="static"`): fixed shapes for compiled decoding."""

    _layer_type = "rat"
    is_compileable = True

    def __init__(self, max_cache_len: int, **kwargs):
        StaticLayer.__init__(self, max_cache_len=max_cache_len)
        self._init_recurrent_fields()
        self.max_cache_len = max_cache_len

    def _init_recurrent_fields(self):
        super()._init_recurrent_fields()
        # A tensor, updated in place: compiled decoding then neither reads it on the host nor recompiles per token.
        self.columns = torch.zeros((), dtype=torch.long)

    def prepare(self, batch_size, num_heads, head_dim, chunk_size, dtype, device):
        fresh = not self.is_initialized
        super().prepare(batch_size, num_heads, head_dim, chunk_size, dtype, device)
        if fresh:
            self.columns = self.columns.to(device)
            RatChunkCacheLayer.ensure_capacity(self, self.max_cache_len // chunk_size + 1)

    def reserve(self, num_new_columns: int):
        """Preallocated: checked only outside compiled code (reading the count would sync the device)."""
        if not torch.compiler.is_compiling() and int(self.columns) + num_new_columns > self.max_cache_len:
            raise ValueError(
                f"The static cache holds at most {self.max_cache_len} tokens; {int(self.columns)} are cached and "
                f"{num_new_columns} more were given. Create it with a larger `max_cache_len`."
            )

    def get_seq_length(self):
        return self.columns

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    @property
    def is_croppable(self) -> bool:
        return False  # preallocated for compiled decoding; rollback needs the dynamic cache

    def reset(self) -> None:
        """Empty the cache, keeping its buffers (fixed addresses for compiled code)."""
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.running_state.zero_()
            self.seen.zero_()
            self.columns.zero_()


class RatStaticRecurrentCacheLayer(RatRecurrentCacheLayer, StaticLayer):
    """rnn cache layer for compiled decoding: its state has a fixed shape already; the count is a tensor."""

    _layer_type = "rnn"
    is_compileable = True

    def __init__(self, max_cache_len: int, **kwargs):
        StaticLayer.__init__(self, max_cache_len=max_cache_len)
        self._init_recurrent_fields()
        self.max_cache_len = max_cache_len

    def _init_recurrent_fields(self):
        super()._init_recurrent_fields()
        self.columns = torch.zeros((), dtype=torch.long)

    def prepare(self, batch_size, hidden_size, device):
        fresh = not self.is_initialized
        super().prepare(batch_size, hidden_size, device)
        if fresh:
            self.columns = self.columns.to(device)

    @property
    def is_croppable(self) -> bool:
        return False

    def reset(self) -> None:
        if self.is_initialized:
            self.running_state.zero_()
            self.seen.zero_()
            self.columns.zero_()

    def get_seq_length(self):
        return self.columns

    def get_max_length(self) -> int:
        return self.max_cache_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0


def cache_nbytes(cache) -> int:
    """Bytes a cache holds: chunk summaries and states of RAT/rnn layers, keys/values of attention layers."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, _RecurrentCacheMixin):
            total += layer.nbytes
        else:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if torch.is_tensor(tensor):
                    total += tensor.numel() * tensor.element_size()
    return total


__all__ = [
    "RatChunkCacheLayer",
    "RatRecurrentCacheLayer",
    "RatStaticChunkCacheLayer",
    "RatStaticRecurrentCacheLayer",
    "cache_nbytes",
]
