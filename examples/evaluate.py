"""Evaluate trained causal language models beyond their training: perplexity by position past the training length
(length extrapolation), and the offline lm-evaluation-harness tasks built from the default corpus.

    # length extrapolation of the five paper models (trained at 256 tokens by compare_paper_models.py), to 4,096 tokens
    python examples/evaluate.py extrapolation --models runs/paper_comparison/{attention,rnn,rat,attention-swa,rat-swa} \\
        --max-length 4096 --output results/extrapolation
    # rebuild the data of the offline lm-eval tasks (examples/eval_tasks/) from this machine's standard library
    python examples/evaluate.py build-tasks

`extrapolation` cuts held-out text (default: the standard library packages that pretraining never sees; or
--dataset, a Hub dataset or local folder) into sequences of --max-length tokens, runs each model on them in one
forward pass, and averages the next-token loss at every position. It writes `extrapolation.json` (the loss by
position, and perplexity by position band), `extrapolation.md` (the table) and `extrapolation.png` (loss against
position, the training length marked) to --output.

The lm-eval tasks run through the unmodified harness (`pip install -e ".[eval]"`):

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --include_path examples/eval_tasks \\
        --tasks stdlib_docstring_choice,stdlib_docstring_summary --batch_size 4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
from pathlib import Path

import torch


logger = logging.getLogger("evaluate")
TASKS_DIR = Path(__file__).resolve().parent / "eval_tasks"


# ================================================================================================= extrapolation


def held_out_texts(args) -> tuple[list[str], str]:
    """Documents no model saw in training, and a description of where they come from."""
    if args.dataset is None:
        from stdlib_data import standard_library_corpus, standard_library_dir

        texts = [document["text"] for document in standard_library_corpus()["test"]]
        return texts, f"Python standard library at {standard_library_dir()}, test packages (never used in training)"
    from datasets import load_dataset

    dataset = load_dataset(args.dataset, args.dataset_config)
    if args.split not in dataset:
        raise ValueError(f"Dataset {args.dataset!r} has no {args.split!r} split; its splits are {list(dataset)} (--split).")
    if args.text_column not in dataset[args.split].column_names:
        raise ValueError(f"The {args.split} split of {args.dataset!r} has no column {args.text_column!r}; its columns are "
                         f"{dataset[args.split].column_names} (--text-column).")
    texts = [text for text in dataset[args.split][args.text_column] if isinstance(text, str) and text.strip()]
    return texts, f"dataset {args.dataset}" + (f" ({args.dataset_config})" if args.dataset_config else "") + f", {args.split}"


def token_sequences(texts: list[str], tokenizer, length: int, count: int) -> torch.Tensor:
    """The documents joined with the end-of-sequence token (as in pretraining), cut into `count` rows of `length`."""
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no end-of-sequence token to separate documents.")
    needed = length * count
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= needed:
            return torch.tensor(stream[:needed]).view(count, length)
    raise ValueError(f"The held-out text has {len(stream):,} tokens, fewer than --num-sequences {count} x --max-length "
                     f"{length}: lower one of them or give more text (--dataset).")


@torch.no_grad()
def loss_by_position(model, sequences: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Mean next-token loss (nats) at every position 1 .. length - 1 over the sequences, each run in one forward."""
    total = torch.zeros(sequences.shape[1] - 1, dtype=torch.float64)
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start: start + batch_size]
        logits = model(batch).logits[:, :-1].float()
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
        total += losses.sum(dim=0).double()
    return total / len(sequences)


def position_bands(length: int, train_length: int) -> list[tuple[int, int]]:
    """Bands of predicted-token positions: [1, train_length), then doubling up to the evaluation length."""
    edges = [1, min(train_length, length)]
    while edges[-1] < length:
        edges.append(min(2 * edges[-1], length))
    return list(zip(edges[:-1], edges[1:]))


