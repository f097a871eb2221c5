"""
Machinery shared by the benchmarks: run options, machine description, timing, peak memory, isolated runs,
correctness checks and output helpers.

Methods (the same for every benchmark):

* Timing: warm-up calls, then timed calls (CUDA synchronised before and after each); the median is reported with
  every individual time. Timing stops early once `max_seconds` of timed calls are spent and at least three calls
  were timed (or all of them, if fewer were asked for); the number of timed calls is reported.
* Peak memory: every configuration runs in a fresh process, forked from a server process that has only imported
  the libraries (multiprocessing "forkserver"), so no earlier configuration leaves caches or freed-but-resident
  memory behind. The baseline is taken after the model and inputs are built and one tiny call has done the
  libraries' one-time set-up; the peak is what the first full call adds on top of it: on CPU the resident-set high-water mark (`VmHWM`, reset to the current resident size before the call
  through `/proc/self/clear_refs` on Linux; elsewhere the `ru_maxrss` increase, which can under-report), on CUDA
  `torch.cuda.max_memory_allocated`.
* Correctness: before timing anything, a benchmark runs what it compares on a short input against a reference (the
  RAT reference equations, softmax attention written out, transformers' eager attention, the full forward for
  decoding) and raises `CorrectnessError` when they disagree.
"""

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import torch


logger = logging.getLogger("benchmarks")

ROOT = Path(__file__).resolve().parents[1]

#: modules the server process of isolated runs imports once, so that each configuration starts in milliseconds
PRELOAD_MODULES = [
    "torch", "transformers", "modeling_rat",
    "benchmarks.mixer", "benchmarks.model", "benchmarks.decode", "benchmarks.cache",
]


class CorrectnessError(RuntimeError):
    """What a benchmark compares does not compute the right thing: the benchmark refuses to time it."""


# ================================================================================================ run options


@dataclasses.dataclass
class RunOptions:
    """Where and how every configuration runs (shared by all benchmarks)."""

    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    #: each configuration in a fresh process (honest peak memory, a crash or OOM stays contained)
    isolate: bool = True
    #: a configuration still running after this many seconds is stopped and reported as "timeout"
    case_timeout_s: float = 1800.0
    #: `RatConfig.rat_implementation` of the RAT layers being timed
    rat_implementation: str = "auto"
    seed: int = 0

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
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}.")
        if threads is None:
            threads = usable_cpu_count()
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}.")
        return cls(device=device, dtype=dtype, threads=int(threads), **kwargs)


def check_choices(name: str, values, allowed):
    """Raise a ValueError naming the values of `name` that are not among `allowed`."""
    unknown = [value for value in values if value not in allowed]
    if unknown or not values:
        raise ValueError(f"`{name}` must be a non-empty selection of {list(allowed)}, got {list(values)}.")


def check_positive(name: str, values):
    if not values or any(not isinstance(value, int) or value < 1 for value in values):
        raise ValueError(f"`{name}` must be positive integers, got {list(values)}.")


def usable_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prepare_process(options: RunOptions):
    """Thread count and seeds of a process that runs configurations."""
    torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)


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


