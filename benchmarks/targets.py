"""
The project's performance targets, measured side by side in one run with the suite's benchmarks (CPU, float32):

    python -m benchmarks.targets [--output results/benchmarks/targets] [--threads N] [--only decode,cache]

1. mixer forward+backward, RAT vs SDPA attention (D 512, H 8, projections included): >= 5x at 16K tokens,
   >= 8x at 32K, peak memory <= attention's;
2. one-layer model (MLP included) forward+backward, RAT vs Llama of the same size: >= 3.5x at 16K tokens;
3. generate() decode rate, RAT vs Llama (D 512, H 8, 2 layers) at 4K context: >= 12x at batch 64 (batch 16 too),
   with the dynamic and the static cache;
4. cache bytes: exactly 1/L of the key/value cache plus 2*D (fp32 running state) per RAT layer per sequence.

`--only` measures the named sections now (`--only none`: none, the report is rebuilt); the others are read back
from their JSON files in the output folder when an earlier run wrote them, so the report covers every target
measured so far. Writes the suite's JSON/PNG files and `targets.md` (machine, figures, target, met or not).
"""

import argparse
import json
import logging
import sys
from pathlib import Path

import torch


if not __package__:  # run as a file, where the sibling modules cannot be imported
    sys.exit("error: run the targets as a module from the repository root: python -m benchmarks.targets [options]")

from . import cache, decode, mixer, model  # noqa: E402
from .common import (  # noqa: E402
    RESULTS,
    RunOptions,
    find_case,
    format_bytes,
    format_rate,
    format_seconds,
    machine_info,
    machine_markdown,
    markdown_table,
    ratio,
)


logger = logging.getLogger("benchmarks")

SETTINGS = {
    "mixer": mixer.MixerSettings(lengths=(16384, 32768), modes=("forward_backward",)),
    "model": model.ModelSettings(model.Architecture(num_layers=1, vocab_size=2048), models=("rat", model.BASELINE),
                                 lengths=(4096, 16384), modes=("train",)),
    "decode": decode.DecodeSettings(contexts=(4096,), batches=(16, 64), new_tokens=32),
    "cache": cache.CacheSettings(),
}
BENCHMARKS = {"mixer": mixer, "model": model, "decode": decode, "cache": cache}


def target_row(label: str, numerator: dict | None, denominator: dict | None, key: str, target: float | None,
               names: tuple[str, str]) -> list[str]:
    """One table row: the ratio numerator[key] / denominator[key], its target, whether it is met, both figures."""
    value = ratio(numerator, denominator, key)
    formatter = {"median_s": format_seconds, "peak_memory_bytes": format_bytes, "decode_tokens_per_s": format_rate}[key]
    figures = ", ".join(f"{name} {formatter(case[key]) if case and case['status'] == 'ok' else 'failed'}"
                        for name, case in zip(names, (numerator, denominator)))
    met = "" if target is None or value is None else "yes" if value >= target else "no"
    return [label, "failed" if value is None else f"{value:.2f}x", "" if target is None else f">= {target:g}x", met,
            figures]


def target_rows(results: dict) -> list[list[str]]:
    rows = []
    if "mixer" in results:
        for length, target in ((16384, 5.0), (32768, 8.0)):
            where = {"mode": "forward_backward", "seq_len": length}
            rat = find_case(results["mixer"]["cases"], mixer="rat", **where)
            attention = find_case(results["mixer"]["cases"], mixer="attention", **where)
            prefix, names = f"mixer fwd+bwd, T={length // 1024}K", ("attention", "RAT")
            rows.append(target_row(f"{prefix}: attention time / RAT time", attention, rat, "median_s", target, names))
            rows.append(target_row(f"{prefix}: attention memory / RAT memory", attention, rat, "peak_memory_bytes",
                                   1.0, names))
    if "model" in results:
        for length in (4096, 16384):
            rat = find_case(results["model"]["cases"], model="rat", mode="train", seq_len=length)
            llama = find_case(results["model"]["cases"], model=model.BASELINE, mode="train", seq_len=length)
            rows.append(target_row(f"one-layer model fwd+bwd, T={length // 1024}K: Llama time / RAT time", llama, rat,
                                   "median_s", 3.5 if length == 16384 else None, ("Llama", "RAT")))
    if "decode" in results:
        for cache_kind in decode.CACHES:
            for batch in (16, 64):
                where = {"cache": cache_kind, "context": 4096, "batch": batch}
                rat = find_case(results["decode"]["cases"], model="rat", **where)
                llama = find_case(results["decode"]["cases"], model=model.BASELINE, **where)
                label = f"decode ({cache_kind} cache), 4K context, batch {batch}: RAT tokens/s / Llama tokens/s"
                rows.append(target_row(label, rat, llama, "decode_tokens_per_s", 12.0 if batch == 64 else None,
                                       ("RAT", "Llama")))
    if "cache" in results:
        exact = all(entry["status"] == "ok" and all(point["matches_formula"] for point in entry["points"])
                    for entry in results["cache"]["models"])
        rows.append(["cache bytes equal the formula (1/L of KV + 2*D fp32 per RAT layer) for every model and length",
                     "yes" if exact else "no", "exact", "yes" if exact else "no", ""])
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.targets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(RESULTS / "targets"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help="sections to measure now (default: all; 'none' only rebuilds targets.md); the others are "
                             "read back from OUTPUT")
    args = parser.parse_args(argv)
    only = set() if args.only == "none" else set(args.only.split(","))
    if only - set(BENCHMARKS):
        parser.error(f"--only takes a comma-separated subset of {','.join(BENCHMARKS)}; unknown: "
                     f"{','.join(sorted(only - set(BENCHMARKS)))}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    options = RunOptions.resolve(device="cpu", dtype="float32", threads=args.threads)
    torch.set_num_threads(options.threads)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    machine = machine_info(options)

    results, provenance = {}, []
    for name, benchmark in BENCHMARKS.items():
        saved = output / f"{name}.json"
        if name in only:
            results[name] = benchmark.run(SETTINGS[name], options, output_dir=output, machine=machine)
        elif saved.exists():
            results[name] = json.loads(saved.read_text())
            logger.info("%s: read back from %s (measured %s)", name, saved, results[name]["machine"]["date_utc"])
        else:
            logger.info("%s: not measured in this run and no %s to read back", name, saved)
            continue
        when = results[name]["machine"]
        provenance.append(f"{name} {when['date_utc']} (commit {when.get('rat_transformers_commit')})")

    report = "\n".join([
        "## Performance targets", "", machine_markdown(machine), "- measured: " + "; ".join(provenance), "",
        markdown_table(["measurement", "measured", "target", "met", "figures"], target_rows(results)), "",
    ])
    (output / "targets.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
