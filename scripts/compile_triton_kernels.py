"""
Compile the Triton kernels of `modeling_rat/rat_triton.py` ahead of time for NVIDIA GPUs, without a GPU, as they
launch, and report what each compiled kernel needs.

    python scripts/compile_triton_kernels.py                 # sm_90 and sm_80, bf16/fp16/fp32/TF32, d 64/128
    python scripts/compile_triton_kernels.py --arch 90 --dtype bfloat16 --head-dim 128 --json report.json

How. The launch wrappers of `rat_triton` run on meta tensors (no memory, no GPU) laid out as the model passes them,
with every launch recorded instead of run, for the problems of `PROBLEMS`: training and prefill at two lengths,
prefill over a cache at two history sizes, decoding at two cache sizes, and problems far too large to allocate here
(8,192 packed sequences, one 4M-token sequence, a decode batch of 4,096 at 128K tokens). Each recorded launch is
specialised as Triton's launcher specialises it (integer values of 1, divisibility by 16, pointer alignment,
`do_not_specialize`), compiled for the target (Triton's front end, then ptxas), and its ptxas statistics read back
by running the same ptxas with `-v` on the kernel's PTX.

One record per compiled kernel (`--json`): `arch`, `dtype`, `head_dim`, `kernel`, `shared_bytes` (against the
architecture's per-block limit), `registers`, `spill_bytes` (spill stores + loads, 0 when nothing spills),
`stack_bytes`, `matrix_units` (`wgmma`, `mma.sync`, or `none`: products on FMA units, or no products),
`grid_ok` (every grid it was launched with fits CUDA's limits), `specializations` (distinct compilations across
the lengths and history sizes: 1 means a new length never recompiles), the tiles and warps.
The script fails (exit 1, `error:` line) when a kernel exceeds the shared memory limit or a grid exceeds CUDA's
limits, and with `--no-spill` when a 16-bit kernel spills.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock


if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("error: unset TRITON_INTERPRET: this script compiles the kernels, which the interpreter would replace")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from modeling_rat import rat_triton  # noqa: E402


# Largest shared memory a block may use (opt-in), bytes.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# input dtypes; "float32-tf32": float32 with TF32 products allowed (torch.set_float32_matmul_precision("high"))
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float32-tf32": torch.float32}
HIDDEN_SIZE, NUM_QK_GROUPS, CHUNK_SIZE = 2048, 2, 16  # the paper's model: H = 2048 / d heads


# ============================================================================================== problems


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def _scan(num_rows, num_chunks, dtype, head_dim, with_initial):
    """The gated scan forward and backward, inputs as the model's chunk grid holds them."""
    shape = (num_rows, num_chunks, CHUNK_SIZE, HIDDEN_SIZE)
    gates, value = _meta(*shape, dtype=torch.float32), _meta(*shape, dtype=dtype)
    key = _meta(*shape[:3], NUM_QK_GROUPS * head_dim, dtype=dtype)
    initial = _meta(num_rows, 2, HIDDEN_SIZE, dtype=torch.float32) if with_initial else None
    states = rat_triton._gated_scan_forward(gates, value, key, initial)
    rat_triton._gated_scan_backward(torch.empty_like(states), gates, value, key, initial)


def _attention(num_rows, num_chunks, dtype, head_dim, num_history=0, backward=True):
    """The chunk attention forward (and backward), with the model's permuted views and summaries layout."""
    num_heads = HIDDEN_SIZE // head_dim
    grid_shape = (num_rows, num_chunks, CHUNK_SIZE, num_heads)
    query = _meta(*grid_shape, head_dim, dtype=dtype).permute(0, 2, 3, 1, 4)  # (N, L, H, C, d)
    own_score = _meta(*grid_shape, dtype=torch.float32).permute(0, 2, 3, 1)
    own_value = _meta(*grid_shape, head_dim, dtype=dtype).permute(0, 2, 3, 1, 4)
    summaries = _meta(num_rows, num_chunks, num_heads, head_dim, dtype=dtype)[:, :-1].transpose(1, 2)
    history_count = None
    if num_history:  # the cache's slots come first: concatenated, so contiguous
        summaries = _meta(num_rows, num_heads, num_history + num_chunks - 1, head_dim, dtype=dtype)
        history_count = _meta(num_rows, dtype=torch.int64)
    out, lse = rat_triton._chunk_attention_forward(query, own_score, own_value, summaries, summaries, history_count,
                                                   head_dim**-0.5)
    if backward:
        grad_out = _meta(*grid_shape, head_dim, dtype=dtype).permute(0, 2, 3, 1, 4)
        dense = [rat_triton._dense(t) for t in (query, own_score, own_value, summaries, summaries)]
        rat_triton._chunk_attention_backward(grad_out, *dense, history_count, out, lse, head_dim**-0.5)


