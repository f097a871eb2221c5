"""Where the tokens of a batch sit: positions, padding, packed sequences, and the grid of chunks RAT layers compute on.

`RatSequenceLayout` is computed once per forward from `attention_mask`, `position_ids` and what the cache holds, and
shared by all layers. `ChunkGrid` arranges the tokens as (rows, chunks, chunk_size) so that every chunk of every
sequence is one row of a tensor; RAT layers run their recurrence and attention on that grid.

Three arrangements, from cheapest to most general:

* columns are positions (no mask, no position ids, empty cache): the grid is a reshape of the input;
* one sequence per row (padding anywhere, a cache to continue): every token is scattered to the slot of its
  position; shapes depend only on the input's shape, so this path traces without data-dependent branches;
* packed rows (position ids restarting inside a row, as TRL's padding-free packing gives): every sequence becomes
  its own grid row.
"""

import torch

from .rat_inputs import require_integer_tensor


# While tracing (torch.compile, torch.export), grids get at least this many chunks: PyTorch's shape tracing treats a
# dimension of size 0 or 1 as a special case, so a grid of one or two chunks (one key summary) would tie an export with
# dynamic lengths to lengths long enough to avoid them. Empty chunks leave every result unchanged.
TRACED_MIN_CHUNKS = 3


class RatSequenceLayout:
    """
    Where every token of a batch sits.

    * `valid` (B, T): False for padding. Padding never enters any state and no real token attends to it.
    * `positions` (B, T): position of each token inside its own sequence (padding and earlier packed sequences do
      not count; 0 for padding). Given `position_ids` win; otherwise they are derived from the mask (cumsum - 1),
      continuing what the cache holds, as `generate()` does.
    * `cached_columns`: tokens the cache holds per row, padding included (a 0-d tensor in compiled decoding with a
      static cache, whose mask then spans the whole cache); `cached_tokens` (B,): real tokens it holds.
    * `key_valid`, `key_positions` (B, cached_columns + T): validity and position of every column an attention layer
      may attend to (`key_valid` is None without a mask).
    * `columns_are_positions`: one sequence per row, from position 0 in column 0, no padding, empty cache: layers
      then reshape instead of scattering (the common training and prefill case).
    * `packed`: some row holds several sequences (a position that does not continue the previous real token's).
    * `has_padding`: some column (cached or new) is padding; None when unknown (while compiling).
    """

    def __init__(
        self, valid, positions, cached_columns, cached_tokens, key_valid, key_positions, columns_are_positions, packed,
        has_padding=None,
    ):
        self.valid = valid
        self.positions = positions
        self.cached_columns = cached_columns
        self.cached_tokens = cached_tokens
        self.key_valid = key_valid
        self.key_positions = key_positions
        self.columns_are_positions = columns_are_positions
        self.packed = packed
        self.has_padding = has_padding
        self._segments = None
        self._chunk_grids = {}

    @classmethod
    def build(
        cls, batch_size, seq_len, device, attention_mask=None, position_ids=None, cached_columns=0,
        cache_has_padding=False, continues_given_cache=False, window_cache=False,
    ):
        """
        The layout of `seq_len` new tokens per row after `cached_columns` cached ones, with clear errors for masks and
        positions that cannot be right. `continues_given_cache`: the caller passed the cache in, to continue it (as
        generate() does), so no row may be right-padded; `window_cache`: the model has sliding-window layers, whose
        cache keeps columns, so no row may have padding between real tokens either.

        Checks of tensor values are read from the device together with what the layout itself needs on the host: one
        synchronisation per call at most, none for plain inputs (no mask, no position ids); compiled code skips them.
        In compiled decoding with a static cache, `cached_columns` is a 0-d tensor and the mask spans the whole cache.
        """
        total = attention_mask.shape[-1] if torch.is_tensor(cached_columns) else cached_columns + seq_len
        checks = _DeviceChecks(enabled=not torch.compiler.is_compiling())
        key_valid = None
        if attention_mask is not None:
            key_valid = _padding_mask(attention_mask, batch_size, total, cached_columns, seq_len, device, checks)
            if continues_given_cache and checks.enabled:
                _refuse_continuing_after_padding(key_valid, cached_columns, window_cache, checks)
        elif cache_has_padding:
            raise ValueError(
                "The cache holds a padded batch: pass the full `attention_mask` (past and new tokens) with every call, as "
                "generate() does, so that padding stays out of the state."
            )
        if key_valid is not None:
            # Indexed rather than sliced: `cached_columns` is a tensor in compiled decoding, where the mask spans the
            # whole static cache (columns after the new tokens are zero).
            columns = torch.arange(key_valid.shape[1], device=device)
            new_columns = columns[:seq_len] + cached_columns
            valid = key_valid[:, new_columns]
            key_positions = (key_valid.long().cumsum(-1) - 1).clamp(min=0)
            cached_tokens = (key_valid & (columns < cached_columns)).sum(-1)
            derived_positions = key_positions[:, new_columns]
        else:
            valid = torch.ones(batch_size, seq_len, dtype=torch.bool, device=device)
            key_positions = torch.arange(total, device=device).unsqueeze(0).expand(batch_size, total)
            cached_tokens = torch.full((batch_size,), cached_columns, dtype=torch.long, device=device)
            derived_positions = key_positions[:, cached_columns:]

        facts = {}  # what the layout needs on the host, read together with the checks
        if position_ids is None:
            positions = derived_positions
        else:
            positions = _check_position_ids(position_ids, valid, batch_size, seq_len, device, checks)
            if checks.enabled and cached_columns:
                _check_continuation(positions, valid, cached_tokens, checks)
            if seq_len > 1:  # packing changes the result: detected even while compiling (a graph break)
                starts = valid & ~_continues_previous_token(positions, valid)
                packed = (starts.sum(1) > 1).any()
                if torch.compiler.is_exporting():  # no graph break in an exported program: one sequence per row
                    torch._assert_async(~packed, "Packed sequences (positions restarting inside a row) are not "
                                        "supported by an exported RAT program: export one sequence per row.")
                else:
                    facts["packed"] = packed
            if key_valid is None and cached_columns == 0:
                key_positions = positions
        positions = torch.where(valid, positions, torch.zeros_like(positions))
        if key_valid is not None and checks.enabled and not cache_has_padding:
            facts["all_valid"] = key_valid.all()
        if checks.enabled and position_ids is not None and cached_columns == 0:
            facts["positions_are_columns"] = (positions == torch.arange(seq_len, device=device)).all()
        facts = checks.read(facts)
        packed = facts.get("packed", False)
        if packed and cached_columns:
            raise ValueError("Packed sequences (positions restarting inside a row) cannot continue a cache.")
        if key_valid is None or "all_valid" in facts:
            has_padding = key_valid is not None and not facts["all_valid"]
        else:  # known from the cache, or unknown while compiling
            has_padding = True if cache_has_padding else None
        columns_are_positions = (
            checks.enabled and cached_columns == 0 and has_padding is False and facts.get("positions_are_columns", True)
        )
        return cls(
            valid, positions, cached_columns, cached_tokens, key_valid, key_positions, columns_are_positions, packed,
            has_padding,
        )

    # ------------------------------------------------------------------------------------------------ segments

    @property
    def segments(self) -> dict:
        """The sequences ("segments") of a packed batch: row, first position and length of each, and each token's."""
        if self._segments is None:
            valid, positions = self.valid, self.positions
            batch_size, seq_len = valid.shape
            starts = valid & ~_continues_previous_token(positions, valid)
            segment_of_token = torch.where(valid, starts.reshape(-1).long().cumsum(0).reshape(batch_size, seq_len) - 1, -1)
            start_rows, start_columns = starts.nonzero(as_tuple=True)
            self._segments = {
                "count": start_rows.shape[0],
                "row": start_rows,
                "first_position": positions[start_rows, start_columns],
                "length": torch.bincount(segment_of_token[valid], minlength=start_rows.shape[0]),
                "of_token": segment_of_token,
            }
        return self._segments

    def chunk_grid(self, chunk_size: int) -> "ChunkGrid":
        if chunk_size not in self._chunk_grids:
            self._chunk_grids[chunk_size] = ChunkGrid(self, chunk_size)
        return self._chunk_grids[chunk_size]

    def sequence_grid(self) -> "ChunkGrid":
        """Each sequence as one chunk holding all its tokens (for recurrences over whole sequences)."""
        return self.chunk_grid(0)

    # ------------------------------------------------------------------------------------------ attention masks

    def attention_mask_for(self, key_columns: torch.Tensor | None, sliding_window: int | None):
        """
        Boolean mask (B, 1, T, K) of which keys each query sees, or None when `is_causal` suffices. `key_columns`
        (K,) or (B, K) are the columns of the keys (None: the T new tokens themselves, no cache).
        """
        batch_size, seq_len = self.valid.shape
        device = self.valid.device
        if key_columns is None:
            if self.columns_are_positions and sliding_window is None:
                return None
            query_columns = torch.arange(seq_len, device=device)
            allowed = query_columns[None, None, :] <= query_columns[None, :, None]
            allowed = allowed & self.valid[:, None, :]
            if self.packed:
                segment = self.segments["of_token"]
                allowed = allowed & (segment[:, :, None] == segment[:, None, :])
            if sliding_window is not None:
                distance = self.positions[:, :, None] - self.positions[:, None, :]
                allowed = allowed & (distance < sliding_window)
        else:
            query_columns = self.cached_columns + torch.arange(seq_len, device=device)
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


