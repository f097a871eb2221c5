"""Long-context recall, trained from scratch with equal budgets: passkey retrieval and multi-query associative recall
(MQAR) for the paper's five models and RAT at several chunk sizes, with the cost of each (training-step time and
decode-cache bytes) beside its accuracy.

    python examples/long_context.py --quick --output runs/long_context_quick       # the pipeline in a few minutes
    python examples/long_context.py --output runs/long_context                     # the full grid (hours on a CPU)
    python examples/long_context.py --task mqar --models attention rat --chunk-sizes 4 16 --lengths 256 1024 \\
        --seeds 3 --output runs/mqar

Tasks (every token id is one symbol; no tokenizer):

* passkey: random filler tokens with a needle hidden at a uniformly random depth: the passkey marker followed by
  `passkey_tokens` random value tokens. The sequence ends with the marker again; the model must continue with the
  passkey. Accuracy: the fraction of examples whose whole passkey is predicted (teacher forcing, which for an exact
  match is the same as greedy decoding), also reported by depth.
* mqar (as in the Zoology benchmark of efficient architectures): key-value pairs (distinct keys) at the start, random
  filler, then every key asked again in random order; at each the model predicts its value. Accuracy: the fraction
  of the queried values predicted. Every question comes at least seq_len - 3 x pairs tokens after its pair.

The recipe is the same for every model, length and seed (defaults below, `--help`): D 64, 2 layers, 4 heads, MLP
4 D, weights drawn with standard deviation 0.1, AdamW (peak 1e-3, 100 warm-up steps, cosine to a tenth, weight
decay 0.1, clipping 1.0), loss on the answers only; first 1,000 steps of 32 sequences of 32 tokens, where the
recall circuits form cheaply, then 100 steps of 16 sequences at the run's length. 4 MQAR pairs, 2-token
passkeys, 16 key, value and filler symbols each; hybrids' sliding window 16 tokens, so that their local layers never
see a pair from its question. Why these: with the default initialisation (0.02) a 2-layer attention model stays on
the plateau where it copies a value of the context without binding it to its key (0.33 MQAR accuracy after 750
steps at 32 tokens); at 0.1 it leaves it within 500 steps. The training data of a (task, length, seed) are the same
for every model, and all models are scored on one held-out set per (task, length).

Output, in --output: `runs/<run>.json` per finished run (a rerun skips finished runs; several processes can share
one folder and never train the same run at once), `results.json` ({"recipe": ..., "runs": [...]}) and `results.md` (tables),
rewritten after each run, and the plots `accuracy_vs_length.png`, `chunk_size.png` and `passkey_depth.png`.

Cost: each run records the median time of its training steps at its length, but runs that share a machine slow
each other down, so those times are not comparable. `--measure-costs` (run it alone on the machine, after or
between the grid's invocations) times one training step of every model and length of the grid side by side in one
process (`torch.utils.benchmark`, same batch, threads and data for all) and writes `costs.json`; the tables and plots
use it when it is there and say which times they show.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from modeling_rat import RatConfig, RatForCausalLM, cache_nbytes


TASKS = ("passkey", "mqar")
PAPER_MODELS = ("attention", "rnn", "rat", "attention-swa", "rat-swa")  # RatConfig.from_preset's five models
PAPER_CHUNK_SIZE = 16
DEPTH_BINS = 5
EVAL_SEED = 1_000_003  # the held-out set of a (task, length) is drawn from its own stream, never used in training

# Vocabulary: one marker, then keys, values (also the passkey symbols) and filler, in disjoint ranges.
MARKER = 0


@dataclass(frozen=True)
class Recipe:
    """Everything that defines the training budget and the tasks; identical for every run of a results folder."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    sliding_window: int = 16
    initializer_range: float = 0.1
    short_length: int = 32
    short_steps: int = 1000
    short_batch_size: int = 32
    steps: int = 100
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    num_keys: int = 16
    num_values: int = 16
    num_filler: int = 16
    pairs: int = 4
    passkey_tokens: int = 2
    eval_examples: int = 256

    @property
    def total_steps(self) -> int:
        return self.short_steps + self.steps

    @property
    def key_offset(self) -> int:
        return MARKER + 1

    @property
    def value_offset(self) -> int:
        return self.key_offset + self.num_keys

    @property
    def filler_offset(self) -> int:
        return self.value_offset + self.num_values

    @property
    def vocab_size(self) -> int:
        return self.filler_offset + self.num_filler


