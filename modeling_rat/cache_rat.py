"""Cache layers for RAT and rnn layers, on transformers' cache API.

A RAT layer's cache holds, per sequence of the batch:

* the rotated key and value summaries of its completed chunks: `keys`, `values` of shape (B, H, capacity, d),
  the first `num_tokens // chunk_size` slots of each row valid (rows of a left-padded batch have their own chunk grid);
* the running state of the unfinished chunk, `running_state` (B, 2, D) in fp32 (unrotated value and key sums);
* `num_tokens` (B,), the real tokens of each row, and `num_columns`, all tokens fed, padding included (what
  `get_seq_length` reports, as transformers expects).

That is 2 * floor(n / L) * D values plus 2 * D per sequence: 1/L of a key/value cache. An rnn layer keeps only
its state (B, 1, D). Attention layers of hybrid models use transformers' own cache layers.

The layers own every index and counter. A RAT or rnn mixer asks what it needs to resume (`resume` for several new
tokens, `next_token` for one) and hands back what its tokens leave behind (`append`, `append_token`): the final
state of each row and, for RAT layers, the summaries of the chunks it computed; the layer decides which of them
complete a chunk and where they go.

Both classes register themselves for their layer type (`"rat"`, `"rnn"`), so `DynamicCache(config=config)` and
`generate()` build them; `StaticCache` builds the preallocated variants used by compiled decoding. That registry is
global: when several copies of this code are loaded (two remote-code checkpoints, or one and the installed package),
the last one registered builds the layers, and `adopt_cache_layers` swaps a still-empty layer of another copy for
one of the model's own.

Rolling back (`crop`), needed by assisted and prompt-lookup decoding, is exact: once `activate_past_recording`
was called, the layer keeps the state after each recent column, which is all a rollback needs (summaries of
completed chunks stay in place; a rollback only lowers the count of valid ones).
"""

from typing import NamedTuple

import torch
from transformers.cache_utils import CacheLayerMixin, StaticLayer


class RatResumeState(NamedTuple):
    """What the new tokens of a row continue: the state of its unfinished chunk and its completed chunks' summaries."""

    initial_state: torch.Tensor  # (N, S, D) fp32, zero where a new chunk (or sequence) starts
    keys: torch.Tensor | None  # (N, H, capacity, d) rotated key summaries (RAT layers)
    values: torch.Tensor | None
    num_chunks: torch.Tensor | None  # (N,) how many of those summaries are valid


class RatNextToken(NamedTuple):
    """What one new token per row continues (decoding)."""

    previous_state: torch.Tensor  # (B, S, D) fp32, zero where the token starts a new chunk
    keys: torch.Tensor | None  # (B, H, capacity, d)
    values: torch.Tensor | None
    chunk: torch.Tensor | None  # (B,) the token's chunk index: its rotary position and the count of valid summaries