class _DeviceChecks:
    """
    Conditions on tensor values, read from the device in one go (one synchronisation, however many there are) together
    with the facts the layout needs on the host. A condition that holds raises its error; conditions are not
    registered while compiling (compiled code cannot read values), facts are read anyway (a graph break).
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._failures = []  # (0-d bool tensor: the check failed, function returning the error)

    def fail_if(self, failed: torch.Tensor, error):
        if self.enabled:
            self._failures.append((failed, error))

    def read(self, facts: dict) -> dict:
        """Raise the first failed check's error; return `facts` (name: 0-d bool tensor) as Python booleans."""
        tensors = [failed for failed, _ in self._failures] + list(facts.values())
        if not tensors:
            return {}
        values = torch.stack(tensors).tolist()
        for failed, (_, error) in zip(values, self._failures):
            if failed:
                raise error()
        return dict(zip(facts, values[len(self._failures):]))


def _padding_mask(attention_mask, batch_size, total, cached_columns, seq_len, device, checks) -> torch.Tensor:
    """
    The 2-D padding mask as booleans, after checking its type, shape and values: 1 (or True) marks a real token and 0
    padding, in any dtype. Other values are refused, additive masks (0 to attend, -inf or a large negative number to
    mask) included: read as booleans they would turn padding into real tokens. An additive mask without padding is
    all zeros, which cannot be told from a mask where everything is padding: floating-point masks of zeros only are
    refused too (integer and boolean ones are taken as they read: all padding, as when a left-padded batch is fed in
    pieces).
    """
    if not torch.is_tensor(attention_mask):
        raise TypeError(
            f"`attention_mask` must be a tensor (1 for real tokens, 0 for padding), got {type(attention_mask).__name__}."
        )
    if attention_mask.dim() != 2:
        raise ValueError(
            f"RAT models take a 2-D padding mask (batch, tokens), got shape {tuple(attention_mask.shape)}: pass the "
            "tokenizer's `attention_mask` (1 for real tokens, 0 for padding)."
        )
    if attention_mask.shape != (batch_size, total):
        raise ValueError(
            f"`attention_mask` has shape {tuple(attention_mask.shape)}, expected ({batch_size}, {total}): one column per "
            f"token, the {cached_columns} the cache holds followed by the {seq_len} new ones."
        )
    if attention_mask.is_complex():
        raise TypeError(f"`attention_mask` must hold 0 and 1, got a {attention_mask.dtype} tensor.")
    key_valid = attention_mask.to(device=device, dtype=torch.bool)
    if attention_mask.dtype != torch.bool:
        mask = attention_mask.to(device)
        # integers: 0 and 1 have no bit above the lowest; floats: 0 and 1 are the values equal to their boolean
        not_zero_one = (mask & -2) if not mask.is_floating_point() else (mask != key_valid)
        checks.fail_if(not_zero_one.any(), lambda: _mask_values_error(mask))
    if attention_mask.is_floating_point():  # zeros only: all padding, or an additive mask without padding?
        checks.fail_if(
            ~key_valid.any(),
            lambda: ValueError(
                "`attention_mask` is a floating-point mask of zeros only, which marks every token as padding (1 marks a "
                "real token, 0 padding). If it is an additive mask (0 = attend), pass torch.ones_like(mask); if every "
                "token is padding indeed (a left-padded batch fed in pieces), pass it as an integer or boolean mask."
            ),
        )
    return key_valid