def _decode(batch, capacity, dtype, head_dim):
    num_heads = HIDDEN_SIZE // head_dim
    cache = _meta(batch, num_heads, capacity, head_dim, dtype=dtype)
    query = _meta(batch, 1, num_heads, 1, head_dim, dtype=dtype)
    rat_triton._chunk_attention_forward(query, _meta(batch, 1, num_heads, 1, dtype=torch.float32), query, cache, cache,
                                        _meta(batch, dtype=torch.int64), head_dim**-0.5)


# (name, function(dtype, head_dim), large): what the model launches, each at two sizes; the large problems, which
# are far too large to allocate here, check grids and 64-bit strides (compiled, not counted in `specializations`)
PROBLEMS = [
    ("training, 4K tokens", lambda dtype, d: (_scan(2, 256, dtype, d, False), _attention(2, 256, dtype, d)), False),
    ("training, 37 chunks", lambda dtype, d: (_scan(3, 37, dtype, d, False), _attention(3, 37, dtype, d)), False),
    ("prefill over a cache of 40 chunks", lambda dtype, d: (_scan(2, 8, dtype, d, True),
                                                            _attention(2, 8, dtype, d, 40, backward=False)), False),
    ("prefill over a cache of 301 chunks", lambda dtype, d: (_scan(1, 3, dtype, d, True),
                                                             _attention(1, 3, dtype, d, 301, backward=False)), False),
    ("decode, 256 cached chunks", lambda dtype, d: _decode(512, 256, dtype, d), False),
    ("decode, 1 cached chunk", lambda dtype, d: _decode(3, 1, dtype, d), False),
    ("8,192 packed sequences of 2 chunks", lambda dtype, d: (_scan(8192, 2, dtype, d, False),
                                                             _attention(8192, 2, dtype, d)), True),
    ("one sequence of 4M tokens", lambda dtype, d: (_scan(1, 2**18, dtype, d, False),
                                                    _attention(1, 2**18, dtype, d)), True),
    ("decode, batch 4,096 at 128K tokens", lambda dtype, d: _decode(4096, 8192, dtype, d), True),
]


def record_launches(arch, dtype_name, head_dim):
    """[(problem, large, kernel, grid, args, meta)] of every launch the wrappers make for the problems on this arch."""
    launches = []
    precision = "high" if dtype_name.endswith("tf32") else "highest"
    for problem, run, large in PROBLEMS:
        def record(kernel, grid, *args, **meta):
            launches.append((problem, large, kernel, grid, args, meta))

        with mock.patch.object(rat_triton, "_launch", record), \
                mock.patch.object(rat_triton, "_tile_capability", lambda device: divmod(arch, 10)), \
                mock.patch.object(torch, "get_float32_matmul_precision", lambda: precision):
            run(DTYPES[dtype_name], head_dim)
    return launches


# ============================================================================================== compiling


def _variant_name(kernel, meta):
    name = kernel.__name__.strip("_").removesuffix("_kernel")
    flags = [flag.lower().removeprefix("has_") for flag in ("HAS_HISTORY", "HAS_INITIAL") if meta.get(flag)]
    return f"{name}[{','.join(flags)}]" if flags else name


