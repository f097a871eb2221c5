"""
One command that answers, on a CUDA GPU, whether the RAT Triton kernels are right and how fast they are.

    python scripts/gpu_check.py --output gpu-check           # about 6 minutes on one H200 (at most 8: --budget-s)
    python scripts/gpu_check.py --smoke --output /tmp/check  # tiny shapes, CPU, Triton's interpreter: checks the script

Run it from a checkout whose `modeling_rat` is the one imported (`pip install -e .`, or `PYTHONPATH=.`). It writes
`gpu_check.json` (every figure, per section: `ok`, `seconds`) and `gpu_check.png` into `--output`, prints a summary,
and exits with status 1 (and an `error:` line naming the failed sections) unless every section passed.

Sections, in order; a failing section does not stop the others, and a section is skipped (recorded as such) when
the time left in `--budget-s` is below its estimate:

1. versions: GPU, compute capability, driver, CUDA, torch, triton; the dispatch verdict
   (`triton_unavailable_reason`) and `triton_self_check` (every kernel compiled and launched once).
2. tests: the Triton tests (`tests/test_triton.py`, not the slow ones) on CUDA, in parallel pytest processes
   (compiling dominates their time).
3. correctness: forward and every gradient against float64 references, at the paper's layer (D 2048, 16 heads of
   128, 2 query/key groups, chunk 16) with more query rows and summaries than one tile, in bfloat16, float16,
   float32 (exact products) and float32 with TF32: the gated scan, the chunk attention with and without a history,
   the decode attention, and one RAT layer (the Triton path against the PyTorch path in float64).
4. grid limit: 8,192 packed sequences of 32 tokens x 16 heads, forward and backward (rows x heads beyond the 65,535
   of a grid's y axis), against the PyTorch path.
5. float32 routing: one layer's forward+backward at 8K tokens in float32 with exact products, with TF32, and on the
   PyTorch path: the figures behind `rat_implementation="auto"` sending exact float32 to the PyTorch path.
6. speed: `benchmarks/bench_triton.py` at the paper's setting: a layer's forward+backward and prefill at 4K-128K
   tokens per sequence (262,144 tokens per batch) against SDPA FlashAttention, and a decode step at batch 512 over
   4K tokens of context against SDPA over a KV cache, as TFLOP/s, GB/s and fractions of the roofline.

Time on one H200, estimated from the work and the GPU's peaks (no GPU was available when this was written): CUDA
start and the self check ~40 s (compiling 9 kernels); tests ~90 s (8 processes, ~80 compilations); correctness
~100 s (4 precisions x 9 kernels to compile, the work itself < 5 s); grid ~10 s; float32 routing ~40 s (compiling);
speed ~90 s (per repetition ~10 s of layer runs: attention at 128K ~1.3 s per forward+backward of 490 TFLOP, RAT
~0.2 s; 4 repetitions, checks, decode). Total ~6 minutes.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from unittest import mock


ROOT = Path(__file__).resolve().parents[1]
SMOKE = "--smoke" in sys.argv[1:]
if SMOKE:  # the kernels are built at import: the interpreter must be chosen first
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import modeling_rat  # noqa: E402
from configuration_rat import RatConfig  # noqa: E402
from modeling_rat import rat_ops, rat_triton  # noqa: E402
from modeling_rat.modeling_rat import RatMixer, RatSequenceLayout  # noqa: E402


# Shapes of the checks: the paper's layer on a GPU; tiny ones for --smoke (the interpreter runs every program in Python).
PAPER = dict(hidden_size=2048, num_heads=16, num_groups=2, chunk_size=16, rows=2, chunks=150, history=300,
             history_chunks=20, decode_batch=64, layer_tokens=2407, grid_sequences=8192, routing_tokens=8192)
TINY = dict(hidden_size=32, num_heads=2, num_groups=1, chunk_size=4, rows=2, chunks=5, history=6, history_chunks=3,
            decode_batch=3, layer_tokens=19, grid_sequences=8192, routing_tokens=32)
# max |error| / max |reference| allowed per precision (see tests/test_triton.py for where the roundings come from)
PRECISIONS = {"bfloat16": 2e-2, "float16": 1e-2, "float32": 1e-4, "float32-tf32": 1e-2}


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


# ================================================================================================= helpers


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def relative_error(got, want) -> float:
    """max |got - want| / max |want| (inf if not finite)."""
    error = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    return error / max(scale, 1e-30) if error == error else float("inf")


def dtype_of(precision: str) -> torch.dtype:
    return getattr(torch, precision.split("-")[0])


class float32_precision:
    """Context: torch.set_float32_matmul_precision for float32 precisions ("float32-tf32": "high")."""

    def __init__(self, precision: str):
        self.wanted = "high" if precision.endswith("tf32") else "highest"

    def __enter__(self):
        self.previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.wanted)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.previous)


def leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


def compare_with_gradients(name, function, reference, inputs, tolerance, checks):
    """function(*inputs) against reference(*float64 copies): output and the gradient of every input."""
    exact = [t.detach().double().requires_grad_() for t in inputs]
    out, want = function(*inputs), reference(*exact)
    weight = torch.randn_like(want)
    grads = torch.autograd.grad((out.double() * weight).sum(), inputs)
    want_grads = torch.autograd.grad((want * weight).sum(), exact)
    errors = {"output": relative_error(out, want)}
    errors.update({f"grad[{index}]": relative_error(g, w) for index, (g, w) in enumerate(zip(grads, want_grads))})
    checks[name] = dict(max_relative_error=max(errors.values()), errors=errors, tolerance=tolerance,
                        ok=max(errors.values()) <= tolerance)


# ================================================================================================ sections


def section_versions(device, shapes):
    result = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                  triton=getattr(rat_triton.triton, "__version__", None), device=str(device))
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        result.update(gpu=properties.name, capability=f"{properties.major}.{properties.minor}",
                      memory_gib=round(properties.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
        try:
            result["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True,
                timeout=30, check=True).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            result["driver"] = None
    head_dim = shapes["hidden_size"] // shapes["num_heads"]
    result["dispatch"] = {
        precision: rat_triton.triton_unavailable_reason(device, dtype_of(precision), head_dim, automatic=True)
        for precision in ("bfloat16", "float16", "float32")
    }
    begin = time.perf_counter()
    result["self_check"] = rat_triton.triton_self_check(device, torch.bfloat16, shapes["num_heads"], head_dim,
                                                       shapes["num_groups"], shapes["chunk_size"])
    result["self_check_seconds"] = round(time.perf_counter() - begin, 1)
    result["ok"] = result["self_check"] is None
    return result


def section_tests(smoke, processes, time_limit):
    """The Triton tests in `processes` pytest processes (shards of the collected tests), stopped after `time_limit` s
    (None: no limit)."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    pytest_command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_triton.py"]
    selection = ["-k", "kernels_are_usable_here"] if smoke else ["-m", "triton and not slow"]
    collected = subprocess.run(pytest_command + selection + ["--collect-only"], cwd=ROOT, env=environment,
                               capture_output=True, text=True, timeout=300)
    node_ids = [line for line in collected.stdout.splitlines() if "::" in line]
    if not node_ids:
        return dict(ok=False, error="no tests collected", output=(collected.stdout + collected.stderr)[-2000:])
    shards = [node_ids[index::processes] for index in range(min(processes, len(node_ids)))]
    logs = [tempfile.TemporaryFile(mode="w+") for _ in shards]  # files, not pipes: no process waits on a full pipe
    runs = [subprocess.Popen(pytest_command[:-1] + shard, cwd=ROOT, env=environment, stdout=log,
                             stderr=subprocess.STDOUT, text=True) for shard, log in zip(shards, logs)]
    deadline, outputs = None if time_limit is None else time.monotonic() + time_limit, []
    for run, log in zip(runs, logs):
        try:
            run.wait(timeout=None if deadline is None else max(1.0, deadline - time.monotonic()))
            stopped = ""
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
            stopped = f"\n(stopped after the section's {time_limit:.0f} s)"
        log.seek(0)
        outputs.append(log.read() + stopped)
        log.close()
    failed = [line for output in outputs for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return dict(ok=all(run.returncode == 0 for run in runs), tests=len(node_ids), processes=len(shards),
                failed=failed, output_tail=[output[-1500:] for output, run in zip(outputs, runs) if run.returncode])


def _attention_problem(shapes, dtype, device, num_chunks, num_history, generator):
    num_heads, head_dim = shapes["num_heads"], shapes["hidden_size"] // shapes["num_heads"]
    rows, chunk_size = shapes["rows"], shapes["chunk_size"]

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, device=device)).to(dtype)

    query = randn(rows, num_chunks, chunk_size, num_heads, head_dim).permute(0, 2, 3, 1, 4)  # the model's layout
    own_score = randn(rows, num_chunks, chunk_size, num_heads, scale=4.0).float().permute(0, 2, 3, 1)
    own_value = randn(rows, num_chunks, chunk_size, num_heads, head_dim).permute(0, 2, 3, 1, 4)
    keys = randn(rows, num_heads, num_history + num_chunks - 1, head_dim, scale=2.0)  # peaked softmaxes
    values = randn(rows, num_heads, num_history + num_chunks - 1, head_dim)
    counts = None
    if num_history:
        counts = torch.randint(0, num_history + 1, (rows,), generator=generator, device=device)
        counts[0] = num_history
    return leaves(query, own_score, own_value, keys, values), counts


