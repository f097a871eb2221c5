"""Small-scale reproduction of the paper's comparison: train the five models (attention, rnn, rat, attention-swa,
rat-swa) with equal budgets (same data, tokenizer, tokens, steps, widths and depths) and compare validation loss.

    python examples/compare_paper_models.py                          # default corpus and budget, results/paper_comparison/
    python examples/compare_paper_models.py --max-steps 2000 --hidden-size 512 --num-layers 8 --block-size 1024

Writes `paper_comparison.md` (table), `paper_comparison.png` (validation loss during training) and
`paper_comparison.json` to `--results-dir`. Each model's run resumes from its checkpoints in `--work-dir`, so an
interrupted comparison continues where it stopped. With `--sft-steps N` each model is also LoRA-fine-tuned on the
default code summarization task and its test ROUGE is added to the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pretrain
from modeling_rat.training import train_byte_level_bpe
from modeling_rat.training.cli import configure_job, float_in, int_at_least, run_command


logger = logging.getLogger("compare")
MODELS = ["attention", "rnn", "rat", "attention-swa", "rat-swa"]
POSITIVE = int_at_least(1)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--results-dir", default="results/paper_comparison")
    parser.add_argument("--work-dir", default="runs/paper_comparison", help="checkpoints and the shared tokenizer")
    parser.add_argument("--hidden-size", type=POSITIVE, default=128)
    parser.add_argument("--num-layers", type=POSITIVE, default=4)
    parser.add_argument("--num-heads", type=POSITIVE, default=4)
    parser.add_argument("--chunk-size", type=POSITIVE, default=16)
    parser.add_argument("--block-size", type=POSITIVE, default=256)
    parser.add_argument("--sliding-window", type=POSITIVE, help="default: block size / 4")
    parser.add_argument("--vocab-size", type=POSITIVE, default=4096)
    parser.add_argument("--max-steps", type=POSITIVE, default=120)
    parser.add_argument("--batch-size", type=POSITIVE, default=4)
    parser.add_argument("--learning-rate", type=float_in(0, low_inclusive=False), default=3e-3)
    parser.add_argument("--eval-steps", type=POSITIVE, default=20)
    parser.add_argument("--max-train-chars", type=POSITIVE, default=4_000_000)
    parser.add_argument("--max-eval-blocks", type=POSITIVE, default=32)
    parser.add_argument("--sft-steps", type=int_at_least(0), default=0, help="also LoRA-fine-tune on code summarization (0: skip)")
    parser.add_argument("--sft-eval-examples", type=POSITIVE, default=100)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def pretrain_arguments(args, model: str, tokenizer_dir: Path) -> list[str]:
    argv = [
        "--model", model, "--size", "mini",
        "--hidden-size", str(args.hidden_size), "--num-layers", str(args.num_layers), "--num-heads", str(args.num_heads),
        "--chunk-size", str(args.chunk_size), "--block-size", str(args.block_size),
        "--max-steps", str(args.max_steps), "--batch-size", str(args.batch_size),
        "--learning-rate", str(args.learning_rate), "--eval-steps", str(args.eval_steps),
        "--max-train-chars", str(args.max_train_chars), "--max-eval-blocks", str(args.max_eval_blocks),
        "--tokenizer", str(tokenizer_dir), "--output-dir", str(Path(args.work_dir) / model),
        "--seed", str(args.seed), "--logging-steps", str(max(1, args.eval_steps)),
    ]
    if args.sliding_window:
        argv += ["--sliding-window", str(args.sliding_window)]
    return argv


def shared_tokenizer(args) -> Path:
    """One byte-level BPE for all models, trained on the same training text they see."""
    tokenizer_dir = Path(args.work_dir) / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        probe = pretrain.build_parser().parse_args(["--max-train-chars", str(args.max_train_chars)])
        train_texts, _, _ = pretrain.load_texts(probe)
        tokenizer = train_byte_level_bpe(pretrain._cap_chars(train_texts, probe.tokenizer_train_chars), args.vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
    return tokenizer_dir


def write_results(results: list[dict], args, results_dir: Path) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "paper_comparison.json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    has_rouge = any("rouge" in r for r in results)
    lines = [
        f"Equal budgets: D={args.hidden_size}, {args.num_layers} layers, {args.num_heads} heads, chunk size "
        f"{args.chunk_size}, sequences of {args.block_size} tokens, {args.max_steps} steps x {args.batch_size} "
        f"sequences = {results[0]['train_tokens']:,} training tokens per model, byte-level BPE vocabulary "
        f"{args.vocab_size}, corpus: {results[0]['corpus']}.",
        "",
        "| model | layers | parameters (non-embedding) | validation loss | perplexity | wall time (s)*"
        + (" | ROUGE-1 / 2 / L after SFT |" if has_rouge else " |"),
        "|---|---|---|---|---|---|" + ("---|" if has_rouge else ""),
    ]
    for r in results:
        pattern = "/".join(dict.fromkeys(r["layer_types"]))
        wall_time = "resumed" if r.get("resumed_from") else f"{r['train_seconds']:.0f}"
        row = (f"| {r['model']} | {pattern} | {r['parameters']:,} ({r['non_embedding_parameters']:,}) | "
               f"{r['eval_loss']:.4f} | {r['eval_perplexity']:.1f} | {wall_time} |")
        if has_rouge:
            rouge = r.get("rouge")
            row += f" {rouge['rouge1']:.1f} / {rouge['rouge2']:.1f} / {rouge['rougeL']:.1f} |" if rouge else " - |"
        lines.append(row)
    lines += ["", "*Wall-clock training time of each run as it happened (one process, CPU threads shared with whatever else "
              "ran on the machine; \"resumed\" for a run continued from a checkpoint of an earlier invocation): not a "
              "speed comparison; see the benchmark scripts for that."]
    (results_dir / "paper_comparison.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for r in results:
        steps = [e["step"] for e in r["eval_history"]]
        losses = [e["eval_loss"] for e in r["eval_history"]]
        axis.plot(steps, losses, marker="o", label=f"{r['model']} ({r['eval_loss']:.3f})")
    axis.set_xlabel("training step")
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_title(f"Five paper models, equal budgets ({results[0]['train_tokens']:,} tokens)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(results_dir / "paper_comparison.png", dpi=120)
    plt.close(figure)


def main(argv=None):
    args = build_parser().parse_args(argv)
    configure_job(logger.name)
    tokenizer_dir = shared_tokenizer(args)
    results = []
    start = time.perf_counter()
    for index, model in enumerate(args.models, 1):
        logger.info("=== [%d/%d] %s ===", index, len(args.models), model)
        metrics = pretrain.main(pretrain_arguments(args, model, tokenizer_dir))
        if args.sft_steps:
            import sft_summarization

            sft = sft_summarization.main([
                "--model", metrics["output_dir"], "--max-steps", str(args.sft_steps),
                "--eval-examples", str(args.sft_eval_examples), "--output-dir", str(Path(args.work_dir) / f"{model}-sft"),
                "--seed", str(args.seed),
            ])
            metrics["rouge"] = sft["rouge_after"]
            metrics["rouge_before"] = sft["rouge_before"]
        results.append(metrics)
        write_results(results, args, Path(args.results_dir))  # partial results survive an interruption
    logger.info("Done in %.0fs: %s", time.perf_counter() - start, Path(args.results_dir) / "paper_comparison.md")
    print((Path(args.results_dir) / "paper_comparison.md").read_text())
    return results


if __name__ == "__main__":
    run_command(main)