def specialize(kernel, backend, args, meta):
    """Triton's launch-time specialisation of these arguments: (cache key, signature, constexprs, attrs, options)."""
    kwargs = dict(meta, debug=kernel.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    key = str(specialization) + str(options)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return key, signature, constexprs, attrs, options


def ptxas_statistics(ptx: str, arch: int) -> dict:
    """Registers, spills and stack of the kernel in `ptx`, from the ptxas Triton uses, run as Triton runs it plus -v."""
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "kernel.ptx"
        source.write_text(ptx)
        completed = subprocess.run(
            [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
             str(source), "-o", str(Path(directory) / "kernel.o")],
            capture_output=True, text=True, check=True,
        )
    log = completed.stderr + completed.stdout
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not (registers and spills and stack):
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return dict(registers=int(registers.group(1)), spill_bytes=int(spills.group(1)) + int(spills.group(2)),
                stack_bytes=int(stack.group(1)))


def matrix_units(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "none"


def grid_fits(grid) -> bool:
    return all(size <= limit for size, limit in zip(grid, rat_triton.CUDA_GRID_LIMITS))


def compile_all(archs, dtype_names, head_dims, verbose=True):
    """Compile every launched kernel for every (arch, dtype, head size); one record per distinct compiled kernel."""
    records = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        for dtype_name in dtype_names:
            for head_dim in head_dims:
                variants = {}  # variant name -> its kernel, specialisations, grids
                for problem, large, kernel, grid, args, meta in record_launches(arch, dtype_name, head_dim):
                    variant = variants.setdefault(_variant_name(kernel, meta), dict(
                        kernel=kernel, keys={}, sized_keys=set(), grids=[], meta=meta))
                    key, *compile_inputs = specialize(kernel, backend, args, meta)
                    variant["keys"].setdefault(key, compile_inputs)
                    if not large:
                        variant["sized_keys"].add(key)
                    variant["grids"].append((problem, grid))
                for name, variant in variants.items():
                    begin = time.perf_counter()
                    # every specialisation is compiled; the report shows the first one's figures
                    compiled = [triton.compile(ASTSource(variant["kernel"], signature, constexprs, attrs), target=target,
                                               options=options.__dict__)
                                for signature, constexprs, attrs, options in variant["keys"].values()]
                    first = compiled[0]
                    bad_grids = [f"{problem}: {grid}" for problem, grid in variant["grids"] if not grid_fits(grid)]
                    tiles = {k: v for k, v in variant["meta"].items() if k.startswith("BLOCK_")}
                    record = dict(
                        arch=arch, dtype=dtype_name, head_dim=head_dim, kernel=name,
                        shared_bytes=first.metadata.shared, shared_limit=SHARED_MEMORY_LIMIT.get(arch),
                        **ptxas_statistics(first.asm["ptx"], arch), matrix_units=matrix_units(first.asm["ptx"]),
                        grid_ok=not bad_grids, bad_grids=bad_grids, largest_grid=max(g[0] for _, g in variant["grids"]),
                        specializations=len(variant["sized_keys"]), num_warps=first.metadata.num_warps,
                        num_stages=first.metadata.num_stages, tiles=tiles,
                        seconds=round(time.perf_counter() - begin, 2),
                    )
                    records.append(record)
                    if verbose:
                        print(f"sm_{arch} {record['dtype']:>12} d={head_dim:<4} {name:<38} shared {record['shared_bytes']:>6} B"
                              f"  regs {record['registers']:>3}  spill {record['spill_bytes']:>5} B  "
                              f"{record['matrix_units']:<8} grid {'ok' if record['grid_ok'] else 'TOO LARGE'}  "
                              f"specializations {record['specializations']}  ({record['seconds']} s)", flush=True)
    return records


def problems_found(records, require_no_spill: bool) -> list[str]:
    """What is wrong in the records: shared memory over the limit, grids over CUDA's limits, 16-bit spills."""
    problems = []
    for r in records:
        where = f"{r['kernel']} (sm_{r['arch']}, {r['dtype']}, d {r['head_dim']})"
        if r["shared_limit"] is not None and r["shared_bytes"] > r["shared_limit"]:
            problems.append(f"{where} needs {r['shared_bytes']} bytes of shared memory (limit {r['shared_limit']})")
        if not r["grid_ok"]:
            problems.append(f"{where} launches grids beyond CUDA's limits: {'; '.join(r['bad_grids'])}")
        if require_no_spill and r["dtype"] in ("bfloat16", "float16") and r["spill_bytes"]:
            problems.append(f"{where} spills {r['spill_bytes']} bytes ({r['registers']} registers)")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities, e.g. 90 80")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="input dtypes (float32-tf32: float32 with TF32 products)")
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    parser.add_argument("--no-spill", action="store_true", help="fail when a 16-bit kernel spills registers")
    args = parser.parse_args(argv)
    for head_dim in args.head_dim:
        if head_dim <= 0 or HIDDEN_SIZE % head_dim or head_dim > rat_triton.MAX_HEAD_DIM:
            parser.error(f"--head-dim {head_dim}: must divide {HIDDEN_SIZE} and be at most {rat_triton.MAX_HEAD_DIM}")
    records = compile_all(args.arch, args.dtype, args.head_dim)
    print(f"compiled {len(records)} kernels; largest shared memory {max(r['shared_bytes'] for r in records)} bytes, "
          f"most registers {max(r['registers'] for r in records)}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=2))
    problems = problems_found(records, args.no_spill)
    if problems:
        sys.exit("error: " + "; ".join(problems))
    return records


if __name__ == "__main__":
    main()
