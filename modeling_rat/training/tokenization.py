"""Tokenizers for RAT training: a byte-level BPE trained on the training text, with a default chat template."""

from __future__ import annotations

import logging
from collections.abc import Iterable


logger = logging.getLogger(__name__)

END_OF_TEXT = "<|endoftext|>"
PAD = "<pad>"
# ChatML turn markers, special tokens of every trained tokenizer.
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"

# ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n` per message. The assistant's content and its `<|im_end|>` sit
# inside `{% generation %}` markers, so that TRL's `assistant_only_loss=True` supervises exactly the assistant turns,
# end-of-turn token included (the model learns to stop). The prompt rendered with `add_generation_prompt=True` is a
# prefix of the full conversation, as TRL's prompt/completion format needs.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '" + TURN_START + "' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '" + TURN_END + "' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + '" + TURN_END + "' }}"
    "{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '" + TURN_START + "assistant\\n' }}{%- endif %}"
)


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2,
                         chat_template: str | None = DEFAULT_CHAT_TEMPLATE):
    """
    Train a byte-level BPE tokenizer (GPT-2 style: any text round-trips, no unknown token) on `texts` with the
    `tokenizers` library, and wrap it in a `PreTrainedTokenizerFast`: `<|endoftext|>` is the beginning, end and
    unknown token, `<pad>` pads, and `<|im_start|>`/`<|im_end|>` mark chat turns for `chat_template` (by default the
    ChatML template `DEFAULT_CHAT_TEMPLATE`; `None` for none).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special_tokens = [END_OF_TEXT, PAD, TURN_START, TURN_END]
    minimum = 256 + len(special_tokens)
    if vocab_size < minimum:
        raise ValueError(f"`vocab_size` must be at least {minimum} (256 bytes + special tokens) for a byte-level BPE, "
                         f"got {vocab_size}.")
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
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=PAD,
        extra_special_tokens=[TURN_START, TURN_END],
    )
    wrapped.chat_template = chat_template
    return wrapped


def stop_token_ids(tokenizer) -> list[int]:
    """
    The tokens generation should stop at: the end-of-sequence token and, for a tokenizer with the default chat
    template's turn marker, `<|im_end|>` (so that a chat model stops at the end of its turn).
    """
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END) if TURN_END in tokenizer.get_vocab() else None
    return stops + ([turn_end] if turn_end is not None and turn_end not in stops else [])


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
