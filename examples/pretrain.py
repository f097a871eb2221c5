"""Pretrain one of the paper's five models (attention, rnn, rat, attention-swa, rat-swa) from scratch with the
Hugging Face `Trainer`, and report validation loss and perplexity.

    python examples/pretrain.py --model rat --size mini --max-steps 300 --output-dir runs/rat-mini
    python examples/pretrain.py --model rat-swa --hidden-size 384 --num-layers 6 --num-heads 6 ...
    python examples/pretrain.py --dataset Salesforce/wikitext --dataset-config wikitext-103-raw-v1 \\
        --tokenizer meta-llama/Llama-2-7b-hf --model rat --size 200m --block-size 2048
    accelerate launch --num_processes 2 examples/pretrain.py ...      # several processes (see docs)

A checkpoint is saved at each validation (`--save-steps`); a rerun of the same command resumes from the latest
complete one in `--output-dir` (`--resume-from-checkpoint none` starts fresh), exactly where the run stopped. Ctrl-C
while a checkpoint is being written stops once it is complete.

Default corpus (offline, on every machine): the Python standard library's sources, with a byte-level BPE tokenizer
trained on them by `tokenizers` (with a ChatML chat template, for conversational fine-tuning). The output folder
holds a remote-code checkpoint (`save_pretrained`: config with `auto_map`, model code, weights) and the tokenizer,
loadable with `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

from configuration_rat import PAPER_LAYER_PATTERNS, PRESET_SIZES
from modeling_rat import RatConfig, RatForCausalLM
from modeling_rat.training import (
    check_columns,
    check_not_empty,
    ensure_pad_token,
    resolve_resume_checkpoint,
    stop_token_ids,
    train_byte_level_bpe,
    train_resumably,
)
from modeling_rat.training.checkpoints import add_checkpoint_arguments, signals_held
from modeling_rat.training.cli import configure_job, float_in, int_at_least, prepare_output_dir, run_command
from modeling_rat.training.launch import activation_checkpointing_argument, check_distribution, no_accelerator
from modeling_rat.training.sources import load_dataset_dict, load_tokenizer


logger = logging.getLogger("pretrain")
POSITIVE = int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="rat", choices=list(PAPER_LAYER_PATTERNS), help="layer pattern (paper's five models)")
    model.add_argument("--size", default="mini", choices=list(PRESET_SIZES), help="preset size (vocabulary comes from the tokenizer)")
    model.add_argument("--hidden-size", type=POSITIVE, help="override the preset's width")
    model.add_argument("--num-layers", type=POSITIVE, help="override the preset's depth")
    model.add_argument("--num-heads", type=POSITIVE, help="override the preset's head count")
    model.add_argument("--intermediate-size", type=POSITIVE, help="MLP width (default 4 x hidden size)")
    model.add_argument("--num-qk-groups", type=POSITIVE, default=2, help="RAT key/query groups (paper: 2)")
    model.add_argument("--chunk-size", type=POSITIVE, default=16, help="RAT chunk length L (paper: 16)")
    model.add_argument("--sliding-window", type=POSITIVE,
                       help="tokens a sliding-window query sees, itself included (default: block size / 4, so "
                            "that the window is shorter than the sequences)")
    model.add_argument("--rat-implementation", default="auto", choices=["auto", "fast", "reference", "triton"])
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="Hub dataset name, local dataset folder or data file (.jsonl, .csv, .parquet, "
                                        ".txt, ...) (default: the Python standard library)")
    data.add_argument("--dataset-config", help="dataset configuration name")
    data.add_argument("--text-column", default="text", help="column holding the text (Hub datasets)")
    data.add_argument("--validation-split", default="validation",
                      help="split to validate on; if the dataset lacks it, --validation-fraction of train is held out")
    data.add_argument("--validation-fraction", type=float_in(0, 1, low_inclusive=False, high_inclusive=False),
                      default=0.05, help="part of train held out when the dataset has no validation split")
    data.add_argument("--max-train-chars", type=POSITIVE, default=None, help="cap on training text (characters)")
    data.add_argument("--max-eval-blocks", type=POSITIVE, default=64, help="cap on validation blocks")
    data.add_argument("--tokenizer", help="tokenizer name or folder (default: train a byte-level BPE with a ChatML chat "
                                          "template on the training text)")
    data.add_argument("--vocab-size", type=POSITIVE, default=8192, help="vocabulary of the trained BPE tokenizer")
    data.add_argument("--tokenizer-train-chars", type=POSITIVE, default=3_000_000, help="text used to train the BPE tokenizer")
    data.add_argument("--block-size", type=int_at_least(2), default=256, help="tokens per training sequence")
    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", default="runs/pretrain")
    train.add_argument("--max-steps", type=POSITIVE, default=300)
    train.add_argument("--batch-size", type=POSITIVE, default=8, help="per device")
    train.add_argument("--gradient-accumulation-steps", type=POSITIVE, default=1)
    train.add_argument("--learning-rate", type=float_in(0, low_inclusive=False), default=2e-3)
    train.add_argument("--weight-decay", type=float_in(0), default=0.1)
    train.add_argument("--warmup-ratio", type=float_in(0, 1), default=0.05)
    train.add_argument("--eval-steps", type=POSITIVE, help="validate every N steps (default: 4 times per run)")
    train.add_argument("--logging-steps", type=POSITIVE, default=10)
    add_checkpoint_arguments(train, default_save_steps="at each validation", folder="--output-dir")
    train.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing (less memory)")
    train.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPUs with bf16 support)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--disable-tqdm", action="store_true")
    return parser


# ====================================================================================================== data


def load_texts(args) -> tuple[list[str], list[str], str]:
    """Training and validation documents, and a description of where they come from."""
    if args.dataset is None:
        from stdlib_data import standard_library_corpus, standard_library_dir

        corpus = standard_library_corpus()
        train = [doc["text"] for doc in corpus["train"]]
        validation = [doc["text"] for doc in corpus["validation"]]
        description = f"Python standard library sources at {standard_library_dir()} (split by package)"
    else:
        dataset = load_dataset_dict(args.dataset, args.dataset_config)
        if "train" not in dataset:
            raise ValueError(f"Dataset {args.dataset!r} has no 'train' split; its splits are {list(dataset)}.")
        check_columns(dataset["train"], [args.text_column], "train", "--text-column")
        if args.validation_split in dataset:
            validation_set = dataset[args.validation_split]
            check_columns(validation_set, [args.text_column], args.validation_split, "--text-column")
            train_set = dataset["train"]
        else:
            check_not_empty(dataset["train"], "train")
            if len(dataset["train"]) < 2:
                raise ValueError("The train split has a single document: cannot hold out a validation part.")
            parts = dataset["train"].train_test_split(test_size=args.validation_fraction, seed=args.seed)
            train_set, validation_set = parts["train"], parts["test"]
            logger.info("No %r split: holding out %.0f%% of train for validation.", args.validation_split,
                        100 * args.validation_fraction)
        train = [text for text in train_set[args.text_column] if isinstance(text, str) and text.strip()]
        validation = [text for text in validation_set[args.text_column] if isinstance(text, str) and text.strip()]
        description = f"dataset {args.dataset}" + (f" ({args.dataset_config})" if args.dataset_config else "")
    if args.max_train_chars is not None:
        train = _cap_chars(train, args.max_train_chars)
    if not train:
        raise ValueError(f"The train split of {description} has no non-empty text.")
    if not validation:
        raise ValueError(f"The validation split of {description} has no non-empty text.")
    return train, validation, description


def _cap_chars(texts: list[str], max_chars: int) -> list[str]:
    kept, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        kept.append(text[: max_chars - total])
        total += len(kept[-1])
    return kept


def given_tokenizer(args, checkpoint: str | None):
    """The tokenizer of the checkpoint resumed from, or the one --tokenizer names; None if one is to be trained."""
    if checkpoint is not None:
        logger.info("Using the tokenizer saved with %s", checkpoint)
        return load_tokenizer(checkpoint, "--resume-from-checkpoint")
    if args.tokenizer:
        return ensure_pad_token(load_tokenizer(args.tokenizer))
    return None


def train_tokenizer(args, train_texts: list[str], training_args: TrainingArguments):
    """A byte-level BPE trained on the training text (once, by the main process of each node)."""
    tokenizer_dir = Path(args.output_dir) / "tokenizer"
    with training_args.main_process_first(desc="training the tokenizer", local=True):
        if training_args.local_process_index != 0:  # the node's main process has just trained and saved it
            tokenizer = load_tokenizer(str(tokenizer_dir))
        else:
            start = time.perf_counter()
            sample = _cap_chars(train_texts, args.tokenizer_train_chars)
            tokenizer = train_byte_level_bpe(sample, vocab_size=args.vocab_size)
            tokenizer.save_pretrained(tokenizer_dir)
            logger.info("Trained a byte-level BPE tokenizer (%d tokens) on %s characters in %.1fs", len(tokenizer),
                        f"{sum(map(len, sample)):,}", time.perf_counter() - start)
    return tokenizer


def tokenize_into_blocks(texts: list[str], tokenizer, block_size: int, max_blocks: int | None = None):
    """Documents joined with the end-of-sequence token and cut into blocks of `block_size` tokens."""
    from datasets import Dataset
    from tqdm.auto import tqdm

    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no end-of-sequence token to separate documents: give one (eos_token).")
    blocks, buffer = [], []
    batch = 64
    for start in tqdm(range(0, len(texts), batch), desc="tokenizing", unit_scale=batch, leave=False):
        for ids in tokenizer(texts[start: start + batch], add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            buffer.append(tokenizer.eos_token_id)
            while len(buffer) >= block_size:
                blocks.append(buffer[:block_size])
                buffer = buffer[block_size:]
        if max_blocks is not None and len(blocks) >= max_blocks:
            blocks = blocks[:max_blocks]
            break
    # Every block is full, so no padding: labels are the inputs themselves (the model shifts them). Not
    # DataCollatorForLanguageModeling, which would mask the EOS separators when a tokenizer pads with EOS.
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks})


# ===================================================================================================== model


def build_config(args, tokenizer) -> RatConfig:
    overrides = dict(
        vocab_size=len(tokenizer),
        chunk_size=args.chunk_size,
        num_qk_groups=args.num_qk_groups,
        rnn_forget_gate_init_length=args.block_size,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        rat_implementation=args.rat_implementation,
    )
    for argument, field in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                            ("num_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size")):
        if getattr(args, argument) is not None:
            overrides[field] = getattr(args, argument)
    if "hidden_size" in overrides and "intermediate_size" not in overrides:
        overrides["intermediate_size"] = 4 * overrides["hidden_size"]
    if args.model.endswith("-swa"):
        overrides["sliding_window"] = args.sliding_window or max(2, args.block_size // 4)
    return RatConfig.from_preset(args.model, args.size, **overrides)


# Fields that fix the weights' shapes or meaning: a checkpoint resumes only into a model that agrees on all of them.
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_qk_groups", "chunk_size", "layer_types", "sliding_window", "rnn_forget_gate_init_length")


def check_checkpoint_config(config: RatConfig, checkpoint: str) -> None:
    """Refuse to resume a checkpoint of another architecture, naming the options that differ."""
    saved = RatConfig.from_pretrained(checkpoint)
    differences = [f"{field} {getattr(saved, field)} (this command: {getattr(config, field)})"
                   for field in ARCHITECTURE_FIELDS if getattr(saved, field) != getattr(config, field)]
    if differences:
        raise ValueError(
            f"Cannot resume from {checkpoint}: it was trained with {'; '.join(differences)}. Rerun with the options of "
            "the run that wrote it, or start fresh with --resume-from-checkpoint none (or another --output-dir)."
        )


# ================================================================================================== training


def training_arguments(args, eval_steps: int) -> TrainingArguments:
    return TrainingArguments(
        use_cpu=no_accelerator(),
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, int(args.warmup_ratio * args.max_steps)),
        eval_strategy="steps",
        eval_steps=eval_steps,
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps or eval_steps,
        save_total_limit=args.save_total_limit,
        report_to="none",
        bf16=args.bf16,
        **activation_checkpointing_argument(args.gradient_checkpointing),
        seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=args.disable_tqdm,
        ddp_find_unused_parameters=False,
    )


def run_pretraining(args) -> dict:
    """Train, validate, save; returns the metrics (also written to `<output-dir>/pretrain_results.json`)."""
    prepare_output_dir(args.output_dir)
    set_seed(args.seed)
    eval_steps = args.eval_steps or max(1, args.max_steps // 4)
    training_args = training_arguments(args, eval_steps)
    check_distribution(training_args)
    checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    tokenizer = given_tokenizer(args, checkpoint)  # before reading the corpus: a bad --tokenizer fails at once
    train_texts, validation_texts, source = load_texts(args)
    logger.info("Corpus: %s: %d training and %d validation documents (%s training characters)", source,
                len(train_texts), len(validation_texts), f"{sum(map(len, train_texts)):,}")
    if tokenizer is None:
        tokenizer = train_tokenizer(args, train_texts, training_args)
    with training_args.main_process_first(desc="tokenizing"):
        train_blocks = tokenize_into_blocks(train_texts, tokenizer, args.block_size)
        eval_blocks = tokenize_into_blocks(validation_texts, tokenizer, args.block_size, args.max_eval_blocks)
    check_not_empty(train_blocks, "train", f"blocks of {args.block_size} tokens")
    check_not_empty(eval_blocks, "validation", f"blocks of {args.block_size} tokens")
    tokens_per_step = args.batch_size * args.gradient_accumulation_steps * training_args.world_size * args.block_size
    logger.info("%d training blocks (%s tokens), %d validation blocks of %d tokens; %d steps x %s tokens = %.2f epochs",
                len(train_blocks), f"{len(train_blocks) * args.block_size:,}", len(eval_blocks), args.block_size,
                args.max_steps, f"{tokens_per_step:,}", args.max_steps * tokens_per_step / (len(train_blocks) * args.block_size))

    config = build_config(args, tokenizer)
    if checkpoint is not None:
        check_checkpoint_config(config, checkpoint)
    model = RatForCausalLM(config)
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)  # chat turns end with <|im_end|>
    parameters = model.num_parameters()
    logger.info("Model %s: %s parameters (%s without embeddings), layers %s, D=%d, H=%d, L=%d%s", args.model,
                f"{parameters:,}", f"{model.num_parameters(exclude_embeddings=True):,}", config.layer_types,
                config.hidden_size, config.num_attention_heads, config.chunk_size,
                f", window {config.sliding_window}" if config.sliding_window else "")

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_blocks,
        eval_dataset=eval_blocks,
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    start = time.perf_counter()
    train_result = train_resumably(trainer, checkpoint)
    train_seconds = time.perf_counter() - start
    evaluation = trainer.evaluate()
    eval_loss = evaluation["eval_loss"]
    metrics = {
        "model": args.model,
        "layer_types": config.layer_types,
        "parameters": parameters,
        "non_embedding_parameters": model.num_parameters(exclude_embeddings=True),
        "train_loss": train_result.training_loss,
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(min(eval_loss, 50.0)),
        "steps": args.max_steps,
        "resumed_from": checkpoint,
        "processes": training_args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type.value),
        "train_tokens": args.max_steps * tokens_per_step,
        "train_seconds": train_seconds,
        "corpus": source,
        "eval_history": [
            {"step": entry["step"], "eval_loss": entry["eval_loss"]}
            for entry in trainer.state.log_history if "eval_loss" in entry
        ],
        "output_dir": str(Path(args.output_dir).resolve()),
    }
    with signals_held(f"the model in {args.output_dir}"):
        trainer.save_model(args.output_dir)  # remote-code checkpoint + tokenizer (main process only)
    if trainer.is_world_process_zero():
        with open(Path(args.output_dir) / "pretrain_results.json", "w") as file:
            json.dump(metrics, file, indent=2)
        logger.info("Validation loss %.4f, perplexity %.2f (%d steps, %s tokens, %.0fs). Saved to %s", eval_loss,
                    metrics["eval_perplexity"], args.max_steps, f"{metrics['train_tokens']:,}", train_seconds,
                    args.output_dir)
    return metrics


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    configure_job(logger.name)
    return run_pretraining(args)


if __name__ == "__main__":
    run_command(main)
