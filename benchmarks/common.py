"""
What every benchmark shares: run options, the machine description, the correctness checks that come before any
timing, timing and peak memory of one configuration in a process of its own, and the output (JSON, tables, plots).

* Timing: `torch.utils.benchmark.Timer.adaptive_autorange` on CPU (with `--threads` torch threads): it warms up
  while choosing how many calls one timed block holds, then times blocks until their spread (interquartile range)
  is under 10 % of the median or `max_run_time` seconds are spent; on CUDA `triton.testing.do_bench` (CUDA events,
  L2 cache flushed between calls, `max_run_time` of timed calls; without Triton the same Timer, which synchronises
  the GPU). The median time per call is reported, with every block's time per call in the JSON.
* Peak memory: what the first full call adds on top of what the process held before it (the model and inputs
  built, one tiny call having set up the libraries), counted at the allocator: on CUDA
  `torch.cuda.max_memory_allocated`; on CPU the running total of the bytes the CPU allocator has handed out and
  not yet taken back, as `torch.profiler` (with `profile_memory=True`) records it at every allocation and free.
  Both are exact and repeatable. On CPU the resident-set high-water mark (`VmHWM`, reset through
  `/proc/self/clear_refs`) is recorded beside it as `resident_peak_bytes`: what the process cost the machine,
  which also counts memory the C library keeps after a free, so it varies by a few tens of MiB from run to run.
* Isolation: every configuration runs in a fresh process, forked from a server process that has only imported the
  libraries (multiprocessing's "forkserver"), so that no earlier configuration leaves memory behind and a crash,
  an out-of-memory kill or a time-out is reported in its table cell instead of stopping the suite.
"""

import dataclasses
import importlib.util
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.benchmark import Timer
from tqdm.auto import tqdm


logger = logging.getLogger("benchmarks")

ROOT = Path(__file__).resolve().parents[1]
#: where the published figures live (the targets run in its `targets/` folder)
RESULTS = ROOT / "results" / "benchmarks"


class CorrectnessError(RuntimeError):
    """What a benchmark compares does not compute the right thing: the benchmark refuses to time it."""


# ================================================================================================ run options


@dataclasses.dataclass
class RunOptions:
    """Where and how every configuration runs (shared by all benchmarks)."""

    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    #: seconds of timed calls per measurement at most (the timer stops earlier once its blocks agree)
    max_run_time: float = 30.0
    #: each configuration in a fresh process (honest peak memory; a crash or out-of-memory stays contained)
    isolate: bool = True
    #: a configuration still running after this many seconds is stopped and reported as "timeout"
    case_timeout_s: float = 1800.0
    #: `RatConfig.rat_implementation` of the RAT layers being timed
    rat_implementation: str = "auto"
    seed: int = 0

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}.")
        if self.threads < 1 or self.max_run_time <= 0:
            raise ValueError(f"threads must be at least 1 and max_run_time positive, got {self.threads}, "
                             f"{self.max_run_time}.")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def resolve(cls, device="auto", dtype="auto", threads=None, **kwargs) -> "RunOptions":
        """`device="auto"`: CUDA when available, else CPU. `dtype="auto"`: bfloat16 on GPU, float32 on CPU."""
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device} was asked for but CUDA is not available: use --device cpu.")
        if dtype == "auto":
            dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
        return cls(device=device, dtype=dtype, threads=threads or usable_cpu_count(), **kwargs)


def check_settings(name: str, values, allowed=None):
    """Raise a ValueError unless `values` is a non-empty selection of `allowed` (or, without it, positive integers)."""
    valid = all(value in allowed if allowed else isinstance(value, int) and value > 0 for value in values)
    if not values or not valid:
        wanted = f"a non-empty selection of {list(allowed)}" if allowed else "positive integers"
        raise ValueError(f"`{name}` must be {wanted}, got {list(values)}.")


def usable_cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def dtype_tolerance(dtype: torch.dtype, gradient: bool = False) -> float:
    """
    Largest error, relative to the largest reference value, that a check accepts. In float32 the fast paths agree
    with their references to about 1e-6 (summation order only). A path run in bfloat16 (8 bits of mantissa) against
    a float32 reference is off by about 5e-3 after one mixer and 1e-2 in the logits of an 8-layer model; gradients,
    which go back through every layer's rounded activations, by up to 3.5e-2 (measured on the model benchmark's
    8-layer models). A layout or logic error moves results by their own magnitude (relative error of order 1),
    which every tolerance here catches; in bfloat16 the checks cannot see errors of a few percent.
    """
    if dtype == torch.float32:
        return 1e-4
    return 1e-1 if gradient else 5e-2