MAY_BE_ZERO = {"short_steps", "warmup_steps", "weight_decay"}
QUICK_RECIPE = Recipe(hidden_size=32, num_heads=2, sliding_window=8, short_length=24, short_steps=60,
                      short_batch_size=16, steps=20, batch_size=8, warmup_steps=10, eval_examples=32)
QUICK_GRID = dict(models=["attention", "rnn", "rat"], chunk_sizes=[4, 16], lengths=[32, 64], seeds=2)
FULL_GRID = dict(models=list(PAPER_MODELS), chunk_sizes=[1, 4, 16, 64], lengths=[128, 256, 512, 1024], seeds=3)


# ========================================================================================================== tasks


def minimum_length(task: str, recipe: Recipe) -> int:
    return 2 * recipe.passkey_tokens + 3 if task == "passkey" else 3 * recipe.pairs


def answer_span(task: str, recipe: Recipe) -> int:
    """How many final positions hold every supervised prediction (the logits computed in training)."""
    return recipe.passkey_tokens + 1 if task == "passkey" else recipe.pairs


def passkey_batch(generator: torch.Generator, batch_size: int, seq_len: int, recipe: Recipe):
    """Filler with `MARKER passkey` at a random depth, ending with `MARKER passkey`: the model continues the marker.

    Returns the token ids (batch, seq_len), the labels of the last `answer_span` positions (-100: not scored) and the
    depth of each needle (0: the start of the sequence, 1: just before the question)."""
    ids = recipe.filler_offset + torch.randint(recipe.num_filler, (batch_size, seq_len), generator=generator)
    passkey = recipe.value_offset + torch.randint(recipe.num_values, (batch_size, recipe.passkey_tokens), generator=generator)
    last_start = seq_len - 2 * recipe.passkey_tokens - 2  # the needle ends before the question
    start = torch.randint(last_start + 1, (batch_size,), generator=generator)
    rows = torch.arange(batch_size)[:, None]
    ids[rows, start[:, None] + torch.arange(recipe.passkey_tokens + 1)] = torch.cat(
        [torch.full((batch_size, 1), MARKER), passkey], dim=1)
    ids[:, -recipe.passkey_tokens - 1] = MARKER
    ids[:, -recipe.passkey_tokens:] = passkey
    labels = torch.cat([passkey, torch.full((batch_size, 1), -100)], dim=1)
    return ids, labels, start.float() / max(last_start, 1)


def mqar_batch(generator: torch.Generator, batch_size: int, seq_len: int, recipe: Recipe):
    """`k1 v1 ... kN vN`, filler, then the N keys again in random order; at each of them the model must predict its
    value (as in Zoology, the values are not repeated in the questions, so answering one question never reveals
    another's answer).

    Returns the token ids, the labels of the last `answer_span` positions and None (no depth)."""
    pairs = recipe.pairs
    keys = recipe.key_offset + torch.rand(batch_size, recipe.num_keys, generator=generator).argsort(dim=1)[:, :pairs]
    values = recipe.value_offset + torch.randint(recipe.num_values, (batch_size, pairs), generator=generator)
    order = torch.rand(batch_size, pairs, generator=generator).argsort(dim=1)
    filler = recipe.filler_offset + torch.randint(recipe.num_filler, (batch_size, seq_len - 3 * pairs), generator=generator)
    context = torch.stack([keys, values], dim=2).flatten(1)
    ids = torch.cat([context, filler, keys.gather(1, order)], dim=1)
    return ids, values.gather(1, order), None


BATCH_MAKERS = {"passkey": passkey_batch, "mqar": mqar_batch}