def section_correctness(device, shapes):
    checks = {}
    hidden_size, num_heads, chunk_size = shapes["hidden_size"], shapes["num_heads"], shapes["chunk_size"]
    head_dim, key_width = hidden_size // num_heads, shapes["num_groups"] * hidden_size // num_heads
    scale = head_dim**-0.5
    for precision, tolerance in PRECISIONS.items():
        dtype = dtype_of(precision)
        generator = torch.Generator(device=device).manual_seed(0)
        with float32_precision(precision):
            grid = (shapes["rows"], shapes["chunks"], chunk_size)
            gates = torch.rand(*grid, hidden_size, generator=generator, device=device)
            value = torch.randn(*grid, hidden_size, generator=generator, device=device).to(dtype)
            key = torch.randn(*grid, key_width, generator=generator, device=device).to(dtype)
            initial = torch.randn(shapes["rows"], 2, hidden_size, generator=generator, device=device)
            compare_with_gradients(f"{precision} gated_chunk_scan", rat_triton.gated_chunk_scan,
                                   rat_ops.gated_chunk_scan, leaves(gates, value, key, initial), 1e-5 if dtype ==
                                   torch.float32 else tolerance, checks)
            for name, num_chunks, num_history in (("chunk_attention", shapes["chunks"], 0),
                                                  ("chunk_attention with history", shapes["history_chunks"],
                                                   shapes["history"])):
                inputs, counts = _attention_problem(shapes, dtype, device, num_chunks, num_history, generator)
                compare_with_gradients(
                    f"{precision} {name}", lambda *x: rat_triton.chunk_attention(*x, counts, scale),
                    lambda *x: rat_ops.chunk_attention(*x, counts, scale), inputs, tolerance, checks,
                )
            batch, capacity = shapes["decode_batch"], shapes["history"]
            decode_inputs = [torch.randn(batch, num_heads, head_dim, generator=generator, device=device).to(dtype),
                             4 * torch.randn(batch, num_heads, generator=generator, device=device),
                             torch.randn(batch, num_heads, head_dim, generator=generator, device=device).to(dtype),
                             torch.randn(batch, num_heads, capacity, head_dim, generator=generator, device=device)
                             .to(dtype),
                             torch.randn(batch, num_heads, capacity, head_dim, generator=generator, device=device)
                             .to(dtype)]
            counts = torch.randint(0, capacity + 1, (batch,), generator=generator, device=device)
            with torch.no_grad():
                got = rat_triton.decode_attention(*decode_inputs, counts, scale)
                want = rat_ops.decode_attention(*[t.double() for t in decode_inputs], counts, scale)
            error = relative_error(got, want)
            checks[f"{precision} decode_attention"] = dict(max_relative_error=error, tolerance=tolerance,
                                                          ok=error <= tolerance)
            checks[f"{precision} RAT layer"] = _layer_check(device, shapes, dtype, tolerance)
    failed = [name for name, check in checks.items() if not check["ok"]]
    return dict(ok=not failed, failed=failed, checks=checks)


