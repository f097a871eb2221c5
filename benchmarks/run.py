"""
Run the benchmark suite from the repository root: RAT against softmax attention, side by side, with correctness
checks before any timing (docs/benchmarks.md).

    python -m benchmarks.run                          # the full suite: the published figures (long on a CPU)
    python -m benchmarks.run --quick                  # smaller sizes, a few minutes
    python -m benchmarks.run --only mixer --lengths 16384 --max-run-time 1
                                                      # RAT vs SDPA mixer at 16K tokens: time and peak memory

Writes `<benchmark>.json` and `<benchmark>.png` for each benchmark and `results.md` (machine description and one
table per benchmark, also printed) into the output folder. Exits with status 1 if a benchmark refused to time what
it compares (a failed correctness check) or crashed; failed configurations (out of memory, time-out, a failing
static cache) are reported in the tables and do not stop the suite.
"""

import argparse
import dataclasses
import logging
import shlex
import sys
import time
from pathlib import Path

import torch


if not __package__:  # run as a file, where the sibling modules cannot be imported
    sys.exit("error: run the suite as a module from the repository root: python -m benchmarks.run [options]")

from . import cache, decode, mixer, model  # noqa: E402
from .common import (  # noqa: E402
    RESULTS,
    ROOT,
    CorrectnessError,
    RunOptions,
    machine_info,
    machine_markdown,
    memory_probe,
    run_case,
)


logger = logging.getLogger("benchmarks")

BENCHMARKS = {"mixer": mixer, "model": model, "decode": decode, "cache": cache}
#: seconds of timed calls per measurement at each scale (--max-run-time overrides it)
MAX_RUN_TIME = {"full": 30.0, "quick": 2.0, "smoke": 0.05}


def settings_for(scale: str, device: str) -> dict:
    """Settings of every benchmark at a scale: "full" (the published figures), "quick", or "smoke" (seconds)."""
    if scale == "full":
        mixer_lengths = (1024, 2048, 4096, 8192, 16384, 32768) + ((65536,) if device.startswith("cuda") else ())
        return {"mixer": mixer.MixerSettings(lengths=mixer_lengths), "model": model.ModelSettings(),
                "decode": decode.DecodeSettings(), "cache": cache.CacheSettings()}
    if scale == "quick":
        architecture = model.Architecture(hidden_size=256, num_layers=4, num_heads=4, vocab_size=8192,
                                          sliding_window=257)
        return {
            "mixer": mixer.MixerSettings(lengths=(256, 1024, 4096), tokens_per_batch=4096),
            "model": model.ModelSettings(architecture, lengths=(256, 1024, 2048), tokens_per_batch=2048),
            "decode": decode.DecodeSettings(contexts=(256, 1024), batches=(1, 8), new_tokens=16),
            "cache": cache.CacheSettings(size="mini", contexts=(256, 512, 1024, 2048)),
        }
    if scale == "smoke":
        architecture = model.Architecture(hidden_size=32, num_layers=2, num_heads=4, chunk_size=4, vocab_size=64,
                                          sliding_window=9)
        return {
            "mixer": mixer.MixerSettings(hidden_size=32, num_heads=4, chunk_size=4, lengths=(16, 32),
                                         tokens_per_batch=64, check_length=11),
            "model": model.ModelSettings(architecture, lengths=(16, 32), tokens_per_batch=64, check_length=11),
            "decode": decode.DecodeSettings(architecture, contexts=(8, 16), batches=(1, 2), new_tokens=6,
                                            check_prompt_length=6, check_new_tokens=7),
            "cache": cache.CacheSettings(size="tiny", contexts=(16, 40), sliding_window=9,
                                         formula_contexts=(1024, 4096), check_prompt_length=19, check_new_tokens=15),
        }
    raise ValueError(f"Unknown scale {scale!r}: choose full, quick or smoke.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="RAT vs softmax attention: mixer, model, decode and cache-memory benchmarks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="smaller sizes, shorter timing (a few minutes)")
    scale.add_argument("--smoke", action="store_true", help="toy sizes: checks the suite end to end in seconds")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks to run")
    parser.add_argument("--output", default=None,
                        help="folder for JSON, PNG and results.md (default: results/benchmarks for the full suite, "
                             "outputs/benchmarks-quick or -smoke otherwise)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the usable cores; use fewer on a shared machine)")
    parser.add_argument("--rat-implementation", default="auto",
                        help="RatConfig.rat_implementation of the timed RAT layers")
    parser.add_argument("--no-isolation", action="store_true",
                        help="run every configuration in this process (faster start; peak memory then under-reports)")
    parser.add_argument("--case-timeout", type=float, default=1800.0,
                        help="seconds before one configuration is stopped")
    parser.add_argument("--max-run-time", type=float, default=None,
                        help="seconds of timed calls per measurement at most (default: 30, --quick 2, --smoke 0.05)")
    parser.add_argument("--lengths", default=None,
                        help="comma-separated sequence lengths of the mixer and model sweeps (overrides the scale's)")
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
    args.scale = "quick" if args.quick else "smoke" if args.smoke else "full"
    default_output = RESULTS if args.scale == "full" else ROOT / "outputs" / f"benchmarks-{args.scale}"
    args.output = Path(args.output or default_output)
    try:
        args.options = RunOptions.resolve(
            device=args.device, dtype=args.dtype, threads=args.threads, isolate=not args.no_isolation,
            case_timeout_s=args.case_timeout, rat_implementation=args.rat_implementation,
            max_run_time=MAX_RUN_TIME[args.scale] if args.max_run_time is None else args.max_run_time,
        )
        args.settings = settings_for(args.scale, args.options.device)
        if args.lengths:
            for name in ("mixer", "model"):
                args.settings[name] = dataclasses.replace(args.settings[name], lengths=args.lengths)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    options, output = args.options, args.output
    torch.set_num_threads(options.threads)
    output.mkdir(parents=True, exist_ok=True)
    machine = machine_info(options)
    machine["memory_probe"] = run_case(memory_probe, {"bytes": 64 * 2**20}, None, options)
    logger.info("Peak memory by %s: a 64 MiB allocation reads as %s", machine["memory_probe"].get("memory_method"),
                machine["memory_probe"].get("peak_memory_bytes", machine["memory_probe"].get("error")))
    logger.info("Benchmarks %s at scale %r on %s (%s, %d threads), results in %s",
                args.only, args.scale, machine["gpu"] or machine["cpu"], options.dtype, options.threads, output)

    sections, problems = [], []
    started = time.perf_counter()
    for name in args.only:
        begun = time.perf_counter()
        try:
            result = BENCHMARKS[name].run(args.settings[name], options, output_dir=output, machine=machine)
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
        sections.append(BENCHMARKS[name].markdown(result))
        logger.info("[%s] done in %.0f s", name, time.perf_counter() - begun)

    elapsed = time.perf_counter() - started
    arguments = argv if argv is not None else sys.argv[1:]
    command = " ".join(["python -m benchmarks.run", *(shlex.quote(argument) for argument in arguments)])
    isolation = ("each configuration in a fresh process" if options.isolate
                 else "all configurations in one process (peak memory may under-report)")
    report = "\n".join([
        "## Benchmark results", "",
        f"`{command.strip()}` (scale {args.scale}, {elapsed:.0f} s; {isolation}) on:", "",
        machine_markdown(machine), "",
        "\n\n".join(sections), "",
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