def data_generator(task: str, seq_len: int, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(TASKS.index(task) * 1_000_000 + seq_len * 1_000 + seed)


# ========================================================================================================== runs


@dataclass(frozen=True)
class Run:
    task: str
    model: str
    chunk_size: int | None  # None: the model has no RAT layer
    seq_len: int
    seed: int

    @property
    def name(self) -> str:
        chunk = f"-L{self.chunk_size}" if self.chunk_size is not None else ""
        return f"{self.task}-{self.model}{chunk}-T{self.seq_len}-seed{self.seed}"

    @property
    def label(self) -> str:
        """The model as plots and tables name it: pure rat carries its chunk size."""
        return f"rat L={self.chunk_size}" if self.model == "rat" else self.model


def model_variants(models: list[str], chunk_sizes: list[int]) -> list[tuple[str, int | None]]:
    """(model, chunk size) pairs: the paper's models at the paper's chunk size, pure rat at every chunk size."""
    variants = []
    for model in models:
        if model == "rat":
            variants += [("rat", chunk_size) for chunk_size in chunk_sizes]
        else:
            variants.append((model, PAPER_CHUNK_SIZE if model == "rat-swa" else None))
    return variants


def build_grid(tasks, models, chunk_sizes, lengths, seeds) -> list[Run]:
    """Every run, most informative first: the longest length (one seed), the shortest (does the recipe work?), the
    other seeds of the longest, then the lengths in between (one seed). An interrupted grid misses the middle first."""
    lengths = sorted(lengths)
    longest, shortest = lengths[-1], lengths[0]
    stages = [(longest, [0]), (shortest, [0]), (longest, list(range(1, seeds)))]
    stages += [(length, [0]) for length in lengths[1:-1]]
    runs = []
    for seq_len, stage_seeds in stages:
        for seed in stage_seeds:
            for task in tasks:
                for model, chunk_size in model_variants(models, chunk_sizes):
                    runs.append(Run(task, model, chunk_size, seq_len, seed))
    return list(dict.fromkeys(runs))


def build_config(run: Run, recipe: Recipe) -> RatConfig:
    overrides = dict(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_qk_groups=math.gcd(2, recipe.num_heads),  # the paper's 2 key/query groups, 1 for a single head
        intermediate_size=4 * recipe.hidden_size,
        rnn_forget_gate_init_length=run.seq_len,
        initializer_range=recipe.initializer_range,
    )
    if run.chunk_size is not None:
        overrides["chunk_size"] = run.chunk_size
    if run.model.endswith("-swa"):
        overrides["sliding_window"] = recipe.sliding_window
    return RatConfig.from_preset(run.model, "tiny", **overrides)


def learning_rate_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < recipe.warmup_steps:
        return recipe.learning_rate * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.total_steps - recipe.warmup_steps)
    return recipe.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def answer_loss(model, ids, labels):
    logits = model(ids, logits_to_keep=labels.shape[1]).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


@torch.no_grad()
def evaluate(model, run: Run, recipe: Recipe) -> dict:
    """Accuracy on the held-out set of (task, length): the same examples for every model and seed."""
    model.eval()
    generator = data_generator(run.task, run.seq_len, EVAL_SEED)
    ids, labels, depth = BATCH_MAKERS[run.task](generator, recipe.eval_examples, run.seq_len, recipe)
    predictions = torch.cat([
        model(ids[start: start + recipe.batch_size], logits_to_keep=labels.shape[1]).logits.argmax(-1)
        for start in range(0, len(ids), recipe.batch_size)
    ])
    scored = labels != -100
    correct = (predictions == labels) | ~scored
    metrics = {"token_accuracy": ((predictions == labels) & scored).sum().item() / scored.sum().item()}
    if run.task == "passkey":
        exact = correct.all(dim=1).float()
        metrics["accuracy"] = exact.mean().item()
        bins = (depth * DEPTH_BINS).long().clamp(max=DEPTH_BINS - 1)
        metrics["accuracy_by_depth"] = [exact[bins == b].mean().item() if (bins == b).any() else None
                                        for b in range(DEPTH_BINS)]
    else:
        metrics["accuracy"] = metrics["token_accuracy"]
    return metrics


@torch.no_grad()
def decode_cache_bytes(model, seq_len: int) -> int:
    """Bytes of the decoding cache after a prefill of seq_len tokens (one sequence)."""
    model.eval()
    cache = DynamicCache(config=model.config)
    model(torch.zeros(1, seq_len, dtype=torch.long), cache=cache, use_cache=True)
    return cache_nbytes(cache)


