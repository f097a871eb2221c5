"""
Where the mixer time goes: torch.profiler over one forward+backward of the RAT mixer and of the SDPA attention
mixer (the two modules of `benchmarks/mixer.py`), self time grouped into

- matmul: the projections (aten::mm / addmm / bmm), the same kind of work in both mixers;
- attention kernel: SDPA's fused kernels (for RAT: the inter-chunk attention over the chunk summaries);
- everything else: element-wise work, copies, reductions, the chunk scan's steps, allocation.

From these figures follows what bounds the RAT / attention speed-up of the PyTorch path: if every element-wise
operation of RAT were free (what a fused kernel approaches), RAT would still take its matmul + attention-kernel
time, so attention_total / (rat_matmul + rat_attention_kernel) is the ceiling of the ratio at this length.

    python -m benchmarks.profile_mixer [--length 16384] [--batch 1] [--output results/benchmarks]
"""

import argparse
import logging
import sys
from pathlib import Path

import torch


if not __package__:  # run as a file, where the sibling modules cannot be imported
    sys.exit("error: run it as a module from the repository root: python -m benchmarks.profile_mixer [options]")

from .common import RunOptions, machine_info, write_json  # noqa: E402
from .mixer import MixerSettings, build_mixer, mixer_call  # noqa: E402


logger = logging.getLogger("benchmarks")

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"}
ATTENTION_PREFIX = "aten::_scaled_dot_product_flash_attention"  # forward and backward, CPU and GPU variants


def category(name: str) -> str:
    if name in MATMUL_OPS:
        return "matmul"
    if name.startswith(ATTENTION_PREFIX) or name.startswith("aten::_flash_attention") or "efficient_attention" in name:
        return "attention kernel"
    return "everything else"


def profile_mixer(kind: str, settings: MixerSettings, options: RunOptions, length: int, batch: int) -> dict:
    call = mixer_call(build_mixer(settings, kind, options), batch, length)
    hidden = torch.randn(batch, length, settings.hidden_size, requires_grad=True)
    grad = torch.randn(batch, length, settings.hidden_size)
    call(hidden).backward(grad)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        call(hidden).backward(grad)
    totals = {"matmul": 0.0, "attention kernel": 0.0, "everything else": 0.0}
    top = []
    for event in profiler.key_averages():
        seconds = event.self_cpu_time_total / 1e6
        totals[category(event.key)] += seconds
        top.append((seconds, event.key, event.count))
    top.sort(reverse=True)
    return {
        "seconds": totals,
        "total_s": sum(totals.values()),
        "top_ops": [{"op": name, "self_s": seconds, "calls": count} for seconds, name, count in top[:12]],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_mixer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=16384, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--output", default=None, help="folder for profile_mixer_T<length>.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    options = RunOptions.resolve(device="cpu", dtype="float32", threads=args.threads)
    torch.set_num_threads(options.threads)
    settings = MixerSettings(lengths=(args.length,))
    result = {"machine": machine_info(options), "length": args.length, "batch": args.batch, "mixers": {}}
    for kind in ("rat", "attention"):
        logger.info("profiling the %s mixer, %d x %d tokens, forward+backward", kind, args.batch, args.length)
        result["mixers"][kind] = profile_mixer(kind, settings, options, args.length, args.batch)
    rat, attention = result["mixers"]["rat"], result["mixers"]["attention"]
    essential = rat["seconds"]["matmul"] + rat["seconds"]["attention kernel"]
    result["measured_ratio"] = attention["total_s"] / rat["total_s"]
    result["ratio_ceiling_without_elementwise"] = attention["total_s"] / essential

    print(f"\nforward+backward, batch {args.batch} x {args.length} tokens, self CPU time under the profiler (s)")
    print(f"{'':18}{'RAT':>10}{'attention':>12}")
    for name in ("matmul", "attention kernel", "everything else"):
        print(f"{name:18}{rat['seconds'][name]:10.3f}{attention['seconds'][name]:12.3f}")
    print(f"{'total':18}{rat['total_s']:10.3f}{attention['total_s']:12.3f}")
    print(f"\nattention / RAT: {result['measured_ratio']:.2f}x measured; "
          f"{result['ratio_ceiling_without_elementwise']:.2f}x if RAT's element-wise work were free")
    print("\nRAT's largest operations (self time):")
    for entry in rat["top_ops"]:
        print(f"  {entry['self_s']:8.3f} s  {entry['calls']:5d} calls  {entry['op']}")
    if args.output:
        path = write_json(Path(args.output) / f"profile_mixer_T{args.length}.json", result)
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
