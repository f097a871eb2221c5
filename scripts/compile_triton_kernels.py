"""
Compile the Triton kernels of `modeling_rat/rat_triton.py` ahead of time for NVIDIA GPUs, without a GPU.

    python scripts/compile_triton_kernels.py                 # sm_90 (H100/H200) and sm_80 (A100), bf16/fp16/fp32
    python scripts/compile_triton_kernels.py --arch 90 --dtype bfloat16 --head-dim 128

Each kernel is compiled (Triton front end, then ptxas, which ships with triton) with the launch configuration the
wrappers use, and its static shared memory is checked against the architecture's per-block limit. This catches
errors that Triton's interpreter (used by the CPU tests) cannot see: typing and layout errors of the compiler, tile
shapes the tensor cores refuse, shared memory overflows. It runs nothing on a GPU.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    raise SystemExit("Unset TRITON_INTERPRET: this script compiles the kernels, which the interpreter would replace.")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from modeling_rat import rat_triton  # noqa: E402


# Largest shared memory a block may use (opt-in), bytes.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
FP32_POINTERS = {"own_score_ptr", "lse_ptr", "delta_ptr", "grad_own_score_ptr", "states_ptr"}


def signature(kernel, dtype, constants, fp32_pointers=()):
    """Triton types of a kernel's arguments: pointers by name, integers (sizes, strides) i32, scales fp32."""
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name == "history_count_ptr":
            types[name] = "*i64"
        elif name.endswith("_ptr"):
            types[name] = "*fp32" if name in FP32_POINTERS or name in fp32_pointers else f"*{TRITON_TYPES[dtype]}"
        elif name in ("qk_scale", "scale"):
            types[name] = "fp32"
        else:
            types[name] = "i32"
    return types


def kernel_launches(dtype, head_dim):
    """(name, kernel, constexpr arguments, extra options, fp32 pointers) as the wrappers launch them."""
    config = rat_triton._attention_config(head_dim, dtype)
    options = {key: config.pop(key) for key in ("num_warps", "num_stages") if key in config}
    launches = []
    for has_initial in (False, True):
        scan = dict(NUM_STREAMS=2, BLOCK_STREAMS=2, BLOCK_FEATURES=rat_triton._scan_block_features(4096),
                    HAS_INITIAL=has_initial)
        launches.append((f"chunk_scan_forward[initial={has_initial}]", rat_triton._chunk_scan_forward_kernel, scan, {},
                         ()))
        launches.append((f"chunk_scan_backward[initial={has_initial}]", rat_triton._chunk_scan_backward_kernel, scan,
                         {}, ()))
    for has_history in (False, True):
        blocked = dict(config, HAS_HISTORY=has_history)
        launches.append((f"attention_forward[history={has_history}]", rat_triton._chunk_attention_forward_kernel,
                         blocked, options, ()))
        launches.append((f"attention_backward_query[history={has_history}]",
                         rat_triton._chunk_attention_backward_query_kernel, blocked, options, ()))
        launches.append((f"attention_backward_key[history={has_history}]",
                         rat_triton._chunk_attention_backward_key_kernel, blocked, options, ()))
        rows = dict(HAS_HISTORY=has_history, BLOCK_N=rat_triton.ROWS_BLOCK_N, BLOCK_D=config["BLOCK_D"])
        launches.append((f"attention_rows[history={has_history}]", rat_triton._chunk_attention_rows_kernel, rows, {},
                         ()))
    return launches


def compile_all(archs, dtypes, head_dims, verbose=True):
    """Compile every kernel for every (arch, dtype, head size); returns one record per compilation."""
    records = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for dtype in dtypes:
            for head_dim in head_dims:
                for name, kernel, constants, options, fp32_pointers in kernel_launches(dtype, head_dim):
                    begin = time.perf_counter()
                    source = ASTSource(kernel, signature(kernel, dtype, constants, fp32_pointers), constants)
                    compiled = triton.compile(source, target=target, options=options)
                    shared = compiled.metadata.shared
                    record = dict(arch=arch, dtype=str(dtype), head_dim=head_dim, kernel=name, shared_bytes=shared,
                                  shared_limit=SHARED_MEMORY_LIMIT.get(arch), num_warps=compiled.metadata.num_warps,
                                  seconds=round(time.perf_counter() - begin, 2))
                    records.append(record)
                    if verbose:
                        print(f"sm_{arch} {TRITON_TYPES[dtype]:>4} d={head_dim:<4} {name:<42} shared {shared:>7} B "
                              f"({record['seconds']} s)")
                    limit = SHARED_MEMORY_LIMIT.get(arch)
                    if limit is not None and shared > limit:
                        raise RuntimeError(f"{name} needs {shared} bytes of shared memory on sm_{arch} (limit {limit}).")
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities, e.g. 90 80")
    parser.add_argument("--dtype", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    args = parser.parse_args(argv)
    records = compile_all(args.arch, [getattr(torch, name) for name in args.dtype], args.head_dim)
    print(f"compiled {len(records)} kernels; largest shared memory {max(r['shared_bytes'] for r in records)} bytes")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return records


if __name__ == "__main__":
    main()
