"""
Training helpers for RAT models, used by the scripts in `examples/` and by anyone training a RAT model with the
`Trainer`, PEFT or TRL:

    from modeling_rat.training import default_lora_config, train_byte_level_bpe, train_resumably

* `lora`: LoRA target modules derived from the model's own linear layers, a default `LoraConfig`;
* `tokenization`: a byte-level BPE trained on the training text, with a ChatML chat template; padding tokens;
* `data`: dataset column and emptiness checks, cutting text to a token budget;
* `sources`: datasets, tokenizers and models named on a command line, with clear errors;
* `checkpoints`: Trainer checkpoints that are complete or recognisably not, resuming from the latest complete one;
* `rouge`: ROUGE-1/2/L;
* `cli`: one `error:` line and a non-zero exit for bad input.

None of this is needed to run a model: this subpackage is not part of the remote-code bundle saved with
checkpoints, and its optional dependencies (peft, rouge-score, datasets) are imported only when used.
"""

from .checkpoints import (
    CheckpointGuard,
    is_complete_checkpoint,
    latest_complete_checkpoint,
    resolve_resume_checkpoint,
    train_resumably,
)
from .data import check_columns, check_not_empty, truncate_to_tokens
from .lora import LORA_TARGET_MODULES, default_lora_config, lora_target_modules
from .rouge import rouge_scores
from .tokenization import DEFAULT_CHAT_TEMPLATE, ensure_pad_token, stop_token_ids, train_byte_level_bpe


__all__ = [
    "CheckpointGuard",
    "DEFAULT_CHAT_TEMPLATE",
    "LORA_TARGET_MODULES",
    "check_columns",
    "check_not_empty",
    "default_lora_config",
    "ensure_pad_token",
    "is_complete_checkpoint",
    "latest_complete_checkpoint",
    "lora_target_modules",
    "resolve_resume_checkpoint",
    "rouge_scores",
    "stop_token_ids",
    "train_byte_level_bpe",
    "train_resumably",
    "truncate_to_tokens",
]