def measure_costs(runs: list[Run], recipe: Recipe, output: Path, min_run_time: float, progress: bool = True) -> dict:
    """
    Training-step time of every (model, length) of `runs`, side by side in this process: forward, backward, clipping
    and AdamW step on one batch of `recipe.batch_size` sequences (the first task's data; the task does not change the
    shapes), timed by `torch.utils.benchmark.Timer.blocked_autorange`. Writes and returns `costs.json`.
    """
    from torch.utils.benchmark import Timer
    from tqdm.auto import tqdm

    variants = list(dict.fromkeys((run.model, run.chunk_size, run.seq_len) for run in runs))
    costs = []
    for model_name, chunk_size, seq_len in tqdm(variants, desc="step times", disable=not progress, dynamic_ncols=True):
        run = Run(runs[0].task, model_name, chunk_size, seq_len, 0)
        torch.manual_seed(0)
        model = RatForCausalLM(build_config(run, recipe)).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate)
        ids, labels, _ = BATCH_MAKERS[run.task](data_generator(run.task, seq_len, 0), recipe.batch_size, seq_len, recipe)

        def step():
            answer_loss(model, ids, labels).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()  # warm-up (first-call set-up)
        timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
        costs.append({"model": model_name, "chunk_size": chunk_size, "label": run.label, "seq_len": seq_len,
                      "batch_size": recipe.batch_size, "train_step_seconds": measurement.median,
                      "times_s": measurement.times})
    result = {"torch_threads": torch.get_num_threads(), "torch": torch.__version__, "processor": platform.processor(),
              "timer": "torch.utils.benchmark.Timer.blocked_autorange", "costs": costs}
    write_atomically(Path(output) / "costs.json", json.dumps(result, indent=2))
    return result


def load_step_times(output: Path) -> dict | None:
    """{(label, seq_len): seconds} from `costs.json` (`--measure-costs`), or None when it has not been measured."""
    path = Path(output) / "costs.json"
    if not path.exists():
        return None
    return {(cost["label"], cost["seq_len"]): cost["train_step_seconds"] for cost in json.loads(path.read_text())["costs"]}