def log_spaced_means(losses: torch.Tensor, bins_per_octave: int = 8) -> dict:
    """The loss by position averaged over bins of equal width on a log scale (positions 1 .. len(losses)), so that
    a log-x plot of it has as many points, and as little noise, at 4,000 tokens as at 40."""
    octaves = math.log2(len(losses) + 1)
    edges = sorted({round(2 ** (i / bins_per_octave)) for i in range(int(bins_per_octave * octaves) + 1)}
                   | {len(losses) + 1})
    positions, means = [], []
    for low, high in zip(edges[:-1], edges[1:]):  # predicted positions low .. high - 1
        positions.append(math.sqrt(low * (high - 1)))
        means.append(losses[low - 1: high - 1].mean().item())
    return {"positions": positions, "loss": means}


def evaluate_extrapolation(model_dir: Path, texts: list[str], args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    train_length = args.train_length or getattr(model.config, "rnn_forget_gate_init_length", None)
    if train_length is None:
        raise ValueError(f"{model_dir}: the config has no rnn_forget_gate_init_length (the training length pretrain.py records); give it (--train-length).")
    sequences = token_sequences(texts, tokenizer, args.max_length, args.num_sequences)
    losses = loss_by_position(model, sequences, args.batch_size)  # losses[i]: predicting token i + 1
    bands = []
    for low, high in position_bands(args.max_length, train_length):
        mean = losses[low - 1: high - 1].mean().item()
        bands.append({"positions": [low, high], "loss": mean, "perplexity": math.exp(min(mean, 50.0))})
    curve = log_spaced_means(losses)
    return {
        "name": model_dir.name,
        "path": str(model_dir),
        "layer_types": list(getattr(model.config, "layer_types", []) or []),
        "train_length": train_length,
        "bands": bands,
        "curve": curve,
    }


def write_extrapolation(results: list[dict], settings: dict, output: Path):
    output.mkdir(parents=True, exist_ok=True)
    (output / "extrapolation.json").write_text(json.dumps({"settings": settings, "models": results}, indent=2))
    bands = results[0]["bands"]
    header = " | ".join(f"{b['positions'][0]}-{b['positions'][1]}" for b in bands)
    lines = [
        f"Perplexity by position band (tokens predicted at those positions), {settings['num_sequences']} sequences of "
        f"{settings['max_length']} tokens of {settings['source']}.",
        "",
        f"| model | trained at | {header} |",
        "|---|---|" + "---|" * len(bands),
    ]
    for result in results:
        cells = " | ".join(f"{b['perplexity']:.1f}" for b in result["bands"])
        lines.append(f"| {result['name']} | {result['train_length']} | {cells} |")
    (output / "extrapolation.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.8))
    for result in results:
        axis.plot(result["curve"]["positions"], result["curve"]["loss"], label=result["name"])
    for train_length in sorted({r["train_length"] for r in results}):
        axis.axvline(train_length, color="gray", linestyle="--", linewidth=1)
        axis.annotate(f"training length {train_length}", (train_length, 0.98), xycoords=("data", "axes fraction"),
                      rotation=90, ha="right", va="top", fontsize=8, color="gray")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("position in the sequence (tokens)")
    axis.set_ylabel("next-token loss (nats), mean over sequences")
    axis.set_title(f"Loss by position beyond the training length ({settings['num_sequences']} held-out sequences)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(output / "extrapolation.png", dpi=120)
    plt.close(figure)


def run_extrapolation(args) -> list[dict]:
    missing = [str(path) for path in args.models if not (Path(path) / "config.json").is_file()]
    if missing:
        raise ValueError(f"Not a model folder (no config.json): {', '.join(missing)}. Train the five models with "
                         f"examples/compare_paper_models.py, or give folders of save_pretrained checkpoints.")
    texts, source = held_out_texts(args)
    from tqdm.auto import tqdm

    results = []
    for model_dir in tqdm([Path(path) for path in args.models], desc="models"):
        results.append(evaluate_extrapolation(model_dir, texts, args))
        logger.info("%s: %s", model_dir.name, ", ".join(
            f"{b['positions'][0]}-{b['positions'][1]}: {b['perplexity']:.1f}" for b in results[-1]["bands"]))
    settings = {"max_length": args.max_length, "num_sequences": args.num_sequences, "source": source}
    write_extrapolation(results, settings, Path(args.output))
    print((Path(args.output) / "extrapolation.md").read_text())
    return results


# ===================================================================================================== lm-eval data


def build_task_data(args) -> dict[str, int]:
    """The examples of the offline lm-eval tasks, from the code summarization test split of the standard library:
    `docstring_choice.jsonl` (pick a function's summary among four) and `docstring_summary.jsonl` (write it)."""
    from stdlib_data import code_summarization_dataset

    test = code_summarization_dataset()["test"]
    rows = [row for row in test if len(row["code"]) <= args.max_code_chars]
    rows.sort(key=lambda row: hashlib.sha256((row["module"] + "." + row["name"] + row["code"]).encode()).hexdigest())
    rows = rows[: args.num_examples]
    if len(rows) < 4:
        raise ValueError(f"Only {len(rows)} test functions of at most {args.max_code_chars} characters: raise --max-code-chars.")
    generator = random.Random(0)
    choice_rows = []
    for index, row in enumerate(rows):
        distractors = generator.sample([r["summary"] for j, r in enumerate(rows) if j != index and r["summary"] != row["summary"]], 3)
        choices = distractors + [row["summary"]]
        generator.shuffle(choices)
        choice_rows.append({"code": row["code"], "choices": choices, "label": choices.index(row["summary"])})
    summary_rows = [{"code": row["code"], "summary": row["summary"]} for row in rows]
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for name, task_rows in (("docstring_choice", choice_rows), ("docstring_summary", summary_rows)):
        (output / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in task_rows))
    logger.info("Wrote %d examples per task to %s", len(rows), output)
    return {"docstring_choice": len(choice_rows), "docstring_summary": len(summary_rows)}


# ============================================================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    extrapolation = commands.add_parser("extrapolation", help="perplexity by position beyond the training length")
    extrapolation.add_argument("--models", nargs="+", required=True, help="checkpoint folders (save_pretrained)")
    extrapolation.add_argument("--max-length", type=int, default=4096, help="tokens per evaluation sequence")
    extrapolation.add_argument("--num-sequences", type=int, default=16, help="held-out sequences averaged")
    extrapolation.add_argument("--batch-size", type=int, default=1)
    extrapolation.add_argument("--train-length", type=int, help="default: each config's rnn_forget_gate_init_length (pretrain.py sets it to the training length)")
    extrapolation.add_argument("--dataset", help="Hub dataset or local folder (default: the standard library's test packages)")
    extrapolation.add_argument("--dataset-config")
    extrapolation.add_argument("--split", default="test")
    extrapolation.add_argument("--text-column", default="text")
    extrapolation.add_argument("--output", default="results/extrapolation")
    tasks = commands.add_parser("build-tasks", help="rebuild the data of the offline lm-eval tasks")
    tasks.add_argument("--output", default=str(TASKS_DIR / "data"))
    tasks.add_argument("--num-examples", type=int, default=200)
    tasks.add_argument("--max-code-chars", type=int, default=600, help="short functions, so that prompts fit small models")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for option in ("max_length", "num_sequences", "batch_size", "train_length", "num_examples", "max_code_chars"):
        value = getattr(args, option, None)
        if value is not None and value < (2 if option == "max_length" else 1):
            parser.error(f"--{option.replace('_', '-')} must be at least {2 if option == 'max_length' else 1}, got {value}")
    try:
        return run_extrapolation(args) if args.command == "extrapolation" else build_task_data(args)
    except ValueError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