class _RecurrentCacheMixin:
    """Storage, counters, rollback and batch operations shared by the RAT and rnn cache layers."""

    is_sliding = False
    #: a rollback of at least this many tokens is always exact once past recording is active
    min_rollback = 32
    #: streams of the running state: RAT layers keep [value, key], rnn layers the value
    num_streams = 1

    def _init_fields(self):
        self.keys = None  # chunk summaries (RAT) or None (rnn)
        self.values = None
        self.running_state = None  # (B, S, D) fp32
        self.num_tokens = None  # (B,) long
        self.num_columns = 0
        self.record_past = False
        self.rollback_states = None  # (B, n, S, D): state after each of the last n columns, while recording
        self.rollback_base = None  # (B, S, D): the state before the first of them
        self.rollback_valid = None  # (B, n) bool: which of those columns were real tokens
        self.is_initialized = False
        self.geometry = None

    # ----------------------------------------------------------------------------------------------- set-up

    def _prepare(self, geometry: dict, batch_size: int, hidden_size: int, device):
        """Check that the cache fits the model and input (clear errors otherwise); allocate it if empty."""
        if self.geometry is not None and self.geometry != geometry:
            raise ValueError(
                f"This cache was filled by a model with {self.geometry} but is used with {geometry}: a cache "
                "belongs to one model; create a new one (or let the model create it) for this model."
            )
        if self.num_tokens is not None and self.num_tokens.shape[0] != batch_size:
            raise ValueError(
                f"The cache holds {self.num_tokens.shape[0]} sequences but the input has batch size {batch_size}: pass "
                "inputs with the cache's batch size, or start from a new cache."
            )
        self.geometry = geometry
        if not self.is_initialized:
            self.running_state = torch.zeros(batch_size, self.num_streams, hidden_size, dtype=torch.float32, device=device)
            self.num_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)
            self.device = device
            self.batch_size = batch_size
            self.is_initialized = True
            return True
        return False

    # ------------------------------------------------------------------------------------- transformers API

    def get_seq_length(self) -> int:
        return self.num_columns

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_columns + query_length, 0

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} holds recurrent state and chunk summaries, which the RAT model updates itself; "
            "it has no per-token key/value states to `update`."
        )

    def _tensors(self) -> list[str]:
        return ["keys", "values", "running_state", "num_tokens", "rollback_states", "rollback_valid", "rollback_base"]

    def _apply_to_batch(self, function):
        for name in self._tensors():
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, function(tensor))
        if self.num_tokens is not None:
            self.batch_size = self.num_tokens.shape[0]

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
        geometry, record_past = self.geometry, self.record_past
        self._init_fields()
        self.geometry, self.record_past = geometry, record_past

    def offload(self):
        if self.is_initialized:
            self._apply_to_batch(lambda tensor: tensor.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.running_state.device != self.device:
            self._apply_to_batch(lambda tensor: tensor.to(self.device, non_blocking=True))

    # ------------------------------------------------------------------------------------ the mixer's vocabulary

    @property
    def is_empty(self) -> bool:
        return not self.is_initialized or (not torch.is_tensor(self.num_columns) and self.num_columns == 0)

    def resume(self, rows: torch.Tensor) -> RatResumeState | None:
        """What the new tokens of batch rows `rows` continue (None while the cache holds nothing)."""
        if self.is_empty:
            return None
        return RatResumeState(self._state_for_next_token()[rows], None, None, None)

    def next_token(self) -> RatNextToken:
        """What one new token per row continues."""
        return RatNextToken(self._state_for_next_token(), None, None, None)

    def append(self, rows, new_tokens, final_state, valid, column_states=None, key_summaries=None, value_summaries=None):
        """
        Store what the T new columns of a forward leave behind.

        Args:
            rows (N,): the batch row of each sequence; new_tokens (N,): its real tokens.
            final_state (N, S, D): the state after its last real token.
            valid (B, T): which columns are real tokens.
            column_states: returns the state after every column (B, T, S, D); called only while past recording is
                active (for rollback).
            key_summaries, value_summaries (N, C, H, d): RAT layers only, the summaries (keys rotated) of the C
                chunks each sequence's new tokens touched; the cache keeps those the tokens completed.
        """
        self.reserve(valid.shape[1])
        self._store_summaries(rows, new_tokens, key_summaries, value_summaries)
        has_tokens = (new_tokens > 0)[:, None, None]
        running_state = self.running_state.clone()
        running_state[rows] = torch.where(has_tokens, final_state.to(running_state.dtype), running_state[rows])
        num_tokens = self.num_tokens.clone()
        num_tokens[rows] = num_tokens[rows] + new_tokens
        if self.record_past and column_states is not None:
            self._record(_carry_over_padding(column_states(), valid, self.running_state), valid)
        self._commit(running_state, num_tokens, valid.shape[1])

    def append_token(self, state, valid, key_summary=None, value_summary=None):
        """
        Store one new column per row: the state after it (B, S, D) where it is a real token (valid (B,)); RAT layers
        also give its rotated key and value summaries (B, H, d), kept for the rows whose chunk the token completes.
        """
        self.reserve(1)
        self._store_token_summary(valid, key_summary, value_summary)
        running_state = torch.where(valid[:, None, None], state, self.running_state)
        if self.record_past:
            self._record(running_state[:, None], valid[:, None])
        self._commit(running_state, self.num_tokens + valid.long(), 1)

    def reserve(self, num_new_columns: int):
        """Make room for `num_new_columns` more columns (chunk summaries grow with them; see the RAT layer)."""

    def _store_summaries(self, rows, new_tokens, key_summaries, value_summaries):
        """Chunk summaries: RAT layers only."""

    def _store_token_summary(self, valid, key_summary, value_summary):
        """Chunk summaries: RAT layers only."""

    def _state_for_next_token(self) -> torch.Tensor:
        return self.running_state

    def _commit(self, running_state, num_tokens, num_columns):
        """Updates are in place, so that the buffers keep their addresses (compiled decoding; a static layer's
        column count is a tensor, which `+=` updates in place too)."""
        self.running_state.copy_(running_state.detach())
        self.num_tokens.copy_(num_tokens)
        self.num_columns += num_columns

    # -------------------------------------------------------------------------------------------- rollback

    def activate_past_recording(self):
        """Keep the state after each column from now on, so that `crop` can roll back exactly."""
        self.record_past = True

    @property
    def is_croppable(self) -> bool:
        return self.record_past or self.num_columns == 0

    def _record(self, column_states: torch.Tensor, column_valid: torch.Tensor):
        """Append the state after each new column (B, T, S, D) and the columns' validity (B, T)."""
        column_states = column_states.detach().to(torch.float32)
        if self.rollback_states is None:
            self.rollback_base = self.running_state.detach().clone()  # the state before the first recorded column
            self.rollback_states, self.rollback_valid = column_states, column_valid.clone()
        else:
            self.rollback_states = torch.cat([self.rollback_states, column_states], dim=1)
            self.rollback_valid = torch.cat([self.rollback_valid, column_valid], dim=1)

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
            self._trim_rollback()
            return
        if remove > self.num_columns:
            raise ValueError(f"Cannot remove {remove} tokens from a cache that holds {self.num_columns}.")
        kept = 0 if self.rollback_states is None else self.rollback_states.shape[1]
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
        removed_tokens = self.rollback_valid[:, kept - remove :].sum(dim=1)
        self.num_tokens = self.num_tokens - removed_tokens.to(self.num_tokens.device)
        if kept - remove > 0:
            self.running_state = self.rollback_states[:, kept - remove - 1].to(self.running_state.device).clone()
        else:  # back to the state before the first recorded column
            self.running_state = self.rollback_base.to(self.running_state.device).clone()
        self.rollback_states = self.rollback_states[:, : kept - remove]
        self.rollback_valid = self.rollback_valid[:, : kept - remove]
        self.num_columns -= remove
        self._trim_rollback()

    def _trim_rollback(self):
        if self.rollback_states is not None and self.rollback_states.shape[1] > self.min_rollback:
            self.rollback_base = self.rollback_states[:, -self.min_rollback - 1]
            self.rollback_states = self.rollback_states[:, -self.min_rollback :]
            self.rollback_valid = self.rollback_valid[:, -self.min_rollback :]

    # -------------------------------------------------------------------------------------------- accounting

    @property
    def nbytes(self) -> int:
        """Bytes of the state the layer needs to continue (rollback states excluded)."""
        total = 0
        for name in ("keys", "values", "running_state"):
            tensor = getattr(self, name)
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
        return total


def cache_dtype_error(cached: torch.dtype, computed: torch.dtype) -> ValueError:
    """The error for a cache continued in another dtype than the one that filled it."""
    return ValueError(
        f"This cache was filled in {cached} but the model now computes in {computed} (autocast switched on or off, or "
        "the model converted, since then): continue in the dtype that filled it, or start from a new cache."
    )


def _carry_over_padding(per_column: torch.Tensor, valid: torch.Tensor, previous_state: torch.Tensor) -> torch.Tensor:
    """(B, T, S, D) state after each column, for rollback: a padding column repeats the state before it."""
    batch_size, seq_len = valid.shape
    columns = torch.arange(seq_len, device=valid.device).expand(batch_size, seq_len)
    last_valid = torch.cummax(torch.where(valid, columns, torch.full_like(columns, -1)), dim=1).values
    per_column = per_column.float()
    gathered = per_column.gather(1, last_valid.clamp(min=0)[:, :, None, None].expand_as(per_column))
    return torch.where((last_valid < 0)[:, :, None, None], previous_state[:, None].to(gathered.dtype), gathered)


class RatChunkCacheLayer(_RecurrentCacheMixin, CacheLayerMixin):
    """Cache of one RAT layer: chunk summaries, the running state of the unfinished chunk, and the counts."""

    _layer_type = "rat"
    num_streams = 2

    def __init__(self, **kwargs):
        super().__init__()
        self._init_fields()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """transformers' early initialisation; RAT layers initialise themselves at the first forward."""

    def prepare(self, batch_size, num_heads, head_dim, chunk_size, dtype, device):
        """Check that this cache fits the model and input (clear errors otherwise) and allocate it if empty."""
        geometry = {"kind": "rat", "num_heads": num_heads, "head_dim": head_dim, "chunk_size": chunk_size}
        self.chunk_size = chunk_size
        if self._prepare(geometry, batch_size, num_heads * head_dim, device):
            self.keys = torch.zeros(batch_size, num_heads, 0, head_dim, dtype=dtype, device=device)
            self.values = torch.zeros(batch_size, num_heads, 0, head_dim, dtype=dtype, device=device)
        elif self.keys.dtype != dtype:
            raise cache_dtype_error(self.keys.dtype, dtype)

    def resume(self, rows: torch.Tensor) -> RatResumeState | None:
        if self.is_empty:
            return None
        num_chunks = torch.div(self.num_tokens[rows], self.chunk_size, rounding_mode="floor")
        return RatResumeState(self._state_for_next_token()[rows], self.keys[rows], self.values[rows], num_chunks)

    def next_token(self) -> RatNextToken:
        chunk = torch.div(self.num_tokens, self.chunk_size, rounding_mode="floor")
        return RatNextToken(self._state_for_next_token(), self.keys, self.values, chunk)

    def _state_for_next_token(self) -> torch.Tensor:
        """The running state, zero for rows whose next token starts a new chunk."""
        starts_chunk = (self.num_tokens % self.chunk_size == 0)[:, None, None]
        return torch.where(starts_chunk, torch.zeros((), device=self.running_state.device), self.running_state)

    def _store_summaries(self, rows, new_tokens, key_summaries, value_summaries):
        """
        Keep the summaries of the chunks the new tokens completed, at slot (row, chunk index). Shapes depend only on the
        input's (no host sync; torch.export): every grid chunk writes, those the tokens did not complete repeat the
        row's last completed one (the same value to the same slot), and a row that completed none writes back a slot's
        own value.
        """
        capacity = self.keys.shape[2]
        if capacity == 0:
            return
        first_chunk = torch.div(self.num_tokens[rows], self.chunk_size, rounding_mode="floor")
        completed = torch.div(self.num_tokens[rows] + new_tokens, self.chunk_size, rounding_mode="floor") - first_chunk
        grid_chunks = torch.arange(key_summaries.shape[1], device=rows.device)
        chunk = torch.minimum(grid_chunks[None, :], (completed - 1).clamp(min=0)[:, None])  # (N, C)
        slot = (first_chunk[:, None] + chunk).clamp(max=capacity - 1)
        row = rows[:, None].expand_as(slot)
        completes_any = (completed > 0)[:, None, None, None]
        gather_index = chunk[:, :, None, None].expand(-1, -1, *key_summaries.shape[2:])
        self._write_summaries(
            row, slot,
            torch.where(completes_any, key_summaries.gather(1, gather_index).to(self.keys.dtype), self.keys[row, :, slot]),
            torch.where(completes_any, value_summaries.gather(1, gather_index).to(self.values.dtype), self.values[row, :, slot]),
        )

    def _store_token_summary(self, valid, key_summary, value_summary):
        """Keep the token's summaries where it completes its row's chunk (fixed shapes: compiled decoding)."""
        capacity = self.keys.shape[2]
        if capacity == 0:
            return
        completes = (valid & (self.num_tokens % self.chunk_size == self.chunk_size - 1))[:, None, None]
        rows = torch.arange(self.num_tokens.shape[0], device=valid.device)
        slot = torch.div(self.num_tokens, self.chunk_size, rounding_mode="floor").clamp(max=capacity - 1)
        self._write_summaries(
            rows, slot,
            torch.where(completes, key_summary.to(self.keys.dtype), self.keys[rows, :, slot]),
            torch.where(completes, value_summary.to(self.values.dtype), self.values[rows, :, slot]),
        )

    def crop(self, tokens_to_remove: int) -> None:
        """
        Roll back as `_RecurrentCacheMixin.crop` does, then clear the summaries of the chunks rolled back. Slots beyond
        a row's count of valid summaries always hold zeros: attention gives them weight zero, and 0 * NaN would carry a
        fault of a discarded token (a rejected draft) into the tokens that follow.
        """
        super().crop(tokens_to_remove)
        if self.is_initialized and self.keys.shape[2]:
            slots = torch.arange(self.keys.shape[2], device=self.keys.device)
            stale = slots[None, :] >= torch.div(self.num_tokens, self.chunk_size, rounding_mode="floor")[:, None]
            self.keys.masked_fill_(stale[:, None, :, None], 0)
            self.values.masked_fill_(stale[:, None, :, None], 0)

    def reserve(self, num_new_columns: int):
        """Grow the summary buffers so that `num_new_columns` more columns fit: one slot per chunk they complete."""
        self._ensure_capacity((self.num_columns + num_new_columns) // self.chunk_size)

    def _ensure_capacity(self, num_chunks: int):
        missing = num_chunks - self.keys.shape[2]
        if missing > 0:
            pad = self.keys.new_zeros(*self.keys.shape[:2], missing, self.keys.shape[3])
            self.keys = torch.cat([self.keys, pad], dim=2)
            self.values = torch.cat([self.values, pad], dim=2)

    def _write_summaries(self, rows, slots, key_summaries, value_summaries):
        """Store chunk summaries (..., H, d) at (rows, :, slots), index tensors of one shape, in place."""
        self.keys[rows, :, slots] = key_summaries.detach().to(self.keys.dtype)
        self.values[rows, :, slots] = value_summaries.detach().to(self.values.dtype)


class RatRecurrentCacheLayer(_RecurrentCacheMixin, CacheLayerMixin):
    """Cache of one rnn layer: its state and the counts."""

    _layer_type = "rnn"

    def __init__(self, **kwargs):
        super().__init__()
        self._init_fields()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """transformers' early initialisation; rnn layers initialise themselves at the first forward."""

    def prepare(self, batch_size, hidden_size, device):
        self._prepare({"kind": "rnn", "hidden_size": hidden_size}, batch_size, hidden_size, device)


class _StaticCounts:
    """
    For the preallocated layers built by `StaticCache` (compiled decoding): the column count is a tensor updated in
    place, so that compiled code neither reads it on the host nor recompiles for every token; buffers keep their
    addresses; no rollback.
    """

    is_compileable = True

    def __init__(self, max_cache_len: int, **kwargs):
        StaticLayer.__init__(self, max_cache_len=max_cache_len)
        self._init_fields()
        self.max_cache_len = max_cache_len

    def _init_fields(self):
        super()._init_fields()
        self.num_columns = torch.zeros((), dtype=torch.long)

    def _prepare(self, geometry, batch_size, hidden_size, device):
        fresh = super()._prepare(geometry, batch_size, hidden_size, device)
        if fresh:
            self.num_columns = self.num_columns.to(device)
        return fresh

    @property
    def is_empty(self) -> bool:
        return not self.is_initialized

    def get_seq_length(self):
        return self.num_columns

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
            for name in ("keys", "values", "running_state", "num_tokens", "num_columns"):
                tensor = getattr(self, name)
                if tensor is not None:
                    tensor.zero_()


class RatStaticChunkCacheLayer(_StaticCounts, RatChunkCacheLayer, StaticLayer):
    """Preallocated RAT cache layer (`cache_implementation="static"`): fixed shapes for compiled decoding."""

    _layer_type = "rat"

    def prepare(self, batch_size, num_heads, head_dim, chunk_size, dtype, device):
        fresh = not self.is_initialized
        super().prepare(batch_size, num_heads, head_dim, chunk_size, dtype, device)
        if fresh:
            self._ensure_capacity(self.max_cache_len // chunk_size + 1)

    def reserve(self, num_new_columns: int):
        """Preallocated: checked only outside compiled code (reading the count would sync the device)."""
        if not torch.compiler.is_compiling() and int(self.num_columns) + num_new_columns > self.max_cache_len:
            raise ValueError(
                f"The static cache holds at most {self.max_cache_len} tokens; {int(self.num_columns)} are cached and "
                f"{num_new_columns} more were given. Create it with a larger `max_cache_len`."
            )


class RatStaticRecurrentCacheLayer(_StaticCounts, RatRecurrentCacheLayer, StaticLayer):
    """rnn cache layer for compiled decoding: its state has a fixed shape already; the count is a tensor."""

    _layer_type = "rnn"


def adopt_cache_layers(cache, layer_types: list[str]) -> None:
    """
    Make every RAT/rnn layer of `cache` an instance of this code's classes. transformers builds cache layers from one
    global registry keyed by layer type, so another copy of this code (a second remote-code checkpoint, or one and
    the installed package) may have built them. An empty layer is replaced by the matching class of this copy
    (keeping its static size and recording flag); a filled one of another copy belongs to another model's cache.
    """
    for index, (layer, layer_type) in enumerate(zip(cache.layers, layer_types)):
        own = _OWN_CLASSES.get((layer_type, bool(getattr(layer, "is_compileable", False))))
        if own is None or isinstance(layer, own) or getattr(layer, "_layer_type", None) != layer_type:
            continue
        if getattr(layer, "is_initialized", False):
            raise ValueError(
                f"Layer {index} of the cache was filled by another copy of the RAT code ({type(layer).__module__}): a "
                "cache belongs to one model; let this model create its own cache."
            )
        replacement = own(max_cache_len=layer.max_cache_len) if own.is_compileable else own()
        replacement.record_past = getattr(layer, "record_past", False)
        cache.layers[index] = replacement


_OWN_CLASSES = {
    ("rat", False): RatChunkCacheLayer,
    ("rnn", False): RatRecurrentCacheLayer,
    ("rat", True): RatStaticChunkCacheLayer,
    ("rnn", True): RatStaticRecurrentCacheLayer,
}


def note_padding(cache, has_padding: bool | None) -> None:
    """Remember that `cache` now holds padding (rows of a padded batch), so that later calls must bring the mask."""
    if has_padding:
        cache.rat_holds_padding = True


def detach_cache(cache) -> None:
    """
    Keep only the values of what attention layers stored (transformers' layers store the autograd graph with them when
    gradients are on; RAT and rnn layers store detached tensors): a cache is state, not part of a graph, so that it can
    be copied (`copy.deepcopy`) and does not keep a forward's activations alive. The gradients of the forward that filled
    it are unchanged. Reads only `requires_grad` flags (nothing on the device).
    """
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if torch.is_tensor(tensor) and tensor.requires_grad:
                setattr(layer, name, tensor.detach())


def holds_padding(cache) -> bool:
    return bool(getattr(cache, "rat_holds_padding", False))


def cache_nbytes(cache) -> int:
    """Bytes a cache holds: chunk summaries and states of RAT/rnn layers, keys/values of attention layers."""
    total = 0
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "_layer_type", None) in ("rat", "rnn") and hasattr(layer, "nbytes"):  # any copy of this code
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
    "adopt_cache_layers",
    "cache_dtype_error",
    "cache_nbytes",
    "detach_cache",
    "holds_padding",
    "note_padding",
]
