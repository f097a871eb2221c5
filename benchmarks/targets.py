"""
The project's performance targets, measured side by side in one run with the suite's benchmarks:

    python benchmarks/targets.py [--output results/benchmarks/targets] [--threads N] [--only decode,cache]

`--only` re-measures the named sections (`--only none`: none, the report is rebuilt); the others are read back from their JSON files in the output folder
(when a previous run wrote them), so the report always covers every target that has been measured.

1. mixer forward+backward, RAT vs SDPA attention (D 512, H 8, projections included): >= 5x at 16K tokens,
   >= 8x at 32K, peak memory <= attention's;
2. one-layer model (MLP included) forward+backward, RAT vs Llama of the same size: >= 3.5x at 16K tokens;
3. generate() decode rate, RAT vs Llama (D 512, H 8, 2 layers) at 4K context: >= 12x at batch 64 (batch 16 too),
   with the dynamic and the static cache;
4. cache bytes: exactly 1/L of the key/value cache plus 2*D (fp32 running state) per RAT layer per sequence.

Every benchmark checks its models against references before timing (see docs/benchmarks.md). Writes the suite's
JSON/PNG files and `targets.md` (machine, measured figures, target, met or not) into the output folder.
"""

import argparse
import json
import logging
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cache, decode, mixer, model  # noqa: E402
from benchmarks.common import RunOptions, find_case, machine_info, machine_markdown, prepare_process  # noqa: E402


logger = logging.getLogger("benchmarks")


SECTIONS = ("mixer", "model", "decode", "cache")


def _ratio(baseline: dict | None, candidate: dict | None, key: str):
    if not baseline or not candidate or baseline.get("status") != "ok" or candidate.get("status") != "ok":
        return None
    return baseline[key] / candidate[key]


def _figures(first: dict | None, second: dict | None, key: str, first_name: str, second_name: str) -> str:
    """The two measurements behind a ratio, e.g. 'attention 20.2 s, RAT 5.18 s'."""
    def show(case):
        if not case or case.get("status") != "ok":
            return "failed"
        value = case[key]
        if key == "median_s":
            return f"{value:.3g} s"
        if key == "peak_memory_bytes":
            return f"{value / 2**20:.0f} MiB"
        return f"{value:.4g} tokens/s"
    return f"{first_name} {show(first)}, {second_name} {show(second)}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=str(ROOT / "results" / "benchmarks" / "targets"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="sections to measure now (default: all; 'none' only rebuilds targets.md); the others are read back "
                             "from OUTPUT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    options = RunOptions.resolve(device="cpu", dtype="float32", threads=args.threads, isolate=True,
                                 case_timeout_s=1800.0, rat_implementation="auto")
    prepare_process(options)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    machine = machine_info(options)
    only = set() if args.only == "none" else set(args.only.split(","))
    unknown = only - set(SECTIONS)
    if unknown:
        parser.error(f"--only takes a comma-separated subset of {','.join(SECTIONS)}; unknown: {','.join(sorted(unknown))}")
    rows, provenance = [], []

    def measured_or_saved(section, run):
        """Run the section when asked; else read its previous result from the output folder (None if there is none)."""
        if section in only:
            result = run()
        else:
            saved = output / f"{section}.json"
            if not saved.exists():
                logger.info("%s: not measured in this run and no %s to read back", section, saved)
                return None
            result = json.loads(saved.read_text())
            logger.info("%s: read back from %s (measured %s)", section, saved, result["machine"].get("date_utc"))
        when = result.get("machine", {})
        provenance.append(f"{section} {when.get('date_utc', '?')} (commit {when.get('rat_transformers_commit', '?')})")
        return result

    settings = mixer.MixerSettings(lengths=(16384, 32768), tokens_per_batch=32768, warmup=1, repeats=2)
    result = measured_or_saved("mixer", lambda: mixer.run(settings, options, output_dir=output, machine=machine))
    if result is not None:
        cases = result["cases"]
        for length, target in ((16384, 5.0), (32768, 8.0)):
            rat = find_case(cases, mixer="rat", mode="forward_backward", seq_len=length)
            attention = find_case(cases, mixer="attention", mode="forward_backward", seq_len=length)
            rows.append((f"mixer fwd+bwd, T={length // 1024}K: attention time / RAT time", _ratio(attention, rat, "median_s"), target,
                         _figures(attention, rat, "median_s", "attention", "RAT")))
            rows.append((f"mixer fwd+bwd, T={length // 1024}K: attention memory / RAT memory", _ratio(attention, rat, "peak_memory_bytes"), 1.0,
                         _figures(attention, rat, "peak_memory_bytes", "attention", "RAT")))

    settings = model.ModelSettings(num_layers=1, vocab_size=2048, models=("rat", model.BASELINE), lengths=(4096, 16384),
                                   tokens_per_batch=16384, modes=("train",), warmup=1, repeats=2)
    result = measured_or_saved("model", lambda: model.run(settings, options, output_dir=output, machine=machine))
    if result is not None:
        for length in (4096, 16384):
            rat = find_case(result["cases"], model="rat", mode="train", seq_len=length)
            llama = find_case(result["cases"], model=model.BASELINE, mode="train", seq_len=length)
            rows.append((f"one-layer model fwd+bwd, T={length // 1024}K: Llama time / RAT time", _ratio(llama, rat, "median_s"),
                         3.5 if length == 16384 else None, _figures(llama, rat, "median_s", "Llama", "RAT")))

    settings = decode.DecodeSettings(contexts=(4096,), batches=(16, 64), new_tokens=32, warmup=1, repeats=2)
    result = measured_or_saved("decode", lambda: decode.run(settings, options, output_dir=output, machine=machine))
    if result is not None:
        for cache_kind in settings.caches:
            for batch in settings.batches:
                rat = find_case(result["cases"], model="rat", cache=cache_kind, context=4096, batch=batch)
                llama = find_case(result["cases"], model=decode.BASELINE, cache=cache_kind, context=4096, batch=batch)
                rows.append((f"decode ({cache_kind} cache), 4K context, batch {batch}: RAT tokens/s / Llama tokens/s",
                             _ratio(rat, llama, "decode_tokens_per_s"), 12.0 if batch == 64 else None,
                             _figures(rat, llama, "decode_tokens_per_s", "RAT", "Llama")))

    result = measured_or_saved("cache", lambda: cache.run(cache.CacheSettings(), options, output_dir=output, machine=machine))
    if result is not None:
        exact = all(entry["status"] == "ok" and all(point["matches_formula"] for point in entry["points"])
                    for entry in result["models"])
        rows.append(("cache bytes equal the formula (1/L of KV + 2*D fp32 per RAT layer) for every model and length",
                     1.0 if exact else 0.0, 1.0, ""))

    lines = ["## Performance targets", "", machine_markdown(machine), "- measured: " + "; ".join(provenance), "",
             "| measurement | measured | target | met | figures |", "|---|---|---|---|---|"]
    for label, value, target, figures in rows:
        measured = "failed" if value is None else f"{value:.2f}x" if "cache bytes" not in label else ("yes" if value else "no")
        wanted = "" if target is None else (f">= {target:g}x" if "cache bytes" not in label else "exact")
        met = "" if target is None or value is None else ("yes" if value >= target else "no")
        lines.append(f"| {label} | {measured} | {wanted} | {met} | {figures} |")
    report = "\n".join(lines) + "\n"
    (output / "targets.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