def train_and_evaluate(run: Run, recipe: Recipe, progress: bool = True) -> dict:
    """Train one model from scratch on one task: `short_steps` at `short_length` tokens (where the recall circuits
    form cheaply), then `steps` at the run's length; evaluate at the run's length and return the record."""
    from tqdm.auto import tqdm

    torch.manual_seed(run.seed)
    config = build_config(run, recipe)
    model = RatForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=recipe.learning_rate, betas=(0.9, 0.98))
    short_length = min(recipe.short_length, run.seq_len)
    phases = [(short_length, recipe.short_steps, recipe.short_batch_size), (run.seq_len, recipe.steps, recipe.batch_size)]
    step_seconds, losses = [], []
    model.train()
    bar = tqdm(total=recipe.total_steps, desc=run.name, leave=False, disable=not progress, dynamic_ncols=True)
    step = 0
    for seq_len, steps, batch_size in phases:
        generator = data_generator(run.task, seq_len, run.seed)
        for _ in range(steps):
            ids, labels, _ = BATCH_MAKERS[run.task](generator, batch_size, seq_len, recipe)
            start = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, recipe)
            loss = answer_loss(model, ids, labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if seq_len == run.seq_len:
                step_seconds.append(time.perf_counter() - start)
            losses.append(loss.item())
            step += 1
            bar.update()
            if step % 10 == 0:
                bar.set_postfix(tokens=seq_len, loss=f"{statistics.fmean(losses[-10:]):.3f}")
    bar.close()
    metrics = evaluate(model, run, recipe)
    return {
        **asdict(run),
        "label": run.label,
        **metrics,
        "train_step_seconds": statistics.median(step_seconds),
        "cache_bytes": decode_cache_bytes(model, run.seq_len),
        "final_train_loss": statistics.fmean(losses[-max(1, recipe.steps // 10):]),
        "layer_types": config.layer_types,
        "sliding_window": config.sliding_window if run.model.endswith("-swa") else None,
        "parameters": model.num_parameters(),
        "torch_threads": torch.get_num_threads(),
    }


# ===================================================================================================== bookkeeping


class ResultsFolder:
    """One file per finished run, and a claim file per run in progress, so that a rerun skips what is done and
    several processes can share the grid (a claim whose process has died on this machine is taken over)."""

    def __init__(self, output: Path, recipe: Recipe):
        self.output = Path(output)
        self.runs_dir = self.output / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        recipe_file = self.output / "recipe.json"
        if recipe_file.exists():
            stored = json.loads(recipe_file.read_text())
            if stored != asdict(recipe):
                changed = sorted(k for k in stored.keys() | asdict(recipe).keys() if stored.get(k) != asdict(recipe).get(k))
                raise ValueError(f"{self.output} holds runs of another recipe (differs in {', '.join(changed)}): use "
                                 f"another --output, or the options (or --quick) it was made with.")
        else:
            recipe_file.write_text(json.dumps(asdict(recipe), indent=2))
        self.recipe = recipe

    def result_path(self, run: Run) -> Path:
        return self.runs_dir / f"{run.name}.json"

    def is_done(self, run: Run) -> bool:
        return self.result_path(run).exists()

    def claim(self, run: Run) -> bool:
        """Take the run for this process; False if it is finished or another living process has it."""
        if self.is_done(run):
            return False
        path = self.runs_dir / f"{run.name}.claim"
        owner = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not self._claim_is_stale(path):
                    return False
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(descriptor, "w") as file:
                file.write(owner)
            return True
        return False

    @staticmethod
    def _claim_is_stale(path: Path) -> bool:
        try:
            host, pid = path.read_text().split()
        except (OSError, ValueError):
            return False  # being written right now
        if host != socket.gethostname():
            return False  # cannot tell: leave it to its machine
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self, run: Run):
        (self.runs_dir / f"{run.name}.claim").unlink(missing_ok=True)

    def save(self, run: Run, record: dict):
        write_atomically(self.result_path(run), json.dumps(record, indent=2))

    def records(self) -> list[dict]:
        return [json.loads(path.read_text()) for path in sorted(self.runs_dir.glob("*.json"))]

    def write_summary(self) -> list[dict]:
        records = sorted(self.records(), key=lambda r: (r["task"], r["seq_len"], r["model"], r["chunk_size"] or 0, r["seed"]))
        write_atomically(self.output / "results.json", json.dumps({"recipe": asdict(self.recipe), "runs": records}, indent=2))
        return records


def write_atomically(path: Path, text: str):
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


# ========================================================================================================== plots


def variant_order(records: list[dict]) -> list[str]:
    """Labels in a stable order: the paper's models, then rat by chunk size."""
    labels = {r["label"] for r in records}
    rat = sorted((label for label in labels if label.startswith("rat L=")), key=lambda s: int(s.split("=")[1]))
    ordered = []
    for model in PAPER_MODELS:
        ordered += rat if model == "rat" else [model] if model in labels else []
    return ordered


def summarize(records: list[dict], key: str):
    """{(task, label, seq_len): (mean, low, high, count)} of `key` over seeds."""
    groups = {}
    for record in records:
        groups.setdefault((record["task"], record["label"], record["seq_len"]), []).append(record[key])
    return {group: (statistics.fmean(values), min(values), max(values), len(values)) for group, values in groups.items()}


def write_tables(records: list[dict], output: Path, step_times: dict | None = None):
    """`results.md`: every model at the longest length (accuracy per task, step time, cache bytes), then accuracy by
    length per task. Cells are means over seeds, with the range when there are several. Step times from
    `step_times` (`--measure-costs`) when given, else the runs' own (median during training, machine shared)."""
    if not records:
        return
    tasks = [task for task in TASKS if any(r["task"] == task for r in records)]
    labels = variant_order(records)
    longest = max(r["seq_len"] for r in records)
    accuracy = summarize(records, "accuracy")

    def cell(stats):
        if stats is None:
            return "-"
        mean, low, high, count = stats
        return f"{mean:.3f}" + (f" ({low:.2f}-{high:.2f}, {count} seeds)" if count > 1 else "")

    timing = ("training-step time at that length measured side by side in one process (`--measure-costs`)"
              if step_times else "median training-step time during the runs (machines shared: not comparable)")
    lines = [f"Accuracy at {longest} tokens (mean over seeds, min-max), {timing}, and "
             f"decode-cache bytes after reading one sequence of that length.", "",
             "| model | " + " | ".join(tasks) + " | training step (s) | decode cache (bytes) |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for label in labels:
        at_longest = [r for r in records if r["label"] == label and r["seq_len"] == longest]
        if not at_longest:
            continue
        if step_times:
            step = step_times.get((label, longest))
            step_cell = "-" if step is None else f"{step:.3f}"
        else:
            step_cell = f"{statistics.fmean(r['train_step_seconds'] for r in at_longest):.2f}"
        lines.append(f"| {label} | " + " | ".join(cell(accuracy.get((task, label, longest))) for task in tasks)
                     + f" | {step_cell} | {at_longest[0]['cache_bytes']:,} |")
    for task in tasks:
        lengths = sorted({r["seq_len"] for r in records if r["task"] == task})
        lines += ["", f"{task}: accuracy by length (mean over seeds)", "",
                  "| model | " + " | ".join(str(length) for length in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for label in labels:
            stats = [accuracy.get((task, label, length)) for length in lengths]
            if any(stats):
                lines.append(f"| {label} | " + " | ".join("-" if s is None else f"{s[0]:.3f}" for s in stats) + " |")
    (output / "results.md").write_text("\n".join(lines) + "\n")


def report(records: list[dict], output: Path):
    step_times = load_step_times(output)
    write_tables(records, output, step_times)
    plot_results(records, output, step_times)


def plot_results(records: list[dict], output: Path, step_times: dict | None = None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    tasks = [task for task in TASKS if any(r["task"] == task for r in records)]
    labels = variant_order(records)
    colors = {label: plt.cm.tab10(index % 10) for index, label in enumerate(labels)}
    accuracy = summarize(records, "accuracy")

    figure, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for label in labels:
            points = sorted((seq_len, stats) for (t, lab, seq_len), stats in accuracy.items() if t == task and lab == label)
            if not points:
                continue
            lengths = [p[0] for p in points]
            means = [p[1][0] for p in points]
            errors = [[p[1][0] - p[1][1] for p in points], [p[1][2] - p[1][0] for p in points]]
            axis.errorbar(lengths, means, yerr=errors, marker="o", capsize=3, color=colors[label], label=label,
                          linestyle="--" if label.startswith("rat L=") and label != f"rat L={PAPER_CHUNK_SIZE}" else "-")
        style_axis(axis, "sequence length (tokens)",
                   "accuracy" + (" (whole passkey)" if task == "passkey" else " (queried values)"),
                   f"{task}: accuracy by length (mean, min-max over seeds)")
        axis.set_ylim(-0.03, 1.03)
    figure.tight_layout()
    figure.savefig(output / "accuracy_vs_length.png", dpi=120)
    plt.close(figure)

    plot_chunk_sizes(records, tasks, output, plt, step_times)
    plot_passkey_depth(records, output, plt)


def style_axis(axis, xlabel: str, ylabel: str, title: str):
    axis.set_xscale("log", base=2)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def plot_chunk_sizes(records, tasks, output, plt, step_times=None):
    """At the longest length: accuracy, step time and cache bytes of rat against its chunk size, with attention and
    rnn as reference lines. Step times from `step_times` when given (each run's record otherwise)."""
    if step_times:
        records = [{**r, "train_step_seconds": step_times.get((r["label"], r["seq_len"]), float("nan"))} for r in records]
    step_title = "training step (s, side by side)" if step_times else "training step (s, median during the run)"
    panels = [("accuracy", "accuracy"), ("train_step_seconds", step_title),
              ("cache_bytes", "decode cache (KiB, one sequence, log scale)")]
    figure, axes = plt.subplots(len(tasks), len(panels), figsize=(15, 4 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks):
        task_records = [r for r in records if r["task"] == task]
        longest = max(r["seq_len"] for r in task_records)
        at_longest = [r for r in task_records if r["seq_len"] == longest]
        for axis, (key, title) in zip(row, panels):
            stats = summarize(at_longest, key)
            scale = 1 / 1024 if key == "cache_bytes" else 1
            rat = sorted((int(label.split("=")[1]), value) for (_, label, _), value in stats.items() if label.startswith("rat L="))
            if rat:
                axis.errorbar([c for c, _ in rat], [v[0] * scale for _, v in rat],
                              yerr=[[(v[0] - v[1]) * scale for _, v in rat], [(v[2] - v[0]) * scale for _, v in rat]],
                              marker="o", capsize=3, color="black", label="rat")
            for reference, style in (("attention", "--"), ("rnn", ":")):
                if (task, reference, longest) in stats:
                    axis.axhline(stats[(task, reference, longest)][0] * scale, linestyle=style, color="gray", label=reference)
            style_axis(axis, "RAT chunk size L", title, f"{task}, {longest} tokens")
            if key == "cache_bytes":
                axis.set_yscale("log")
    figure.tight_layout()
    figure.savefig(output / "chunk_size.png", dpi=120)
    plt.close(figure)


def plot_passkey_depth(records, output, plt):
    """Passkey accuracy by needle depth and length, one panel per model (seeds averaged)."""
    passkey = [r for r in records if r["task"] == "passkey"]
    if not passkey:
        return
    labels = variant_order(passkey)
    lengths = sorted({r["seq_len"] for r in passkey})
    columns = min(4, len(labels))
    rows = math.ceil(len(labels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + 1, 2.6 * rows + 0.4), squeeze=False,
                                constrained_layout=True)
    for axis in axes.flat[len(labels):]:
        axis.axis("off")
    for index, (axis, label) in enumerate(zip(axes.flat, labels)):
        grid = torch.full((len(lengths), DEPTH_BINS), float("nan"))
        for i, seq_len in enumerate(lengths):
            by_depth = [r["accuracy_by_depth"] for r in passkey if r["label"] == label and r["seq_len"] == seq_len]
            for b in range(DEPTH_BINS):
                values = [d[b] for d in by_depth if d[b] is not None]
                if values:
                    grid[i, b] = statistics.fmean(values)
        image = axis.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        axis.set_xticks(range(DEPTH_BINS), [f"{(b + 0.5) / DEPTH_BINS:.1f}" for b in range(DEPTH_BINS)])
        axis.set_yticks(range(len(lengths)), [str(length) for length in lengths])
        axis.set_xlabel("needle depth (0: start)")
        if index % columns == 0:
            axis.set_ylabel("sequence length")
        axis.set_title(label, fontsize=10)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="passkey accuracy (seeds averaged)")
    figure.savefig(output / "passkey_depth.png", dpi=120)
    plt.close(figure)


# ============================================================================================================ CLI


def build_parser() -> argparse.ArgumentParser:
    defaults = Recipe()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, type=Path, help="results folder (reused by reruns)")
    parser.add_argument("--task", nargs="+", choices=TASKS, help="default: both")
    parser.add_argument("--models", nargs="+", choices=PAPER_MODELS, help="default: the five")
    parser.add_argument("--chunk-sizes", nargs="+", type=int, help="chunk sizes of the pure rat model (default 1 4 16 64)")
    parser.add_argument("--lengths", nargs="+", type=int, help="sequence lengths (default 128 256 512 1024)")
    parser.add_argument("--seeds", type=int, help="seeds at the longest length; one seed elsewhere (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny recipe and grid (attention, rnn, rat L=4/16 at 32 and 64 tokens): checks the pipeline")
    recipe = parser.add_argument_group("recipe (the same for every run)")
    for field, help_text in (
        ("hidden_size", "width D"), ("num_layers", "depth"), ("num_heads", "heads"),
        ("sliding_window", "tokens a sliding-window query sees (hybrids)"),
        ("initializer_range", "standard deviation of the initial weights"),
        ("short_length", "sequence length of the first training phase"),
        ("short_steps", "steps of the first phase (0: none)"), ("short_batch_size", "sequences per first-phase step"),
        ("steps", "steps at the run's length"),
        ("batch_size", "sequences per step at the run's length"), ("learning_rate", "peak AdamW learning rate"),
        ("warmup_steps", "linear warm-up steps (then cosine to a tenth)"), ("weight_decay", "AdamW weight decay"),
        ("num_keys", "MQAR key symbols"), ("num_values", "value symbols (MQAR values, passkey symbols)"),
        ("num_filler", "filler symbols"), ("pairs", "MQAR key-value pairs per sequence"),
        ("passkey_tokens", "symbols in a passkey"),
        ("eval_examples", "held-out examples per (task, length)"),
    ):
        value = getattr(defaults, field)
        recipe.add_argument(f"--{field.replace('_', '-')}", type=type(value), help=f"{help_text} (default {value})")
    parser.add_argument("--measure-costs", action="store_true",
                        help="time one training step of every model and length of the grid side by side (no training; "
                             "run it alone on the machine) and write costs.json, which the tables and plots then use")
    parser.add_argument("--min-run-time", type=float, default=2.0,
                        help="seconds of timed steps per model and length for --measure-costs (default 2)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def resolve_arguments(parser, args) -> tuple[Recipe, list[Run]]:
    """The recipe and the grid, from the defaults (or --quick) and the options given; bad input: parser.error."""
    base_recipe, grid = (QUICK_RECIPE, QUICK_GRID) if args.quick else (Recipe(), FULL_GRID)
    recipe_overrides = {field: getattr(args, field) for field in asdict(base_recipe) if getattr(args, field) is not None}
    for field, value in recipe_overrides.items():
        if value < 0 or (value == 0 and field not in MAY_BE_ZERO):
            parser.error(f"--{field.replace('_', '-')} must be {'>= 0' if field in MAY_BE_ZERO else 'positive'}, got {value}")
    recipe = Recipe(**{**asdict(base_recipe), **recipe_overrides})
    if recipe.pairs > recipe.num_keys:
        parser.error(f"--pairs {recipe.pairs} needs at least as many key symbols (--num-keys {recipe.num_keys})")
    tasks = args.task or list(TASKS)
    models = args.models or grid["models"]
    chunk_sizes = args.chunk_sizes or grid["chunk_sizes"]
    lengths = args.lengths or grid["lengths"]
    seeds = args.seeds if args.seeds is not None else grid["seeds"]
    if args.chunk_sizes and "rat" not in models:
        parser.error("--chunk-sizes sets the chunk sizes of the pure rat model: add rat to --models")
    if any(c < 1 for c in chunk_sizes):
        parser.error(f"--chunk-sizes must be >= 1, got {chunk_sizes}")
    if seeds < 1:
        parser.error(f"--seeds must be >= 1, got {seeds}")
    for task in tasks:
        shortest = minimum_length(task, recipe)
        if min(lengths) < shortest:
            parser.error(f"--lengths: {task} needs sequences of at least {shortest} tokens with this recipe, got "
                         f"{min(lengths)}")
    runs = build_grid(tasks, models, chunk_sizes, lengths, seeds)
    for run in runs:
        try:
            build_config(run, recipe)
        except ValueError as error:
            parser.error(f"{run.label} at {run.seq_len} tokens: {error}")
    return recipe, runs


def main(argv=None) -> list[dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe, runs = resolve_arguments(parser, args)
    from tqdm.auto import tqdm

    try:
        folder = ResultsFolder(args.output, recipe)
    except ValueError as error:
        parser.error(str(error))
    if args.measure_costs:
        if args.min_run_time <= 0:
            parser.error(f"--min-run-time must be positive, got {args.min_run_time}")
        measure_costs(runs, recipe, folder.output, args.min_run_time, progress=not args.no_progress)
        records = folder.write_summary()
        report(records, folder.output)
        return records
    pending = [run for run in runs if not folder.is_done(run)]
    print(f"{len(runs)} runs, {len(runs) - len(pending)} already finished in {args.output}", file=sys.stderr)
    bar = tqdm(total=len(pending), desc="runs", disable=args.no_progress, dynamic_ncols=True)
    claimed_one = True
    while claimed_one:  # another pass picks up runs whose process has died since the last one
        claimed_one = False
        for run in [run for run in pending if not folder.is_done(run)]:
            if not folder.claim(run):
                continue
            claimed_one = True
            try:
                record = train_and_evaluate(run, recipe, progress=not args.no_progress)
                folder.save(run, record)
            finally:
                folder.release(run)
            bar.update()
            tqdm.write(f"{run.name}: accuracy {record['accuracy']:.3f}, step {record['train_step_seconds']:.3f}s, "
                       f"cache {record['cache_bytes']:,} bytes", file=sys.stderr)
            report(folder.write_summary(), folder.output)
    bar.close()
    records = folder.write_summary()
    report(records, folder.output)
    missing = [run.name for run in runs if not folder.is_done(run)]
    if missing:
        print(f"{len(missing)} runs are still being trained by other processes: rerun once they have finished, or "
              f"if they were stopped.", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