def _mixer(shapes, device, dtype, seed=0):
    config = RatConfig(hidden_size=shapes["hidden_size"], num_attention_heads=shapes["num_heads"],
                       num_qk_groups=shapes["num_groups"], chunk_size=shapes["chunk_size"], num_hidden_layers=1,
                       layer_types=["rat"], vocab_size=256, initializer_range=0.02)
    torch.manual_seed(seed)
    mixer = RatMixer(config, 0)
    with torch.no_grad():
        for parameter in mixer.parameters():
            parameter.normal_(0.0, 0.02)
        mixer.forget_gate_bias.uniform_(1, max(shapes["chunk_size"] - 1, 2)).log_()
    return mixer.to(device=device, dtype=dtype)


def _run_mixer(mixer, implementation, hidden_states):
    mixer.config.rat_implementation = implementation
    batch, seq_len = hidden_states.shape[:2]
    return mixer(hidden_states, RatSequenceLayout.build(batch, seq_len, hidden_states.device), None)


def _layer_check(device, shapes, dtype, tolerance):
    """One RAT layer on the Triton path against the PyTorch path in float64: output, input and weight gradients."""
    mixer, exact = _mixer(shapes, device, dtype), _mixer(shapes, device, torch.float64)
    generator = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(2, shapes["layer_tokens"], shapes["hidden_size"], generator=generator, device=device)
    inputs, exact_inputs = leaves(hidden.to(dtype), hidden.double())
    out, want = _run_mixer(mixer, "triton", inputs), _run_mixer(exact, "fast", exact_inputs)
    weight = torch.randn_like(want)
    (out.double() * weight).sum().backward()
    (want * weight).sum().backward()
    errors = {"output": relative_error(out, want), "grad[input]": relative_error(inputs.grad, exact_inputs.grad)}
    for (name, parameter), exact_parameter in zip(mixer.named_parameters(), exact.parameters()):
        errors[f"grad[{name}]"] = relative_error(parameter.grad, exact_parameter.grad)
    # the layer adds its projections' roundings (weights and activations in the checked dtype) to the kernels'
    layer_tolerance = max(2 * tolerance, 1e-4)
    return dict(max_relative_error=max(errors.values()), errors=errors, tolerance=layer_tolerance,
                ok=max(errors.values()) <= layer_tolerance)