# ========================================================================================== machine description


def machine_info(options: RunOptions) -> dict:
    """What the figures were measured on: CPU, cores, memory, GPU, library versions, load, date."""
    import psutil
    import transformers

    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rat_transformers_commit": _git_commit(),
        "load_average_1min": round(psutil.getloadavg()[0], 2),
        "device": options.device,
        "dtype": options.dtype,
        "torch_threads": options.threads,
        "gpu": torch.cuda.get_device_name(options.torch_device) if options.torch_device.type == "cuda" else None,
        "cuda": torch.version.cuda,
    }
    return info


def machine_markdown(info: dict) -> str:
    lines = [
        f"- CPU: {info['cpu']} ({info['usable_cores']} usable of {info['logical_cores']} logical cores, "
        f"{format_bytes(info['memory_bytes'])} RAM)",
        f"- GPU: {info['gpu']} (CUDA {info['cuda']})" if info["gpu"] else "- GPU: none",
        f"- device {info['device']}, dtype {info['dtype']}, torch threads {info['torch_threads']}",
        f"- Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"rat-transformers {info['rat_transformers_commit'] or 'unknown commit'}",
        f"- {info['platform']}; 1-minute load average at start {info['load_average_1min']}; {info['date_utc']}",
    ]
    probe = info.get("memory_probe")
    if probe and probe["status"] == "ok":
        lines.append(f"- peak memory by {probe['memory_method']}: a {format_bytes(probe['allocated_bytes'])} "
                     f"allocation reads as {format_bytes(probe['peak_memory_bytes'])}")
    return "\n".join(lines)


def _cpu_model() -> str:
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The checkout's short commit, with "+modified" when tracked files differ from it."""
    command = ["git", "-C", str(ROOT), "describe", "--always", "--dirty=+modified"]
    try:
        described = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return described.stdout.strip() if described.returncode == 0 else None