def machine_info(options: RunOptions | None = None) -> dict:
    """What the figures were measured on: CPU, cores, memory, GPU, library versions, load, date."""
    import transformers

    info = {
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cpu_count(),
        "memory_bytes": _meminfo_bytes("MemTotal"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "rat_transformers_commit": _git_commit(),
        "gpu": None,
        "load_average_1min": _load_average(),
    }
    if options is not None:
        info["device"] = options.device
        info["dtype"] = options.dtype
        info["torch_threads"] = options.threads
        if options.torch_device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(options.torch_device)
            info["cuda"] = torch.version.cuda
    return info


def machine_markdown(info: dict) -> str:
    memory = f", {format_bytes(info['memory_bytes'])} RAM" if info.get("memory_bytes") else ""
    lines = [
        f"- CPU: {info['cpu']} ({info['usable_cores']} usable of {info['logical_cores']} logical cores{memory})",
        f"- GPU: {info['gpu']} (CUDA {info.get('cuda')})" if info.get("gpu") else "- GPU: none",
        f"- device {info.get('device')}, dtype {info.get('dtype')}, torch threads {info.get('torch_threads')}",
        f"- Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"rat-transformers {info['rat_transformers_commit'] or 'unknown commit'}",
        f"- {info['platform']}; 1-minute load average at start {info['load_average_1min']}; {info['date_utc']}",
    ]
    probe = info.get("memory_probe")
    if probe and probe.get("status") == "ok":
        lines.append(
            f"- peak memory by {probe['memory_method']}{'' if probe.get('isolated') else ' (in-process)'}: a "
            f"{format_bytes(probe['allocated_bytes'])} allocation reads as {format_bytes(probe['peak_memory_bytes'])}"
        )
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _meminfo_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _load_average():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        )
        return commit.stdout.strip() + ("+modified" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ====================================================================================================== timing


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(function, device: torch.device, warmup: int, repeats: int, max_seconds: float) -> dict:
    """
    Call `function` `warmup` times untimed, then up to `repeats` times timed; stop early once `max_seconds` of timed
    calls are spent and at least min(3, repeats) calls were timed. Returns the median and every time.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}.")
    for _ in range(warmup):
        function()
    synchronize(device)
    times = []
    while len(times) < repeats:
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if sum(times) >= max_seconds and len(times) >= min(3, repeats):
            break
    return {"median_s": statistics.median(times), "times_s": times, "warmup_runs": warmup}


# ================================================================================================= peak memory


class PeakMemory:
    """
    Peak memory that work done between `start()` and `stop()` adds on top of what the process holds at `start()`.
    See the module docstring for the method on each device; `method` names the one used.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.baseline = 0
        self.method = None

    def start(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_peak_rss():
            self.baseline = _status_bytes("VmRSS")
            self.method = "VmHWM (reset at start)"
        else:
            self.baseline = _max_rss_bytes()
            self.method = "ru_maxrss increase"
        return self

    def stop(self) -> int:
        synchronize(self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            peak = _status_bytes("VmHWM")
        else:
            peak = _max_rss_bytes()
        return max(0, peak - self.baseline)


def _reset_peak_rss() -> bool:
    """Reset the resident-set high-water mark to the current resident size (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return _status_bytes("VmHWM") is not None
    except OSError:
        return False


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _max_rss_bytes() -> int:
    import resource  # POSIX only

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value if sys.platform == "darwin" else value * 1024


def measure(step, device: torch.device, warmup: int, repeats: int, max_seconds: float) -> dict:
    """Peak memory of the first call of `step` (which also counts as the first warm-up), then its timing."""
    memory = PeakMemory(device).start()
    step()
    peak = memory.stop()
    timing = time_call(step, device, warmup=max(warmup - 1, 0), repeats=repeats, max_seconds=max_seconds)
    timing["warmup_runs"] += 1
    return {"status": "ok", **timing, "peak_memory_bytes": peak, "memory_method": memory.method}


def memory_probe(spec: dict) -> dict:
    """
    Allocate and fill `spec["bytes"]` bytes between the baseline and the peak reading, in a process of its own: the
    suite runs this first, so that its report shows how the peak-memory method reads a known allocation.
    """
    options = RunOptions(**spec["options"])
    prepare_process(options)
    memory = PeakMemory(options.torch_device).start()
    block = torch.ones(spec["bytes"] // 4, dtype=torch.float32, device=options.torch_device)
    peak = memory.stop()
    del block
    return {"status": "ok", "allocated_bytes": spec["bytes"], "peak_memory_bytes": peak, "memory_method": memory.method}


# ============================================================================================== isolated runs

_CONTEXT = None


def _isolation_context():
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in multiprocessing.get_all_start_methods():
            _CONTEXT = multiprocessing.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(PRELOAD_MODULES)
        else:  # Windows
            _CONTEXT = multiprocessing.get_context("spawn")
    return _CONTEXT


def _child_main(function, spec, connection):
    try:
        result = function(spec)
    except BaseException as error:  # noqa: BLE001 - everything is reported to the parent
        result = failure_record(error)
    try:
        connection.send(result)
    finally:
        connection.close()


def run_case(function, spec: dict, options: RunOptions) -> dict:
    """
    Run `function(spec)` (a module-level function returning a JSON-able dict) in a fresh process, or in this one
    when `options.isolate` is False. Errors, out-of-memory, crashes and timeouts come back as a record with a
    `status` other than "ok" and an `error` that says what happened; they never stop the suite.
    """
    if not options.isolate:
        try:
            return {**function(spec), "isolated": False}
        except Exception as error:  # noqa: BLE001
            return {**failure_record(error), "isolated": False}
        finally:
            if options.torch_device.type == "cuda":
                torch.cuda.empty_cache()
    context = _isolation_context()
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(function, spec, sender), daemon=True)
    process.start()
    sender.close()
    result = None
    try:
        if receiver.poll(options.case_timeout_s):
            try:
                result = receiver.recv()
            except EOFError:
                result = None
        else:
            process.kill()
            result = {
                "status": "timeout",
                "error": f"no result after {options.case_timeout_s:.0f} s (raise --case-timeout or use fewer lengths)",
            }
    finally:  # on an interruption (result still None) the process is stopped at once
        process.join(timeout=60 if result is not None else 1)
        if process.is_alive():
            process.kill()
            process.join()
        receiver.close()
    if result is None:
        code = process.exitcode
        if code is not None and code < 0:
            reason = f"killed by signal {-code}" + (" (most likely out of memory)" if -code == 9 else "")
        else:
            reason = f"exited with code {code} without a result"
        result = {"status": "crashed", "error": f"the benchmark process {reason}"}
    return {**result, "isolated": True}


def failure_record(error: BaseException) -> dict:
    message = f"{type(error).__name__}: {error}"
    out_of_memory_types = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), MemoryError)
    out_of_memory = isinstance(error, out_of_memory_types) or any(
        text in str(error).lower() for text in ("out of memory", "can't allocate memory", "cannot allocate memory")
    )
    return {
        "status": "out_of_memory" if out_of_memory else "failed",
        "error": message[:1000],
        "traceback": "".join(traceback.format_exception(error))[-4000:],
    }


# ============================================================================================ correctness checks


def compare(name: str, actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> dict:
    """
    One check: the largest absolute difference, relative to the largest absolute reference value, must not exceed
    `tolerance`, and `actual` must be finite and of the reference's shape.
    """
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    record = {"name": name, "tolerance": tolerance}
    if actual.shape != expected.shape:
        return {**record, "passed": False, "detail": f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"}
    if not bool(torch.isfinite(actual).all()):
        return {**record, "passed": False, "detail": "non-finite values"}
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    relative = error / max(scale, 1e-30)
    return {
        **record,
        "max_abs_error": error,
        "reference_scale": scale,
        "relative_error": relative,
        "passed": relative <= tolerance,
    }


def require(checks: list[dict], what: str):
    """Raise `CorrectnessError` naming every failed check."""
    failed = [check for check in checks if not check["passed"]]
    if failed:
        lines = [
            f"  - {check['name']}: "
            + (check.get("detail") or f"relative error {check['relative_error']:.3g} > tolerance {check['tolerance']:g}")
            for check in failed
        ]
        raise CorrectnessError(
            f"{what}: refusing to time it, {len(failed)} correctness check(s) failed:\n" + "\n".join(lines)
        )


def log_checks(checks: list[dict]):
    for check in checks:
        if "relative_error" in check:
            logger.info("  check %-60s relative error %.2e (tolerance %.0e) %s", check["name"],
                        check["relative_error"], check["tolerance"], "ok" if check["passed"] else "FAILED")
        else:
            logger.info("  check %-60s %s", check["name"], "ok" if check["passed"] else f"FAILED {check.get('detail')}")


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


def finish_benchmark(benchmark: str, description: str, options: "RunOptions", settings, machine: dict | None,
                     sections: dict, output_dir=None, plot=None) -> dict:
    """
    The result every benchmark returns: its name, description, machine, options and settings, then `sections`
    (checks, cases, summary, ...) in order; written to `<output_dir>/<benchmark>.json` and plotted to
    `<benchmark>.png` when an output folder is given.
    """
    result = {
        "benchmark": benchmark,
        "description": description,
        "machine": machine or machine_info(options),
        "options": dataclasses.asdict(options),
        "settings": dataclasses.asdict(settings),
        **sections,
    }
    if output_dir is not None:
        write_json(f"{output_dir}/{benchmark}.json", result)
        if plot is not None:
            plot(result, f"{output_dir}/{benchmark}.png")
    return result


def describe_timing(case: dict) -> str:
    """One log line's worth of a timed case: its median and peak memory, or why it has none."""
    if case["status"] != "ok":
        return f"{case['status']}: {case.get('error', '')}"
    return f"median {format_seconds(case['median_s'])}, peak memory {format_bytes(case['peak_memory_bytes'])}"


def write_json(path: Path, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_ready(data), indent=2, allow_nan=False) + "\n")
    return path


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
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if largest >= size:
            return unit, size
    return "B", 1


def plot_length_sweep(result: dict, path, series_field: str, series: dict, mode_labels: dict, title: str) -> None:
    """
    Time (top row) and peak memory (bottom row) against the sequence length, log-log, one column per mode and one
    line per series (`series`: value of `case[series_field]` -> legend label). Failed cases are left out.
    """
    plt = pyplot()
    settings = result["settings"]
    modes = settings["modes"]
    memories = [case["peak_memory_bytes"] for case in result["cases"] if case["status"] == "ok"]
    unit, unit_size = byte_unit(max(memories, default=1))
    figure, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False, layout="constrained")
    rows = [("median_s", "time per batch (s)", 1), ("peak_memory_bytes", f"peak memory ({unit})", unit_size)]
    for column, mode in enumerate(modes):
        for row, (key, label, scale) in enumerate(rows):
            axis = axes[row][column]
            for name, legend in series.items():
                points = [
                    (case["seq_len"], case[key] / scale) for case in result["cases"]
                    if case[series_field] == name and case["mode"] == mode and case["status"] == "ok" and case.get(key)
                ]
                if points:
                    axis.plot(*zip(*points), marker="o", label=legend)
            length_axis(axis, "sequence length T")
            axis.set_yscale("log")
            axis.set_ylabel(label)
            axis.set_title(f"{mode_labels[mode]}, {settings['tokens_per_batch']:,} tokens per batch")
            axis.grid(True, which="both", alpha=0.3)
            if axis.lines:
                axis.legend()
    figure.suptitle(f"{title}, {result['options']['dtype']} on {result['options']['device']}")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def format_bytes(size: float | None) -> str:
    if size is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def format_count(count: int) -> str:
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= divisor:
            return f"{count / divisor:.3g}{suffix}"
    return str(count)


def format_length(tokens: int) -> str:
    if tokens >= 1024 and tokens % 1024 == 0:
        return f"{tokens // 1024}K"
    return str(tokens)


def format_ratio(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio:.2f}×"


def case_cell(case: dict | None, key: str, formatter) -> str:
    """A table cell: the formatted value of an "ok" case, else its status."""
    if case is None:
        return "–"
    if case.get("status") != "ok":
        return case.get("status", "failed").replace("_", " ")
    return formatter(case.get(key))


def ratio(numerator: dict | None, denominator: dict | None, key: str) -> float | None:
    """numerator[key] / denominator[key] when both cases are "ok" and the denominator is positive."""
    if not numerator or not denominator or numerator.get("status") != "ok" or denominator.get("status") != "ok":
        return None
    top, bottom = numerator.get(key), denominator.get(key)
    if top is None or not bottom:
        return None
    return top / bottom


def find_case(cases, **keys):
    for case in cases:
        if all(case.get(key) == value for key, value in keys.items()):
            return case
    return None


def break_even(lengths: list[int], ratios: list[float | None]) -> dict:
    """
    The length from which RAT is faster (attention time / RAT time >= 1) at every longer measured length,
    interpolated linearly in log(length)-log(ratio) between the two measured lengths around the crossing.
    """
    points = [(length, value) for length, value in zip(lengths, ratios) if value is not None and value > 0]
    if not points:
        return {"status": "unknown", "length": None, "text": "no successful pair of measurements"}
    first_faster = len(points)
    while first_faster > 0 and points[first_faster - 1][1] >= 1:
        first_faster -= 1
    if first_faster == len(points):
        if any(value >= 1 for _, value in points):
            return {"status": "not_sustained", "length": None,
                    "text": f"RAT is faster at some lengths but not at the longest ({format_length(points[-1][0])})"}
        return {"status": "not_reached", "length": None,
                "text": f"attention is faster at every measured length (up to {format_length(points[-1][0])})"}
    if first_faster == 0:
        return {"status": "below_range", "length": None,
                "text": f"RAT is faster at every measured length (from {format_length(points[0][0])})"}
    (short, short_ratio), (long, long_ratio) = points[first_faster - 1], points[first_faster]
    fraction = -math.log(short_ratio) / (math.log(long_ratio) - math.log(short_ratio))
    length = math.exp(math.log(short) + fraction * (math.log(long) - math.log(short)))
    return {"status": "crossed", "length": round(length), "between": [short, long],
            "text": f"about {round(length):,} tokens (between {format_length(short)} and {format_length(long)})"}


def progress(iterable, description: str, total: int | None = None):
    """A tqdm progress bar on stderr (plain iteration if tqdm is missing)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=description, total=total, leave=False, dynamic_ncols=True)