def section_grid(device, shapes, smoke):
    """8,192 packed sequences of two chunks x H heads: run (GPU) or, under the interpreter, launch grids checked."""
    sequences, heads, chunk_size = shapes["grid_sequences"], shapes["num_heads"], shapes["chunk_size"]
    head_dim = shapes["hidden_size"] // heads
    rows_heads = sequences * heads
    result = dict(sequences=sequences, heads=heads, rows_times_heads=rows_heads)
    if smoke:  # the interpreter would take hours: record the launches on meta tensors and check their grids
        launches = []
        with mock.patch.object(rat_triton, "_launch", lambda kernel, grid, *a, **k: launches.append((kernel.__name__, grid))):
            query = torch.empty(sequences, 2, chunk_size, heads, head_dim, device="meta").permute(0, 2, 3, 1, 4)
            own_score = torch.empty(sequences, 2, chunk_size, heads, device="meta").permute(0, 2, 3, 1)
            summaries = torch.empty(sequences, heads, 1, head_dim, device="meta")
            out, lse = rat_triton._chunk_attention_forward(query, own_score, query, summaries, summaries, None, 0.1)
            rat_triton._chunk_attention_backward(out, query, own_score, query, summaries, summaries, None, out, lse, 0.1)
        result["grids"] = {name: grid for name, grid in launches}
        result["ok"] = all(size <= limit for _, grid in launches for size, limit in zip(grid, rat_triton.CUDA_GRID_LIMITS))
        return result
    checks = {}
    problem = dict(shapes, rows=sequences)
    generator = torch.Generator(device=device).manual_seed(2)
    inputs, _ = _attention_problem(problem, torch.bfloat16, device, 2, 0, generator)
    out = rat_triton.chunk_attention(*inputs, None, head_dim**-0.5)
    grads = torch.autograd.grad(out.float().square().sum(), inputs)
    reference_inputs = [t.detach().float().requires_grad_() for t in inputs]
    want = rat_ops.chunk_attention(*reference_inputs, None, head_dim**-0.5)
    want_grads = torch.autograd.grad(want.square().sum(), reference_inputs)
    checks["output"] = relative_error(out, want)
    checks.update({f"grad[{index}]": relative_error(g, w) for index, (g, w) in enumerate(zip(grads, want_grads))})
    result.update(max_relative_error=max(checks.values()), errors=checks, ok=max(checks.values()) <= 3e-2)
    return result