# ============================================================================================ correctness checks


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> dict:
    """
    One check: the largest absolute difference, relative to the largest absolute reference value, must not exceed
    `tolerance`, and `actual` must be finite and of the reference's shape.
    """
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    record = {"name": name, "tolerance": tolerance}
    if actual.shape != expected.shape:
        return {**record, "passed": False, "detail": f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"}
    if not bool(torch.isfinite(actual).all()):
        return {**record, "passed": False, "detail": "non-finite values"}
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    relative = error / max(scale, 1e-30)
    return {**record, "max_abs_error": error, "reference_scale": scale, "relative_error": relative,
            "passed": relative <= tolerance}


def describe_check(check: dict) -> str:
    if "relative_error" in check:
        verdict = "ok" if check["passed"] else "FAILED"
        return f"relative error {check['relative_error']:.2e} (tolerance {check['tolerance']:.0e}) {verdict}"
    return "ok" if check["passed"] else f"FAILED: {check.get('detail')}"


def verify(benchmark: str, checks: list[dict], required=None) -> list[dict]:
    """Log every check; raise `CorrectnessError` naming the failed ones among `required` (default: all)."""
    for check in checks:
        logger.info("[%s] check %-60s %s", benchmark, check["name"], describe_check(check))
    failed = [check for check in (checks if required is None else required) if not check["passed"]]
    if failed:
        lines = "\n".join(f"  - {check['name']}: {describe_check(check)}" for check in failed)
        raise CorrectnessError(f"{benchmark} benchmark: refusing to time it, {len(failed)} correctness check(s) "
                               f"failed:\n{lines}")
    return checks


# ============================================================================================ timing and memory


def time_call(function, options: RunOptions) -> dict:
    """Median seconds per call of `function()` and every timed block's seconds per call (see the module docstring)."""
    if options.torch_device.type == "cuda" and importlib.util.find_spec("triton"):
        from triton.testing import do_bench

        times = [ms / 1e3 for ms in do_bench(function, rep=1e3 * options.max_run_time, return_mode="all")]
        return {"median_s": statistics.median(times), "times_s": times, "timer": "triton.testing.do_bench"}
    timer = Timer("function()", globals={"function": function}, num_threads=options.threads)
    measurement = timer.adaptive_autorange(max_run_time=options.max_run_time)
    return {"median_s": measurement.median, "times_s": measurement.times, "calls_per_block": measurement.number_per_run,
            "timer": "torch.utils.benchmark.Timer.adaptive_autorange"}


class PeakMemory:
    """Peak memory that the work between `start()` and `stop()` adds to what the process holds at `start()`."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.resident_peak = self.resident_method = None  # CPU only

    def start(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method, self.baseline = "torch.cuda.max_memory_allocated", torch.cuda.memory_allocated(self.device)
        else:
            self.method = "CPU allocator total (torch.profiler)"
            self.resident_method = "VmHWM (reset at start)" if _reset_resident_peak() else "ru_maxrss increase"
            self._resident_baseline = _resident_peak_bytes()
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
            self._profiler.__enter__()
        return self

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        self._profiler.__exit__(None, None, None)
        self.resident_peak = max(0, _resident_peak_bytes() - self._resident_baseline)
        return _profiled_allocation_peak(self._profiler)


def _profiled_allocation_peak(profiler) -> int:
    """
    The highest count of live bytes allocated while `profiler` ran: the "Total Allocated" field of its memory events
    (the profiler counts only allocations made while it records, minus their frees), read from its Chrome trace.
    """
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [event["args"]["Total Allocated"] for event in events if event.get("name") == "[memory]"]
    return max(totals, default=0)


def _reset_resident_peak() -> bool:
    """Set the resident-set high-water mark to the current resident size (Linux 4.0 and later)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _resident_peak_bytes() -> int:
    """The process's resident-set high-water mark: `VmHWM` on Linux, `ru_maxrss` elsewhere."""
    if Path("/proc/self/status").exists():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_record(memory: PeakMemory, peak: int) -> dict:
    """The peak-memory fields of a result: the peak, its method and, on CPU, the resident-set peak beside it."""
    record = {"peak_memory_bytes": peak, "memory_method": memory.method}
    if memory.resident_peak is not None:
        record.update(resident_peak_bytes=memory.resident_peak, resident_method=memory.resident_method)
    return record


def measure(step, options: RunOptions) -> dict:
    """Peak memory of the first call of `step`, then its timing."""
    memory = PeakMemory(options.torch_device).start()
    step()
    peak = memory.stop()
    return {"status": "ok", **time_call(step, options), **memory_record(memory, peak)}


def memory_probe(case: dict, settings, options: RunOptions) -> dict:
    """How the peak-memory method reads a known allocation (`case["bytes"]`), measured as a configuration is."""
    memory = PeakMemory(options.torch_device).start()
    block = torch.ones(case["bytes"] // 4, dtype=torch.float32, device=options.torch_device)
    peak = memory.stop()
    del block
    return {"status": "ok", "allocated_bytes": case["bytes"], **memory_record(memory, peak)}


# ================================================================================================== isolation

#: what the server process of isolated runs imports once, so that each configuration starts in milliseconds
PRELOAD_MODULES = ["benchmarks.mixer", "benchmarks.model", "benchmarks.decode", "benchmarks.cache"]


def _in_this_process(function, case: dict, settings, options: RunOptions) -> dict:
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    try:
        return function(case, settings, options)
    except Exception as error:  # noqa: BLE001 - reported in the configuration's table cell
        return failure_record(error)


def _child(function, case, settings, options, connection):
    connection.send(_in_this_process(function, case, settings, options))
    connection.close()


def run_case(function, case: dict, settings, options: RunOptions) -> dict:
    """
    `function(case, settings, options)` (a module-level function returning a JSON-able dict) in a fresh process, or
    in this one when `options.isolate` is False. Errors, out-of-memory, crashes and time-outs come back as a record
    whose `status` is not "ok" and whose `error` says what happened.
    """
    if not options.isolate:
        return {**_in_this_process(function, case, settings, options), "isolated": False}
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD_MODULES)
    else:  # Windows
        context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(function, case, settings, options, sender), daemon=True)
    process.start()
    sender.close()
    result = None
    try:
        if receiver.poll(options.case_timeout_s):
            result = receiver.recv()
        else:
            process.kill()
            result = {"status": "timeout", "error": f"no result after {options.case_timeout_s:.0f} s "
                                                    "(raise --case-timeout or use fewer lengths)"}
    except EOFError:  # the process ended without a result
        pass
    finally:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
            process.join()
        receiver.close()
    if result is None:
        code = process.exitcode
        reason = f"exited with code {code} without a result"
        if code is not None and code < 0:
            reason = f"was killed by signal {-code}" + (" (most likely out of memory)" if code == -9 else "")
        result = {"status": "crashed", "error": f"the benchmark process {reason}"}
    return {**result, "isolated": True}


