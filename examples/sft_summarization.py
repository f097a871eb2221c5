"""Fine-tune a RAT language model for summarization with LoRA through TRL's `SFTTrainer`, and evaluate ROUGE-1/2/L
on the test split with `generate()` before and after fine-tuning.

    python examples/sft_summarization.py --model runs/pretrain                  # default task: code summarization
    python examples/sft_summarization.py --model my-org/rat-1.3b --dataset knkarthick/samsum \\
        --document-column dialogue --summary-column summary --max-length 1024
    python examples/sft_summarization.py --model ... --dataset EdinburghNLP/xsum --document-column document \\
        --summary-column summary
    accelerate launch --num_processes 2 examples/sft_summarization.py ...      # several processes (see docs)

Default task (offline, on every machine): code summarization as in CodeXGLUE code-to-text, built from the Python
standard library (function code -> first sentence of its docstring), split by package without leakage (see
`stdlib_data.py`). Without `--model`, a small RAT is first pretrained on the standard library (`pretrain.py`).

Prompts are `<document>\\nSummary:` and completions ` <summary>` + EOS (loss on the completion only). Documents too
long for `--max-length` are cut at a token boundary to leave room for the summary; summaries longer than
`--max-summary-tokens` are cut for training (ROUGE always compares with the full reference). The output folder
gets `adapter/` (LoRA weights), `merged/` (a remote-code checkpoint with the adapters merged) and
`sft_results.json`. Checkpoints go to `trainer/` (`--save-steps`); a rerun of the same command resumes from the
latest complete one (`--resume-from-checkpoint none` starts fresh).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, set_seed

from modeling_rat.training import (
    check_columns,
    check_not_empty,
    default_lora_config,
    ensure_pad_token,
    resolve_resume_checkpoint,
    rouge_scores,
    train_resumably,
    truncate_to_tokens,
)
from modeling_rat.training.checkpoints import add_checkpoint_arguments, signals_held
from modeling_rat.training.cli import configure_job, float_in, int_at_least, prepare_output_dir, run_command
from modeling_rat.training.launch import activation_checkpointing_argument, check_distribution, no_accelerator
from modeling_rat.training.sources import check_rat_model, load_dataset_dict, load_tokenizer


logger = logging.getLogger("sft")
POSITIVE = int_at_least(1)
PROMPT_SUFFIX = "\nSummary:"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="RAT checkpoint folder or Hub name (default: pretrain a small RAT first)")
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub name (default: the one saved with --model)")
    parser.add_argument("--base-steps", type=POSITIVE, default=300, help="pretraining steps when --model is not given")
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="Hub dataset name or local dataset folder (default: standard-library code "
                                        "summarization)")
    data.add_argument("--dataset-config", help="dataset configuration name")
    data.add_argument("--document-column", help="column with the text to summarize (default: 'code' / 'document')")
    data.add_argument("--summary-column", default="summary", help="column with the reference summary")
    data.add_argument("--train-split", default="train")
    data.add_argument("--validation-split", default="validation")
    data.add_argument("--test-split", default="test")
    data.add_argument("--max-train-examples", type=POSITIVE, help="cap on training examples")
    data.add_argument("--max-validation-examples", type=POSITIVE, default=64)
    data.add_argument("--eval-examples", type=POSITIVE, default=100, help="test examples scored with ROUGE")
    data.add_argument("--max-length", type=POSITIVE, default=256, help="prompt + summary tokens (longer documents are cut)")
    data.add_argument("--max-summary-tokens", type=POSITIVE, default=40, help="training summaries are cut to this length")
    train = parser.add_argument_group("training")
    train.add_argument("--output-dir", default="runs/sft-summarization")
    train.add_argument("--max-steps", type=POSITIVE, default=200)
    train.add_argument("--batch-size", type=POSITIVE, default=8, help="examples per device and step")
    train.add_argument("--learning-rate", type=float_in(0, low_inclusive=False), default=2e-3)
    train.add_argument("--lora-r", type=POSITIVE, default=16)
    train.add_argument("--lora-alpha", type=POSITIVE, default=32)
    train.add_argument("--lora-dropout", type=float_in(0, 1, high_inclusive=False), default=0.05)
    train.add_argument("--no-packing", dest="packing", action="store_false",
                       help="pad batches instead of packing them padding-free (TRL packing, the default)")
    add_checkpoint_arguments(train, default_save_steps="max steps / 4", folder="--output-dir/trainer")
    train.add_argument("--gradient-checkpointing", action="store_true", help="activation checkpointing (less memory)")
    train.add_argument("--bf16", action="store_true")
    train.add_argument("--logging-steps", type=POSITIVE, default=10)
    train.add_argument("--max-new-tokens", type=POSITIVE, default=40, help="generation length for ROUGE")
    train.add_argument("--generation-batch-size", type=POSITIVE, default=16)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--disable-tqdm", action="store_true")
    return parser


# ====================================================================================================== data


def load_splits(args) -> dict:
    """{"train", "validation", "test"} -> datasets.Dataset with columns `document` and `summary`."""
    if args.dataset is None:
        from stdlib_data import code_summarization_dataset

        dataset = code_summarization_dataset()
        document_column = args.document_column or "code"
        splits = {"train": dataset["train"], "validation": dataset["validation"], "test": dataset["test"]}
        names = {"train": "train", "validation": "validation", "test": "test"}
    else:
        dataset = load_dataset_dict(args.dataset, args.dataset_config)
        document_column = args.document_column or "document"
        names = {"train": args.train_split, "validation": args.validation_split, "test": args.test_split}
        missing = [name for name in names.values() if name not in dataset]
        if missing:
            raise ValueError(
                f"Dataset {args.dataset!r} has no split(s) {missing}; its splits are {list(dataset)}. Choose them "
                "with --train-split, --validation-split and --test-split."
            )
        splits = {role: dataset[name] for role, name in names.items()}
    for role, split in splits.items():
        check_columns(split, [document_column, args.summary_column], names[role], "--document-column and --summary-column")
        check_not_empty(split, names[role])
    return {
        role: split.select_columns([document_column, args.summary_column]).rename_columns(
            {document_column: "document", args.summary_column: "summary"} if document_column != "document" or
            args.summary_column != "summary" else {}
        )
        for role, split in splits.items()
    }


def to_prompt_completion(split, tokenizer, args, role: str):
    """Prompt/completion rows that fit `--max-length` tokens (with EOS); logs what was cut or dropped."""
    from datasets import Dataset

    suffix_tokens = len(tokenizer(PROMPT_SUFFIX, add_special_tokens=False)["input_ids"])
    rows, cut_documents, cut_summaries, dropped = [], 0, 0, 0
    for document, summary in zip(split["document"], split["summary"]):
        if not isinstance(document, str) or not isinstance(summary, str) or not document.strip() or not summary.strip():
            dropped += 1
            continue
        summary = " ".join(summary.split())
        completion, summary_cut = truncate_to_tokens(tokenizer, " " + summary, args.max_summary_tokens)
        completion_tokens = len(tokenizer(completion, add_special_tokens=False)["input_ids"])
        # EOS, plus a margin of 2 for tokens that merge differently across the prompt/completion seam.
        budget = args.max_length - suffix_tokens - completion_tokens - 1 - 2
        if budget < 1:
            raise ValueError(
                f"--max-length {args.max_length} leaves no room for the document: the prompt suffix takes "
                f"{suffix_tokens} tokens and a summary up to {args.max_summary_tokens}. Raise --max-length or lower "
                "--max-summary-tokens."
            )
        document, document_cut = truncate_to_tokens(tokenizer, document.strip(), budget)
        rows.append({"prompt": document + PROMPT_SUFFIX, "completion": completion, "reference": summary})
        cut_documents += document_cut
        cut_summaries += summary_cut
    if dropped:
        logger.info("%s: dropped %d examples with an empty document or summary", role, dropped)
    if cut_documents or cut_summaries:
        logger.info("%s: cut %d documents (to fit --max-length %d) and %d summaries (to --max-summary-tokens %d) "
                    "of %d examples", role, cut_documents, args.max_length, cut_summaries, args.max_summary_tokens,
                    len(rows))
    dataset = Dataset.from_list(rows) if rows else Dataset.from_dict({"prompt": [], "completion": [], "reference": []})
    check_not_empty(dataset, role, "usable examples")
    return dataset


# ================================================================================================ evaluation


@torch.no_grad()
def generate_summaries(model, tokenizer, prompts: list[str], args, description: str) -> list[str]:
    """Greedy summaries of `prompts` (left-padded batches, stop at EOS or a new line)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    outputs = []
    try:
        for start in tqdm(range(0, len(prompts), args.generation_batch_size), desc=description, disable=args.disable_tqdm):
            batch = tokenizer(prompts[start: start + args.generation_batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            generated = model.generate(
                **batch, max_new_tokens=args.max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            for row in generated[:, batch["input_ids"].shape[1]:]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                outputs.append(text.strip().split("\n")[0].strip())
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return outputs


def evaluate_rouge(model, tokenizer, test_set, args, description: str) -> tuple[dict, list[dict]]:
    predictions = generate_summaries(model, tokenizer, list(test_set["prompt"]), args, description)
    scores = rouge_scores(predictions, list(test_set["reference"]))
    samples = [
        {"reference": reference, "prediction": prediction}
        for reference, prediction in zip(test_set["reference"][:5], predictions[:5])
    ]
    return scores, samples


def format_rouge(scores: dict) -> str:
    return " / ".join(f"{scores[key]:.2f}" for key in ("rouge1", "rouge2", "rougeL"))


# ================================================================================================== training


def check_adapter_checkpoint(checkpoint: str, model_path: str, args) -> None:
    """Refuse to resume a LoRA checkpoint trained on another base model or with other LoRA settings (the adapter would
    load onto the wrong weights, or fail deep inside PEFT)."""
    adapter_config = Path(checkpoint) / "adapter_config.json"
    if not adapter_config.is_file():
        raise FileNotFoundError(f"Cannot resume from {checkpoint}: it holds no LoRA adapter (adapter_config.json), so "
                                "it is not a checkpoint of this job.")
    saved = json.loads(adapter_config.read_text())
    checks = (("--model", saved.get("base_model_name_or_path"), model_path),
              ("--lora-r", saved.get("r"), args.lora_r), ("--lora-alpha", saved.get("lora_alpha"), args.lora_alpha))
    differences = [f"{option} {saved_value} (this command: {value})" for option, saved_value, value in checks
                   if saved_value is not None and not _same_setting(saved_value, value)]
    if differences:
        raise ValueError(
            f"Cannot resume from {checkpoint}: its adapter was trained with {'; '.join(differences)}. Rerun with "
            "those options, or start fresh with --resume-from-checkpoint none (or another --output-dir)."
        )


def _same_setting(saved, value) -> bool:
    """Equal, or two names of one local folder."""
    if saved == value:
        return True
    return isinstance(value, str) and Path(value).exists() and Path(saved).resolve() == Path(value).resolve()


def pretrain_default_base(args) -> str:
    import pretrain

    base_dir = Path(args.output_dir) / "base-model"
    logger.info("No --model given: pretraining a small RAT on the standard library first (%d steps)", args.base_steps)
    pretrain.main([
        "--model", "rat", "--size", "mini", "--hidden-size", "128", "--num-layers", "4", "--num-heads", "4",
        "--vocab-size", "4096", "--block-size", "256", "--batch-size", "8", "--max-steps", str(args.base_steps),
        "--output-dir", str(base_dir), "--seed", str(args.seed),
    ] + (["--disable-tqdm"] if args.disable_tqdm else []))
    return str(base_dir)


def run_sft(args) -> dict:
    from trl import SFTConfig, SFTTrainer

    set_seed(args.seed)
    output_dir = prepare_output_dir(args.output_dir)
    sft_config = SFTConfig(
        use_cpu=no_accelerator(),
        output_dir=str(output_dir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=args.logging_steps,
        eval_strategy="no",
        save_strategy="steps",
        save_steps=args.save_steps or max(1, args.max_steps // 4),
        save_total_limit=args.save_total_limit,
        report_to="none",
        bf16=args.bf16,
        **activation_checkpointing_argument(args.gradient_checkpointing),
        max_length=args.max_length,
        packing=args.packing,
        completion_only_loss=True,
        seed=args.seed,
        disable_tqdm=args.disable_tqdm,
        dataset_num_proc=None,
        ddp_find_unused_parameters=False,
    )
    check_distribution(sft_config)
    model_path = args.model
    if model_path is None:
        if sft_config.world_size > 1:
            raise ValueError(
                "Without --model, a base model is pretrained first, which runs in a single process: run "
                "examples/pretrain.py (it takes accelerate launch too) and pass its output folder as --model."
            )
        with sft_config.main_process_first(desc="pretraining the base model"):
            base_dir = Path(args.output_dir) / "base-model"
            if (base_dir / "config.json").is_file():
                logger.info("No --model given: reusing the base model pretrained earlier in %s", base_dir)
                model_path = str(base_dir)
            else:
                model_path = pretrain_default_base(args)

    check_rat_model(model_path, trust_remote_code=True)
    tokenizer = ensure_pad_token(load_tokenizer(args.tokenizer, trust_remote_code=True) if args.tokenizer else
                                 load_tokenizer(model_path, "--model", trust_remote_code=True))
    checkpoint = resolve_resume_checkpoint(args.resume_from_checkpoint, sft_config.output_dir)
    if checkpoint is not None:
        check_adapter_checkpoint(checkpoint, model_path, args)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, trust_remote_code=True, dtype=torch.bfloat16 if args.bf16 else torch.float32
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    logger.info("Model %s: %s parameters, layers %s", model_path, f"{model.num_parameters():,}", model.config.layer_types)

    with sft_config.main_process_first(desc="building the summarization dataset"):
        splits = load_splits(args)
    if args.max_train_examples:
        splits["train"] = splits["train"].select(range(min(args.max_train_examples, len(splits["train"]))))
    splits["validation"] = splits["validation"].select(range(min(args.max_validation_examples, len(splits["validation"]))))
    test_rows = splits["test"].shuffle(seed=args.seed)
    splits["test"] = test_rows.select(range(min(args.eval_examples, len(test_rows))))
    data = {role: to_prompt_completion(split, tokenizer, args, role) for role, split in splits.items()}
    logger.info("Examples: %d train, %d validation, %d test (ROUGE)", len(data["train"]), len(data["validation"]),
                len(data["test"]))

    lora_config = default_lora_config(model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
    trainer = SFTTrainer(
        model=model,
        args=sft_config,
        train_dataset=data["train"].remove_columns("reference"),
        eval_dataset=data["validation"].remove_columns("reference"),
        processing_class=tokenizer,
        peft_config=lora_config,
    )
    trainable, total = trainer.model.get_nb_trainable_parameters()
    logger.info("LoRA on %s: %s trainable parameters of %s (%.2f%%)", ", ".join(sorted(lora_config.target_modules)),
                f"{trainable:,}",
                f"{total:,}", 100 * trainable / total)
    is_main = trainer.accelerator.is_main_process

    results = {"model": model_path, "dataset": args.dataset or "stdlib code summarization",
               "train_examples": len(data["train"]), "test_examples": len(data["test"]),
               "processes": sft_config.world_size, "resumed_from": checkpoint}
    if is_main:
        results["rouge_before"], _ = evaluate_rouge(trainer.model, tokenizer, data["test"], args, "ROUGE before")
        logger.info("ROUGE-1/2/L before fine-tuning: %s", format_rouge(results["rouge_before"]))
    trainer.accelerator.wait_for_everyone()

    start = time.perf_counter()
    train_result = train_resumably(trainer, checkpoint)
    results["train_seconds"] = time.perf_counter() - start
    results["train_loss"] = train_result.training_loss
    results["eval_loss"] = trainer.evaluate()["eval_loss"]
    logger.info("Validation loss after fine-tuning: %.4f", results["eval_loss"])

    if is_main:
        results["rouge_after"], results["samples"] = evaluate_rouge(trainer.model, tokenizer, data["test"], args, "ROUGE after")
        logger.info("ROUGE-1/2/L after fine-tuning: %s", format_rouge(results["rouge_after"]))
        adapter_dir, merged_dir = output_dir / "adapter", output_dir / "merged"
        with signals_held(f"the adapter and merged model in {output_dir}"):
            trainer.model.save_pretrained(adapter_dir)
            tokenizer.save_pretrained(adapter_dir)
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(merged_dir)  # remote-code checkpoint: config with auto_map, model code, weights
            tokenizer.save_pretrained(merged_dir)
        results["adapter_dir"], results["merged_dir"] = str(adapter_dir.resolve()), str(merged_dir.resolve())
        (output_dir / "sft_results.json").write_text(json.dumps(results, indent=2))
        for sample in results["samples"][:3]:
            logger.info("  reference:  %s\n  prediction: %s", sample["reference"], sample["prediction"])
        logger.info("Saved the adapter to %s and the merged model to %s", adapter_dir, merged_dir)
    trainer.accelerator.wait_for_everyone()
    return results


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    configure_job(logger.name)
    return run_sft(args)


if __name__ == "__main__":
    run_command(main)