def _time(function, device, repeats, warmup):
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2] * 1e3


def section_float32_routing(device, shapes, smoke):
    """A layer's forward+backward in float32: Triton with exact products, Triton with TF32, the PyTorch path."""
    mixer = _mixer(shapes, device, torch.float32)
    tokens = shapes["routing_tokens"]
    hidden = torch.randn(1, tokens, shapes["hidden_size"], device=device, requires_grad=True)

    def step(implementation):
        def run():
            mixer.zero_grad()
            hidden.grad = None
            _run_mixer(mixer, implementation, hidden).sum().backward()
        return run

    repeats, warmup = (1, 0) if smoke else (5, 2)
    times = {}
    for name, implementation, precision in (("triton_exact", "triton", "float32"),
                                            ("triton_tf32", "triton", "float32-tf32"),
                                            ("pytorch_exact", "fast", "float32"),
                                            ("pytorch_tf32", "fast", "float32-tf32")):
        with float32_precision(precision):
            times[f"{name}_ms"] = _time(step(implementation), device, repeats, warmup)
    fastest = min(times, key=times.get)
    return dict(ok=True, tokens=tokens, fastest=fastest.removesuffix("_ms"), **times)


def section_speed(output_dir, smoke, time_limit):
    """benchmarks/bench_triton.py in its own process, stopped after `time_limit` s (None: no limit); its JSON is
    included."""
    bench_dir = output_dir / "bench_triton"
    arguments = ["--output-dir", str(bench_dir)]
    if smoke:
        arguments += ["--quick", "--seq-lens", "32", "--tokens-per-batch", "64", "--hidden-size", "32", "--num-heads",
                      "2", "--decode-batch", "2", "--decode-context", "40", "--repeats", "1", "--warmup", "0"]
    else:
        arguments += ["--repeats", "3", "--warmup", "1"]
    try:
        completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_triton.py"), *arguments],
                                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                                   timeout=time_limit)
    except subprocess.TimeoutExpired as error:
        return dict(ok=False, error=f"stopped after the section's {time_limit:.0f} s",
                    output_tail=str(error.stdout or "")[-3000:])
    result = dict(ok=completed.returncode == 0, command=" ".join(["benchmarks/bench_triton.py", *arguments]))
    path = bench_dir / "bench_triton.json"
    if completed.returncode == 0 and path.is_file():
        bench = json.loads(path.read_text())
        result.update(speedups=bench["speedups"], training=bench["training"], decode=bench["decode"],
                      peak_tflops=bench["peak_tflops"], peak_bandwidth_gbs=bench["peak_bandwidth_gbs"])
    else:
        result["output_tail"] = (completed.stdout + completed.stderr)[-3000:]
    return result


# ==================================================================================================== main


# (name, estimated seconds on one H200: skipped when less time is left)
SECTIONS = [("versions", 60), ("tests", 120), ("correctness", 120), ("grid", 20), ("float32_routing", 60),
            ("speed", 120)]


