"""Dataset checks and cutting text to a token budget, with errors that name the option to change."""

from __future__ import annotations

from collections.abc import Sequence


def check_columns(dataset, columns: Sequence[str], split: str, option_hint: str = "") -> None:
    """Raise a ValueError naming the missing columns and the available ones if `dataset` lacks any of `columns`."""
    available = list(dataset.column_names)
    missing = [column for column in columns if column not in available]
    if missing:
        hint = f" Choose the right ones with {option_hint}." if option_hint else ""
        raise ValueError(f"The {split} split has no column(s) {missing}; its columns are {available}.{hint}")


def check_not_empty(dataset, split: str, what: str = "examples") -> None:
    """Raise a ValueError if a split has no rows."""
    if dataset is None or len(dataset) == 0:
        raise ValueError(
            f"The {split} split is empty (0 {what}). Check the dataset name, configuration and split, and any limits "
            "or filters (length limits drop examples that cannot fit)."
        )


def truncate_to_tokens(tokenizer, text: str, max_tokens: int) -> tuple[str, bool]:
    """
    `text` cut at a token boundary so that it holds at most `max_tokens` tokens of `tokenizer` (no special tokens
    added). Returns the text and whether it was cut. Uses the fast tokenizer's character offsets, so the kept part is
    the original text, not a decoded approximation.
    """
    if max_tokens < 1:
        raise ValueError(f"`max_tokens` must be >= 1, got {max_tokens}.")
    if not getattr(tokenizer, "is_fast", False):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text, False
        return tokenizer.decode(ids[:max_tokens]), True
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoding["offset_mapping"]
    if len(offsets) <= max_tokens:
        return text, False
    return text[: offsets[max_tokens - 1][1]], True