def _mask_values_error(mask: torch.Tensor) -> ValueError:
    others = mask[(mask != 0) & (mask != 1)]
    additive = bool((others < 0).all())
    return ValueError(
        f"`attention_mask` must hold 1 for real tokens and 0 for padding, but it holds {others[0].item()}"
        + (
            ": this looks like an additive mask (0 to attend, a large negative number or -inf to mask). Convert it with "
            "`attention_mask = (mask == 0).long()`."
            if additive
            else "."
        )
    )


def _refuse_continuing_after_padding(key_valid: torch.Tensor, cached_columns: int, window_cache: bool, checks):
    """
    A batch fed into a given cache is continued after its last column (generate() samples the next token from the
    logits there and appends it). A right-padded row cannot be: its next token would follow the padding, and generate()
    would have read the logits of a padding column. Padding between real tokens (a hole, which a row also shows after a
    right-padded prompt was continued) is otherwise harmless, except for a model with sliding-window layers: their
    cache keeps the last `sliding_window` columns, padding included, so real tokens would leave the window too early.
    """

    right_padded = _ends_in_padding(key_valid)  # a right-padded prompt, prefilled into the given cache
    if cached_columns:  # a right-padded prompt in the cache, continued
        right_padded = right_padded | _ends_in_padding(key_valid[:, :cached_columns])
    refusals = [(right_padded, (
        "has padding after its real tokens (right padding), and the batch is fed into a given cache, to be continued: "
        "its next tokens would follow the padding (generate() would read the logits of a padding column). Pad on the "
        "left (`tokenizer.padding_side = \"left\"`) for generation and caches."
    ))]
    if window_cache:
        hole = (key_valid[:, :-1] > key_valid[:, 1:]).any(1)  # a real token, then padding
        refusals.append((hole, (
            "has padding after real tokens, and the batch continues a given cache of a model with sliding-window "
            "layers: their cache keeps the last `sliding_window` columns, padding included, so real tokens would leave "
            "the window too early. Put all padding on the left (`tokenizer.padding_side = \"left\"`) or run without a "
            "cache."
        )))
    for rows, reason in refusals:
        checks.fail_if(rows.any(), lambda rows=rows, reason=reason: ValueError(
            f"Row {int(rows.nonzero()[0, 0])} of `attention_mask` {reason}"
        ))


