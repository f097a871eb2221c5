"""
Run the benchmark suite: RAT against softmax attention, side by side, with correctness checks before any timing.

    python benchmarks/run.py                      # the full suite (long on a CPU: see docs/README_benchmarks.md)
    python benchmarks/run.py --quick              # smaller sizes, about two minutes on a quiet machine
    python benchmarks/run.py --only mixer,cache --output my-results

Writes `<benchmark>.json` and `<benchmark>.png` for each benchmark and `results.md` (machine description and one
table per benchmark, also printed) into the output folder. Exits with status 1 if a benchmark refused to time what
it compares (a failed correctness check) or crashed; failed configurations (out of memory, timeout, a failing
static cache) are reported in the tables and do not stop the suite.
"""

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import cache, decode, mixer, model  # noqa: E402
from benchmarks.common import (  # noqa: E402
    CorrectnessError,
    RunOptions,
    machine_info,
    machine_markdown,
    memory_probe,
    prepare_process,
    run_case,
)


logger = logging.getLogger("benchmarks")

BENCHMARKS = {"mixer": mixer, "model": model, "decode": decode, "cache": cache}


def settings_for(scale: str, device: str) -> dict:
    """Settings of every benchmark at a scale: "full" (the published figures), "quick", or "smoke" (seconds)."""
    if scale == "full":
        mixer_lengths = (1024, 2048, 4096, 8192, 16384, 32768) + ((65536,) if device.startswith("cuda") else ())
        return {
            "mixer": mixer.MixerSettings(lengths=mixer_lengths),
            "model": model.ModelSettings(),
            "decode": decode.DecodeSettings(),
            "cache": cache.CacheSettings(),
        }
    if scale == "quick":
        return {
            "mixer": mixer.MixerSettings(lengths=(256, 1024, 4096), tokens_per_batch=4096, warmup=1, repeats=3,
                                         max_seconds=5),
            "model": model.ModelSettings(hidden_size=256, num_layers=4, num_heads=4, vocab_size=8192,
                                         sliding_window=257, lengths=(256, 1024, 2048), tokens_per_batch=2048,
                                         warmup=1, repeats=3, max_seconds=5),
            "decode": decode.DecodeSettings(contexts=(256, 1024), batches=(1, 8), new_tokens=16, repeats=3,
                                            max_seconds=5),
            "cache": cache.CacheSettings(size="mini", contexts=(256, 512, 1024, 2048),
                                         formula_contexts=(4096, 16384, 65536, 262144, 1048576)),
        }
    if scale == "smoke":
        return {
            "mixer": mixer.MixerSettings(hidden_size=32, num_heads=4, chunk_size=4, lengths=(16, 32),
                                         tokens_per_batch=64, warmup=1, repeats=1, check_length=11),
            "model": model.ModelSettings(hidden_size=32, num_layers=2, num_heads=4, chunk_size=4, vocab_size=64,
                                         sliding_window=9, lengths=(16, 32), tokens_per_batch=64, warmup=1,
                                         repeats=1, check_length=11),
            "decode": decode.DecodeSettings(hidden_size=32, num_heads=4, chunk_size=4, vocab_size=64,
                                            contexts=(8, 16), batches=(1, 2), new_tokens=3, repeats=1,
                                            check_prompt_length=6, check_new_tokens=7),
            "cache": cache.CacheSettings(size="tiny", contexts=(16, 40), sliding_window=9,
                                         formula_contexts=(1024, 4096), check_prompt_length=19, check_new_tokens=15),
        }
    raise ValueError(f"Unknown scale {scale!r}: choose full, quick or smoke.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="RAT vs softmax attention: mixer, model, decode and cache-memory benchmarks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs (about two minutes)")
    scale.add_argument("--smoke", action="store_true", help="toy sizes: checks the suite end to end in seconds")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks to run")
    parser.add_argument("--output", default=str(ROOT / "results" / "benchmarks"), help="folder for JSON, PNG, results.md")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the usable cores; use fewer on a shared machine)")
    parser.add_argument("--rat-implementation", default="auto", help="RatConfig.rat_implementation of the timed RAT layers")
    parser.add_argument("--no-isolation", action="store_true",
                        help="run every configuration in this process (faster start; peak memory then under-reports)")
    parser.add_argument("--case-timeout", type=float, default=1800.0, help="seconds before one configuration is stopped")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per configuration (overrides the scale's)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per configuration (overrides the scale's)")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated sequence lengths of the mixer and model benchmarks (overrides the scale's)")
    args = parser.parse_args(argv)
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown} in --only: choose among {list(BENCHMARKS)}")
    if args.lengths:
        try:
            args.lengths = tuple(int(value) for value in args.lengths.split(","))
        except ValueError:
            parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    return args


