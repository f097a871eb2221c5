"""Training helpers for RAT models: LoRA defaults, tokenizer and dataset checks, ROUGE.

Used by the scripts in `examples/` and by anyone fine-tuning a RAT model with PEFT or TRL:

    from peft import LoraConfig
    from modeling_rat.training_rat import LORA_TARGET_MODULES, lora_target_modules

    LoraConfig(r=16, lora_alpha=32, target_modules=lora_target_modules(model.config), task_type="CAUSAL_LM")

Nothing here is needed to run a model, so this file is not part of the remote-code bundle saved with checkpoints,
and its optional dependencies (peft, rouge-score) are imported only when used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence


logger = logging.getLogger(__name__)

# The projections of every mixer and MLP, by layer type. LoRA adapts `nn.Linear` layers only: the RAT forget-gate
# bias (`forget_gate_bias`, a plain parameter), the norms and the embedding stay frozen.
LORA_TARGETS_BY_LAYER_TYPE = {
    "rat": ("q_proj", "k_proj", "v_proj", "o_proj", "output_gate_proj", "forget_gate_proj"),
    "rnn": ("v_proj", "o_proj", "output_gate_proj", "forget_gate_proj"),
    "full_attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "sliding_attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
MLP_LORA_TARGETS = ("up_proj", "down_proj")

# Default LoRA `target_modules`: every projection of every mixer type and of the MLPs (all linear layers of the
# model except the LM head). PEFT matches these names as suffixes of module names and skips names a model lacks.
LORA_TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "output_gate_proj",
    "forget_gate_proj",
    "up_proj",
    "down_proj",
]


def lora_target_modules(config, include_mlp: bool = True) -> list[str]:
    """
    The LoRA target names that exist in a model with this configuration (a subset of `LORA_TARGET_MODULES`, in
    its order): the projections of its layer types, plus the MLPs' `up_proj`/`down_proj` if `include_mlp`.
    """
    present = set(MLP_LORA_TARGETS) if include_mlp else set()
    for layer_type in config.layer_types:
        if layer_type not in LORA_TARGETS_BY_LAYER_TYPE:
            raise ValueError(f"Unknown layer type {layer_type!r}: expected one of {list(LORA_TARGETS_BY_LAYER_TYPE)}.")
        present.update(LORA_TARGETS_BY_LAYER_TYPE[layer_type])
    return [name for name in LORA_TARGET_MODULES if name in present]


def default_lora_config(config, r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.05, **kwargs):
    """A `peft.LoraConfig` for causal language modelling on all projections of the model (see `LORA_TARGET_MODULES`)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=lora_target_modules(config),
        task_type="CAUSAL_LM",
        **kwargs,
    )


# ================================================================================================ tokenizers


def ensure_pad_token(tokenizer):
    """
    Give a tokenizer without a padding token one, the documented way: reuse its end-of-sequence token (padding is
    masked out of every state and loss, so its identity does not matter). Raises if the tokenizer has neither.
    Returns the tokenizer.
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise ValueError(
            f"The tokenizer ({type(tokenizer).__name__}) has neither a padding token nor an end-of-sequence token. "
            "Add one before training, e.g. `tokenizer.add_special_tokens({'pad_token': '<pad>'})` followed by "
            "`model.resize_token_embeddings(len(tokenizer))`."
        )
    logger.warning("The tokenizer has no padding token: using its end-of-sequence token %r for padding.", tokenizer.eos_token)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2):
    """
    Train a byte-level BPE tokenizer (GPT-2 style: any text round-trips, no unknown token) on `texts` with the
    `tokenizers` library, and wrap it in a `PreTrainedTokenizerFast` with `<|endoftext|>` as beginning, end and
    unknown token and `<pad>` as padding token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 260:
        raise ValueError(f"`vocab_size` must be at least 260 (256 bytes + special tokens) for a byte-level BPE, got {vocab_size}.")
    special_tokens = ["<|endoftext|>", "<pad>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )


# ================================================================================================== datasets


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


# ===================================================================================================== ROUGE


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (x100) of `predictions` against `references`, with `rouge-score` and Porter stemming."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    if not predictions:
        raise ValueError("No predictions to score.")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)
        for key in totals:
            totals[key] += scores[key].fmeasure
    return {key: 100.0 * value / len(predictions) for key, value in totals.items()}


__all__ = [
    "LORA_TARGET_MODULES",
    "LORA_TARGETS_BY_LAYER_TYPE",
    "lora_target_modules",
    "default_lora_config",
    "ensure_pad_token",
    "train_byte_level_bpe",
    "check_columns",
    "check_not_empty",
    "truncate_to_tokens",
    "rouge_scores",
]
