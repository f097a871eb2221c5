"""End-to-end demo, offline on a CPU: pretrain a small RAT on the Python standard library, fine-tune it with LoRA
(TRL SFTTrainer) on code summarization, evaluate ROUGE before and after, and stage a Hub upload of the merged model.

    python examples/demo.py                 # about 10 minutes on a 2-core CPU
    python examples/demo.py --quick         # a few steps of each stage, to check the pipeline
    bash scripts/demo.sh                    # the same, after setting up .venv

The stages are the example scripts, run with the arguments shown in the log: `pretrain.py`, `sft_summarization.py`
and `hub_upload.py <merged model> --repo-id local/rat-demo --dry-run --staging-dir DIR` (nothing is uploaded).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import pretrain
import sft_summarization
from configuration_rat import PAPER_LAYER_PATTERNS
from modeling_rat.training.cli import configure_job, int_at_least, run_command


ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("demo")

# Budgets sized for about 10 minutes on a 2-core CPU (--quick: under a minute per stage).
FULL = dict(hidden_size=256, vocab_size=8192, pretrain_steps=400, pretrain_batch=8, block_size=256, sft_steps=120,
            sft_batch=8, eval_examples=40)
QUICK = dict(hidden_size=128, vocab_size=4096, pretrain_steps=4, pretrain_batch=2, block_size=64, sft_steps=2,
             sft_batch=2, eval_examples=4)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--model", default="rat", choices=list(PAPER_LAYER_PATTERNS),
                        help="which of the paper's five models to pretrain")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: check the pipeline in a few minutes")
    parser.add_argument("--hub-upload", default=str(ROOT / "hub_upload.py"), help="path of hub_upload.py")
    parser.add_argument("--pretrain-steps", type=int_at_least(1), help=f"pretraining steps (default {FULL['pretrain_steps']})")
    parser.add_argument("--sft-steps", type=int_at_least(1), help=f"LoRA fine-tuning steps (default {FULL['sft_steps']})")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def stage_hub_folder(hub_upload: Path, merged_dir: Path, staging_dir: Path) -> dict:
    """Run `hub_upload.py --dry-run` on the merged model; say clearly if the script is missing."""
    if not hub_upload.is_file():
        message = (f"hub_upload.py not found at {hub_upload}: skipping the Hub staging step. The merged model in "
                   f"{merged_dir} is a complete remote-code checkpoint; upload it with hub_upload.py once available.")
        logger.warning(message)
        return {"status": "missing", "message": message}
    command = [sys.executable, str(hub_upload), str(merged_dir), "--repo-id", "local/rat-demo", "--dry-run",
               "--staging-dir", str(staging_dir)]
    logger.info("Staging the Hub folder: %s", " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.stdout.strip():
        logger.info("hub_upload.py output:\n%s", result.stdout.strip()[-3000:])
    if result.returncode != 0:
        logger.error("hub_upload.py failed (exit %d):\n%s", result.returncode, result.stderr.strip()[-3000:])
        return {"status": "failed", "returncode": result.returncode, "stderr": result.stderr[-3000:]}
    files = sorted(path.name for path in staging_dir.iterdir()) if staging_dir.is_dir() else []
    return {"status": "staged", "staging_dir": str(staging_dir), "files": files}


def main(argv=None):
    args = build_parser().parse_args(argv)
    configure_job(logger.name)
    budget = dict(QUICK if args.quick else FULL)
    if args.pretrain_steps is not None:
        budget["pretrain_steps"] = args.pretrain_steps
    if args.sft_steps is not None:
        budget["sft_steps"] = args.sft_steps
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings = {}

    logger.info("[1/3] Pretraining a small %s on the Python standard library", args.model)
    pretrain_argv = [
        "--model", args.model, "--size", "mini", "--hidden-size", str(budget["hidden_size"]), "--num-layers", "4",
        "--num-heads", "4", "--vocab-size", str(budget["vocab_size"]), "--block-size", str(budget["block_size"]),
        "--batch-size", str(budget["pretrain_batch"]),
        "--max-steps", str(budget["pretrain_steps"]), "--learning-rate", "3e-3", "--max-eval-blocks", "24",
        "--output-dir", str(output_dir / "pretrain"), "--seed", str(args.seed),
    ] + (["--max-train-chars", "300000", "--tokenizer-train-chars", "300000"] if args.quick else
         ["--max-train-chars", "8000000"])
    logger.info("python examples/pretrain.py %s", " ".join(pretrain_argv))
    stage_start = time.perf_counter()
    pretrained = pretrain.main(pretrain_argv)
    timings["pretrain"] = time.perf_counter() - stage_start

    logger.info("[2/3] LoRA fine-tuning on code summarization (TRL SFTTrainer), ROUGE before and after")
    sft_argv = [
        "--model", str(output_dir / "pretrain"), "--max-steps", str(budget["sft_steps"]),
        "--batch-size", str(budget["sft_batch"]), "--max-length", str(budget["block_size"]),
        "--eval-examples", str(budget["eval_examples"]), "--max-validation-examples", "32", "--max-new-tokens", "24",
        "--learning-rate", "3e-3", "--output-dir", str(output_dir / "sft"), "--seed", str(args.seed),
    ] + (["--max-train-examples", "64", "--max-summary-tokens", "16"] if args.quick else [])
    logger.info("python examples/sft_summarization.py %s", " ".join(sft_argv))
    stage_start = time.perf_counter()
    sft = sft_summarization.main(sft_argv)
    timings["sft"] = time.perf_counter() - stage_start

    logger.info("[3/3] Staging a Hub folder for the merged model (dry run, nothing is uploaded)")
    hub = stage_hub_folder(Path(args.hub_upload), Path(sft["merged_dir"]), output_dir / "hub-staging")

    summary = {
        "model": args.model,
        "parameters": pretrained["parameters"],
        "pretrain": {k: pretrained[k] for k in ("steps", "train_tokens", "eval_loss", "eval_perplexity")},
        "sft": {k: sft[k] for k in ("train_examples", "test_examples", "eval_loss", "rouge_before", "rouge_after")},
        "merged_model": sft["merged_dir"],
        "adapter": sft["adapter_dir"],
        "hub": hub,
        "seconds": {**timings, "total": time.perf_counter() - start},
    }
    (output_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    rouge_before, rouge_after = sft["rouge_before"], sft["rouge_after"]
    lines = [
        "",
        "=" * 72,
        f"RAT demo summary ({summary['seconds']['total'] / 60:.1f} minutes)",
        f"  model           {args.model}, {pretrained['parameters']:,} parameters, layers {pretrained['layer_types']}",
        f"  pretraining     {pretrained['steps']} steps, {pretrained['train_tokens']:,} tokens: validation loss "
        f"{pretrained['eval_loss']:.3f}, perplexity {pretrained['eval_perplexity']:.1f}",
        f"  LoRA SFT        {budget['sft_steps']} steps on {sft['train_examples']:,} code summarization examples: "
        f"validation loss {sft['eval_loss']:.3f}",
        f"  ROUGE-1/2/L     before {sft_summarization.format_rouge(rouge_before)}  ->  after "
        f"{sft_summarization.format_rouge(rouge_after)}  ({sft['test_examples']} test functions)",
        f"  merged model    {sft['merged_dir']}",
        f"  Hub staging     {hub['status']}" + (f": {hub['staging_dir']}" if hub["status"] == "staged" else
                                                 f" ({hub.get('message', 'see the log above')})"),
        "=" * 72,
    ]
    print("\n".join(lines), flush=True)
    return summary


if __name__ == "__main__":
    run_command(main)