def apply_overrides(settings: dict, args) -> dict:
    for name, value in list(settings.items()):
        changes = {}
        fields = {field.name for field in dataclasses.fields(value)}
        if args.repeats is not None and "repeats" in fields:
            changes["repeats"] = args.repeats
        if args.warmup is not None and "warmup" in fields:
            changes["warmup"] = args.warmup
        if args.lengths and "lengths" in fields:
            changes["lengths"] = args.lengths
        settings[name] = dataclasses.replace(value, **changes)
    return settings


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    options = RunOptions.resolve(
        device=args.device, dtype=args.dtype, threads=args.threads, isolate=not args.no_isolation,
        case_timeout_s=args.case_timeout, rat_implementation=args.rat_implementation,
    )
    prepare_process(options)
    scale = "quick" if args.quick else "smoke" if args.smoke else "full"
    settings = apply_overrides(settings_for(scale, options.device), args)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    machine = machine_info(options)
    probe_spec = {"bytes": 64 * 2**20, "options": dataclasses.asdict(options)}
    machine["memory_probe"] = run_case(memory_probe, probe_spec, options)
    if machine["memory_probe"]["status"] == "ok":
        logger.info("Peak memory by %s: a 64 MiB allocation reads as %.1f MiB", machine["memory_probe"]["memory_method"],
                    machine["memory_probe"]["peak_memory_bytes"] / 2**20)
    else:
        logger.warning("The peak-memory probe failed: %s", machine["memory_probe"].get("error"))
    logger.info("Benchmarks %s at scale %r on %s (%s, %d threads), results in %s",
                args.only, scale, machine["gpu"] or machine["cpu"], options.dtype, options.threads, output)

    sections, problems = [], []
    started = time.perf_counter()
    for name in args.only:
        module = BENCHMARKS[name]
        begun = time.perf_counter()
        try:
            result = module.run(settings[name], options, output_dir=output, machine=machine)
        except CorrectnessError as error:
            logger.error("[%s] %s", name, error)
            problems.append(f"{name}: {error}")
            sections.append(f"### {name}\n\nNot timed: a correctness check failed.\n\n```\n{error}\n```")
            continue
        except Exception as error:  # noqa: BLE001 - one broken benchmark does not stop the others
            logger.exception("[%s] crashed", name)
            problems.append(f"{name}: crashed: {type(error).__name__}: {error}")
            sections.append(f"### {name}\n\nCrashed: `{type(error).__name__}: {error}`")
            continue
        sections.append(module.markdown(result))
        logger.info("[%s] done in %.0f s", name, time.perf_counter() - begun)

    elapsed = time.perf_counter() - started
    arguments = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python benchmarks/run.py", *(shlex.quote(argument) for argument in arguments)])
    isolation = ("each configuration in a fresh process" if options.isolate
                 else "all configurations in one process (peak memory may under-report)")
    report = "\n".join([
        "## Benchmark results",
        "",
        f"`{command.strip()}` (scale {scale}, {elapsed:.0f} s; {isolation}) on:",
        "",
        machine_markdown(machine),
        "",
        "\n\n".join(sections),
        "",
    ])
    (output / "results.md").write_text(report)
    print(report)
    logger.info("Wrote %s (%d benchmark(s) in %.0f s)", output / "results.md", len(args.only), elapsed)
    if problems:
        logger.error("Problems:\n%s", "\n".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