def plot(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written")
        return
    figure, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    checks = report["sections"].get("correctness", {}).get("checks", {})
    if checks:
        names = list(checks)
        errors = [max(checks[name]["max_relative_error"], 1e-12) for name in names]
        colors = ["tab:green" if checks[name]["ok"] else "tab:red" for name in names]
        axes[0].barh(range(len(names)), errors, color=colors)
        axes[0].scatter([checks[name]["tolerance"] for name in names], range(len(names)), marker="|", color="black",
                        s=200, label="tolerance")
        axes[0].set_yticks(range(len(names)), names, fontsize=7)
        axes[0].set_xscale("log")
        axes[0].set_xlabel("max |error| / max |reference| (float64 reference)")
        axes[0].legend()
    training = report["sections"].get("speed", {}).get("training", [])
    if training:
        lengths = [entry["seq_len"] for entry in training]
        for key, label in (("train_rat_triton", "RAT (Triton) fwd+bwd"), ("train_attention", "attention fwd+bwd"),
                           ("prefill_rat_triton", "RAT (Triton) prefill"), ("prefill_attention", "attention prefill")):
            axes[1].plot(lengths, [entry[key]["time_ms"] for entry in training], marker="o", label=label)
        axes[1].set_xscale("log", base=2)
        axes[1].set_yscale("log")
        axes[1].set_xlabel("tokens per sequence (262,144 per batch)" if not report["smoke"] else "tokens per sequence")
        axes[1].set_ylabel("ms per layer call")
        axes[1].legend()
    figure.suptitle(f"gpu_check: {report['device']}{' (smoke run: CPU, interpreter)' if report['smoke'] else ''}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, required=True, help="folder for gpu_check.json and gpu_check.png")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under Triton's interpreter")
    parser.add_argument("--budget-s", type=float, default=480, help="skip sections that would end past this (s)")
    parser.add_argument("--test-processes", type=int, default=8, help="parallel pytest processes for the tests")
    args = parser.parse_args(argv)
    if Path(modeling_rat.__file__).resolve().parents[1] != ROOT:
        fail(f"modeling_rat is imported from {Path(modeling_rat.__file__).parent}, not from this checkout ({ROOT}): "
             f"run with PYTHONPATH={ROOT} or `pip install -e {ROOT}`")
    if args.smoke:
        device, shapes = torch.device("cpu"), TINY
    elif not torch.cuda.is_available():
        fail("no CUDA GPU here: run on a GPU machine, or use --smoke to check the script on the CPU")
    else:
        device, shapes = torch.device("cuda"), PAPER
    args.output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def time_left():  # the budget does not bind the smoke run (the interpreter is slow)
        return None if args.smoke else max(1.0, args.budget_s - (time.perf_counter() - start))

    report = dict(device=str(torch.cuda.get_device_name(device)) if device.type == "cuda" else "CPU", smoke=args.smoke,
                  budget_s=args.budget_s, sections={})
    runners = {
        "versions": lambda: section_versions(device, shapes),
        "tests": lambda: section_tests(args.smoke, args.test_processes, time_left()),
        "correctness": lambda: section_correctness(device, shapes),
        "grid": lambda: section_grid(device, PAPER, args.smoke),  # the paper's heads even in the smoke run (meta tensors)
        "float32_routing": lambda: section_float32_routing(device, shapes, args.smoke),
        "speed": lambda: section_speed(args.output, args.smoke, time_left()),
    }
    for name, estimate in SECTIONS:
        elapsed = time.perf_counter() - start
        if not args.smoke and elapsed + estimate > args.budget_s:
            report["sections"][name] = dict(ok=None, skipped=f"{elapsed:.0f} s spent, ~{estimate} s needed")
            print(f"[{name}] skipped: out of time", flush=True)
            continue
        begin = time.perf_counter()
        try:
            result = runners[name]()
        except Exception as error:  # a broken section is reported, the others still run
            result = dict(ok=False, error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc()[-4000:])
        result["seconds"] = round(time.perf_counter() - begin, 1)
        report["sections"][name] = result
        print(f"[{name}] {'ok' if result['ok'] else 'FAILED'} in {result['seconds']} s"
              + (f": {result.get('error') or result.get('failed')}" if not result["ok"] else ""), flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)
    failed = [name for name, result in report["sections"].items() if result["ok"] is False]
    report["ok"] = not failed
    (args.output / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    plot(report, args.output / "gpu_check.png")
    print(f"wrote {args.output / 'gpu_check.json'} ({report['seconds']} s)")
    speedups = report["sections"].get("speed", {}).get("speedups", {})
    for key in sorted(speedups):
        if key.startswith(("train_", "decode_")) and "attention_over_triton" in key:
            print(f"  {key}: {speedups[key]:.2f}x")
    if failed:
        fail(f"sections failed: {', '.join(failed)} (details in {args.output / 'gpu_check.json'})")
    return report


if __name__ == "__main__":
    main()