def failure_record(error: BaseException) -> dict:
    message = f"{type(error).__name__}: {error}"
    out_of_memory = isinstance(error, (torch.OutOfMemoryError, MemoryError)) or any(
        text in str(error).lower() for text in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )
    return {"status": "out_of_memory" if out_of_memory else "failed", "error": message[:1000],
            "traceback": "".join(traceback.format_exception(error))[-4000:]}


def run_cases(benchmark: str, function, plan: list[dict], settings, options: RunOptions) -> list[dict]:
    """Every case of `plan` measured by `function` in a process of its own, one log line each."""
    cases = []
    for case in tqdm(plan, desc=benchmark, leave=False, dynamic_ncols=True):
        cases.append({**case, **run_case(function, case, settings, options)})
        labels = " ".join(f"{key}={value}" for key, value in case.items())
        logger.info("[%s] %-50s %s", benchmark, labels, describe_case(cases[-1]))
    return cases


def describe_case(case: dict) -> str:
    """One log line's worth of a measured case: its figures, or why it has none."""
    if case["status"] != "ok":
        return f"{case['status']}: {case.get('error', '')}"
    figures = [("median_s", "median", format_seconds), ("decode_tokens_per_s", "decode", format_rate),
               ("peak_memory_bytes", "peak memory", format_bytes), ("cache_bytes", "cache", format_bytes)]
    return ", ".join(f"{label} {formatter(case[key])}" for key, label, formatter in figures if key in case) or "ok"


# ====================================================================================================== output


def json_ready(value):
    """Replace non-finite floats by None (strict JSON) and tuples by lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    return value


def write_json(path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")
    return path


def finish_benchmark(benchmark: str, description: str, options: RunOptions, settings, machine: dict | None,
                     sections: dict, output_dir=None, plot=None) -> dict:
    """
    The result every benchmark returns: its name, description, machine, options and settings, then `sections`
    (checks, cases, summary, ...); written to `<output_dir>/<benchmark>.json` and plotted to `<benchmark>.png`.
    """
    result = {"benchmark": benchmark, "description": description, "machine": machine or machine_info(options),
              "options": dataclasses.asdict(options), "settings": dataclasses.asdict(settings), **sections}
    if output_dir is not None:
        write_json(Path(output_dir) / f"{benchmark}.json", result)
        if plot is not None:
            plot(result, Path(output_dir) / f"{benchmark}.png")
    return json_ready(result)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:,.0f} tokens/s"


def format_length(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens >= 1024 and tokens % 1024 == 0 else str(tokens)


def format_ratio(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def case_cell(case: dict | None, key: str, formatter) -> str:
    """A table cell: the formatted value of an "ok" case, else its status."""
    if case is None:
        return "–"
    return formatter(case[key]) if case["status"] == "ok" else case["status"].replace("_", " ")


def ratio(numerator: dict | None, denominator: dict | None, key: str) -> float | None:
    """numerator[key] / denominator[key] when both cases are "ok" and the denominator is positive."""
    if not numerator or not denominator or numerator["status"] != "ok" or denominator["status"] != "ok":
        return None
    top, bottom = numerator.get(key), denominator.get(key)
    return top / bottom if top is not None and bottom else None


def find_case(cases, **keys):
    return next((case for case in cases if all(case.get(key) == value for key, value in keys.items())), None)


# ======================================================================================================= plots


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def length_axis(axis, label: str):
    """Log-2 x axis of token counts, labelled 1K, 2K, ..."""
    from matplotlib.ticker import FuncFormatter

    axis.set_xscale("log", base=2)
    axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format_length(int(round(value)))))
    axis.set_xlabel(label)


def byte_unit(largest: float) -> tuple[str, int]:
    """The unit (B, KiB, MiB, GiB) to plot byte counts whose largest value is `largest`, and its size."""
    return next(((unit, size) for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)) if largest >= size),
                ("B", 1))