def _ends_in_padding(columns: torch.Tensor) -> torch.Tensor:
    """Rows (B,) whose real tokens are followed by padding up to the last column."""
    return columns.any(1) & ~columns[:, -1]


def _check_position_ids(position_ids, valid, batch_size, seq_len, device, checks) -> torch.Tensor:
    require_integer_tensor("position_ids", position_ids, "positions are token counts")
    positions = position_ids.to(device=device, dtype=torch.long)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.dim() != 2 or positions.shape[1] != seq_len or positions.shape[0] not in (1, batch_size):
        raise ValueError(
            f"`position_ids` has shape {tuple(position_ids.shape)} but the input has {batch_size} rows of {seq_len} new "
            f"tokens: give one position per new token, shape ({batch_size}, {seq_len})."
        )
    positions = positions.expand(batch_size, seq_len)
    negative = valid & (positions < 0)
    checks.fail_if(
        negative.any(),
        lambda: ValueError(
            f"`position_ids` must be >= 0 (a token's position inside its sequence), got {int(positions[negative].min())}."
        ),
    )
    return positions


def _continues_previous_token(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the token has an earlier real token in its row and its position is that token's plus one."""
    batch_size, seq_len = valid.shape
    columns = torch.arange(seq_len, device=valid.device).expand(batch_size, seq_len)
    last_valid = torch.cummax(torch.where(valid, columns, torch.full_like(columns, -1)), dim=1).values
    previous = torch.cat([torch.full_like(last_valid[:, :1], -1), last_valid[:, :-1]], dim=1)
    return (previous >= 0) & (positions == positions.gather(1, previous.clamp(min=0)) + 1)


def _check_continuation(positions, valid, cached_tokens, checks):
    """
    With a cache, the first new real token of every row (one token or several) must be at the position that
    continues it: the number of real tokens the row holds. (Later new tokens must continue the first: a restart would
    be packing, refused with a cache.)
    """
    has_tokens = valid.any(1)
    first_column = torch.where(has_tokens, valid.long().argmax(1), 0)
    first_position = positions.gather(1, first_column[:, None])[:, 0]
    bad = has_tokens & (first_position != cached_tokens)

    def error():
        row = int(bad.nonzero()[0, 0])
        expected, given = int(cached_tokens[row]), int(first_position[row])
        if expected == 0:  # generate() numbers the first new token of an all-padding prompt 1
            return ValueError(
                f"Row {row} has no real token before this one (its `attention_mask` is all zeros there: an empty "
                f"prompt?), so its next position is 0, but `position_ids` give {given}. Give every prompt at least one "
                "token (e.g. the BOS token)."
            )
        return ValueError(
            f"Row {row} continues a cache holding {expected} tokens, so its next position is {expected}, but "
            f"`position_ids` give {given}. Omit `position_ids` (they are derived from the attention mask) or make them "
            "continue the cache."
        )

    checks.fail_if(bad.any(), error)


class ChunkGrid:
    """
    Tokens arranged as (rows, chunks, chunk_size): grid chunk i of a row is the sequence's chunk `first_chunk + i`,
    and the token at position p sits at (its row, p // L - first_chunk, p % L). Empty slots hold gate 1 and input 0,
    which leave a recurrence unchanged. `chunk_size=0` puts each sequence in one chunk holding all its tokens.

    * columns are positions: a reshape (one grid row per batch row);
    * one sequence per row: one grid row per batch row, `first_chunk` the chunk the cache left the row in, and as
      many chunks as T new tokens can touch: shapes depend on the input's shape only;
    * packed: one grid row per sequence.
    """

    def __init__(self, layout: RatSequenceLayout, chunk_size: int):
        self.layout = layout
        batch_size, seq_len = layout.valid.shape
        device = layout.valid.device
        whole_sequences = chunk_size == 0
        if layout.packed:
            segments = layout.segments
            self.num_rows = segments["count"]
            self.batch_row = segments["row"]
            first_position = segments["first_position"]
            longest = int(segments["length"].max()) if self.num_rows else 1
            row_of_token = segments["of_token"]
        else:
            self.num_rows = batch_size
            self.batch_row = torch.arange(batch_size, device=device)
            has_tokens = layout.valid.any(1)
            first_column = torch.where(has_tokens, layout.valid.long().argmax(1), 0)
            first_position = torch.where(has_tokens, layout.positions.gather(1, first_column[:, None])[:, 0], layout.cached_tokens)
            longest = seq_len
            row_of_token = self.batch_row[:, None].expand(batch_size, seq_len)
        self.new_tokens = layout.valid.sum(1) if not layout.packed else layout.segments["length"]
        if whole_sequences:  # positions counted from each sequence's (or this call's) first token
            self.chunk_size = max(longest, 1)
            self.num_chunks = 1
            self.first_chunk = torch.zeros(self.num_rows, dtype=torch.long, device=device)
            offset = first_position
        else:
            self.chunk_size = chunk_size
            # A sequence that may start inside a chunk spans one chunk more than its length alone needs.
            may_start_inside_chunk = not layout.columns_are_positions
            fewest_chunks = TRACED_MIN_CHUNKS if torch.compiler.is_compiling() else 1
            self.num_chunks = max(fewest_chunks, -(-(longest + (chunk_size - 1 if may_start_inside_chunk else 0)) // chunk_size))
            self.first_chunk = torch.div(first_position, chunk_size, rounding_mode="floor")
            offset = self.first_chunk * chunk_size
        self.slots = self.num_chunks * self.chunk_size
        self.last_slot = (first_position + self.new_tokens - 1 - offset).clamp(min=0)  # slot of each row's last token
        if layout.columns_are_positions:
            self.token_slot = None
        else:
            relative = layout.positions - offset[row_of_token.clamp(min=0)]
            dump = self.num_rows * self.slots  # one spare slot that padding tokens are written to and never read from
            self.token_slot = torch.where(layout.valid, row_of_token * self.slots + relative, dump).reshape(-1)

    @property
    def chunk_index(self) -> torch.Tensor:
        """(rows, chunks): the absolute chunk index (rotary position) of every grid chunk."""
        return self.first_chunk[:, None] + torch.arange(self.num_chunks, device=self.first_chunk.device)

    def to_grid(self, tokens: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(B, T, *feature) -> (rows, chunks, L, *feature)."""
        batch_size, seq_len = tokens.shape[:2]
        feature = tokens.shape[2:]
        if self.token_slot is None:
            if self.slots != seq_len:
                tokens = torch.cat([tokens, tokens.new_full((batch_size, self.slots - seq_len, *feature), fill)], dim=1)
            return tokens.reshape(batch_size, self.num_chunks, self.chunk_size, *feature)
        grid = tokens.new_full((self.num_rows * self.slots + 1, *feature), fill)
        grid = grid.index_copy(0, self.token_slot, tokens.reshape(batch_size * seq_len, *feature))
        return grid[:-1].reshape(self.num_rows, self.num_chunks, self.chunk_size, *feature)

    def from_grid(self, grid: torch.Tensor, seq_len: int) -> torch.Tensor:
        """(rows, chunks, L, *feature) -> (B, T, *feature); padding tokens get zeros."""
        feature = grid.shape[3:]
        flat = grid.reshape(self.num_rows * self.slots, *feature)
        if self.token_slot is None:
            return flat.reshape(self.num_rows, self.slots, *feature)[:, :seq_len]
        valid = self.layout.valid
        slots = self.token_slot.clamp(max=flat.shape[0] - 1)
        tokens = flat.index_select(0, slots).reshape(*valid.shape, *feature)
        keep = valid.reshape(*valid.shape, *([1] * len(feature)))
        return torch.where(keep, tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))

    def last_token(self, grid: torch.Tensor) -> torch.Tensor:
        """(rows, chunks, L, *feature) -> (rows, *feature): the slot of each row's last token (any slot if it has none)."""
        flat = grid.reshape(self.num_rows, self.slots, *grid.shape[3:])
        return flat[torch.arange(self.num_rows, device=grid.device), self.last_slot]
