"""
Decode benchmark: `generate()` throughput of `RatForCausalLM` against transformers' `LlamaForCausalLM` (SDPA) of the
same width, depth and heads, after prompts of several lengths, at several batch sizes, with transformers' default
dynamic cache and with the static cache (`cache_implementation="static"`; on GPUs transformers then compiles the
decoding step by default).

Greedy decoding of `new_tokens` tokens per row (no end-of-sequence token, so every row decodes them all). The decode
rate is batch * (new_tokens - 1) / (time from the end of the prefill to the end of `generate()`): the moment the
prefill's logits reach the logits processors (a `LogitsProcessor` that synchronises and reads the clock once) splits
each call into prefill and decoding. The cache size after the call (`cache_nbytes`) and the peak memory of one call
are reported too.

Checked first, for every model and cache: the logits `generate()` produced at each decoding step (a short prompt,
decoding across chunk boundaries) against the logits of one full forward pass over the generated sequence. A model
whose dynamic-cache decoding disagrees is refused; a failing or disagreeing static cache is reported as such (its
cases are not timed) without stopping the suite.
"""

import dataclasses
import logging
import statistics
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from configuration_rat import PAPER_LAYER_PATTERNS
from modeling_rat import cache_nbytes

from .common import (
    PeakMemory,
    RunOptions,
    case_cell,
    check_choices,
    check_positive,
    compare,
    dtype_tolerance,
    failure_record,
    find_case,
    finish_benchmark,
    format_bytes,
    format_length,
    format_ratio,
    length_axis,
    log_checks,
    markdown_table,
    prepare_process,
    progress,
    pyplot,
    ratio,
    require,
    run_case,
    synchronize,
)
from .model import BASELINE, ModelSettings, build_model


logger = logging.getLogger("benchmarks")

CACHES = ("dynamic", "static")


@dataclasses.dataclass
class DecodeSettings:
    hidden_size: int = 512
    num_layers: int = 2
    num_heads: int = 8
    num_qk_groups: int = 2
    chunk_size: int = 16
    vocab_size: int = 32000
    sliding_window: int = 1025
    models: tuple = ("rat", BASELINE)
    contexts: tuple = (1024, 4096, 16384)
    batches: tuple = (1, 16, 64)
    new_tokens: int = 64
    caches: tuple = CACHES
    warmup: int = 1
    repeats: int = 3
    max_seconds: float = 60.0
    check_prompt_length: int = 37
    #: decoded in the check: from position 37 to 57, across two chunk boundaries of 16
    check_new_tokens: int = 21

    def __post_init__(self):
        check_choices("caches", self.caches, CACHES)
        check_choices("models", self.models, (*PAPER_LAYER_PATTERNS, BASELINE))
        check_positive("contexts", self.contexts)
        check_positive("batches", self.batches)
        check_positive("repeats", [self.repeats])
        if self.new_tokens < 2:
            raise ValueError(
                f"`new_tokens` must be at least 2 (the rate counts the steps after the first), got {self.new_tokens}."
            )

    def model_settings(self) -> ModelSettings:
        longest = max(max(self.contexts) + self.new_tokens, self.check_prompt_length + self.check_new_tokens)
        return ModelSettings(
            hidden_size=self.hidden_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_qk_groups=self.num_qk_groups, chunk_size=self.chunk_size, vocab_size=self.vocab_size,
            sliding_window=self.sliding_window, models=self.models, lengths=(longest,),
        )


def generation_kwargs(cache: str, new_tokens: int) -> dict:
    if cache not in CACHES:
        raise ValueError(f"Unknown cache {cache!r}: choose among {CACHES}.")
    return dict(
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
        cache_implementation="static" if cache == "static" else None,
    )


def returned_cache(output):
    for field in ("cache", "past_key_values"):
        cache = getattr(output, field, None)
        if cache is not None:
            return cache
    return None


class PrefillClock(LogitsProcessor):
    """Reads the clock (after synchronising) when the prefill's logits arrive; counts the decoding steps."""

    def __init__(self, device: torch.device):
        self.device = device
        self.prefill_done = None
        self.steps = 0

    def __call__(self, input_ids, scores):
        if self.steps == 0:
            synchronize(self.device)
            self.prefill_done = time.perf_counter()
        self.steps += 1
        return scores


# ================================================================================================ correctness


def check_generate(model, label: str, cache: str, prompt_length: int, new_tokens: int, tolerance: float,
                   seed: int = 0) -> dict:
    """
    The logits `generate()` produced at each decoding step against the logits of one full forward pass (no cache)
    over the generated sequence. A `generate()` that raises is a failed check whose `detail` says what it raised.
    """
    device = next(model.parameters()).device
    vocab_size = model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, vocab_size, (2, prompt_length), generator=generator).to(device)
    try:
        with torch.no_grad():
            output = model.generate(
                prompt, **generation_kwargs(cache, new_tokens), output_logits=True, return_dict_in_generate=True
            )
            step_logits = torch.stack(output.logits, dim=1)
            full_logits = model(output.sequences[:, :-1], use_cache=False).logits[:, prompt_length - 1 :]
    except Exception as error:  # noqa: BLE001 - reported as a failed check
        record = failure_record(error)
        return {"name": label, "tolerance": tolerance, "passed": False,
                "detail": f"generate() failed: {record['error']}", "traceback": record["traceback"]}
    return compare(label, step_logits, full_logits, tolerance)


def check_decode(settings: DecodeSettings, name: str, cache: str, options: RunOptions) -> dict:
    """One model and cache as timed (device, dtype, implementation): decoding against the full forward."""
    model = build_model(settings.model_settings(), name, options.torch_device, options.torch_dtype,
                        options.rat_implementation, seed=options.seed)
    label = f"{name} generate() with the {cache} cache ({options.dtype}) vs full forward"
    check = check_generate(model, label, cache, settings.check_prompt_length, settings.check_new_tokens,
                           dtype_tolerance(options.torch_dtype), seed=options.seed)
    return {**check, "model": name, "cache": cache}


def check_all(settings: DecodeSettings, options: RunOptions) -> list[dict]:
    return [check_decode(settings, name, cache, options) for name in settings.models for cache in settings.caches]


# ================================================================================================== measuring


def measure_case(spec: dict) -> dict:
    """One configuration (runs in its own process): prefill + `new_tokens` decoding steps, timed and measured."""
    options = RunOptions(**spec["options"])
    settings = DecodeSettings(**spec["settings"])
    prepare_process(options)
    device, dtype = options.torch_device, options.torch_dtype
    model = build_model(settings.model_settings(), spec["model"], device, dtype, options.rat_implementation,
                        seed=options.seed)
    batch_size, context = spec["batch"], spec["context"]
    kwargs = generation_kwargs(spec["cache"], settings.new_tokens)

    def generate(prompt, new_tokens=settings.new_tokens, return_cache=False):
        clock = PrefillClock(device)
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                prompt, **{**kwargs, "max_new_tokens": new_tokens},
                logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=return_cache,
            )
        synchronize(device)
        end = time.perf_counter()
        sequences = output.sequences if return_cache else output
        if sequences.shape[1] - prompt.shape[1] != new_tokens or clock.steps != new_tokens:
            raise RuntimeError(
                f"generate() produced {sequences.shape[1] - prompt.shape[1]} tokens in {clock.steps} steps, expected "
                f"{new_tokens}: the rate would be wrong."
            )
        timing = {"prefill_s": clock.prefill_done - start, "decode_s": end - clock.prefill_done}
        return timing, (returned_cache(output) if return_cache else None)

    compiled = spec["cache"] == "static" and device.type in ("cuda", "xpu")
    # One tiny call first, so that one-time library set-up is not counted as the configuration's memory.
    generate(torch.randint(1, settings.vocab_size, (1, 2 * settings.chunk_size + 1), device=device), new_tokens=2)
    prompt = torch.randint(1, settings.vocab_size, (batch_size, context), device=device)
    if compiled:  # compilation for these shapes happens here, not during the measured call
        generate(prompt)
    memory = PeakMemory(device).start()
    _, cache = generate(prompt, return_cache=True)
    peak = memory.stop()
    cache_bytes = cache_nbytes(cache) if cache is not None else None
    del cache
    for _ in range(max(settings.warmup - 1, 0)):
        generate(prompt)
    runs = []
    while len(runs) < settings.repeats:
        runs.append(generate(prompt)[0])
        spent = sum(run["prefill_s"] + run["decode_s"] for run in runs)
        if spent >= settings.max_seconds and len(runs) >= min(3, settings.repeats):
            break
    decode_times = [run["decode_s"] for run in runs]
    prefill_times = [run["prefill_s"] for run in runs]
    decode_s = statistics.median(decode_times)
    return {
        "status": "ok",
        "decode_tokens_per_s": batch_size * (settings.new_tokens - 1) / decode_s,
        "decode_median_s": decode_s,
        "prefill_median_s": statistics.median(prefill_times),
        "decode_times_s": decode_times,
        "prefill_times_s": prefill_times,
        "warmup_runs": max(settings.warmup, 1) + int(compiled),
        "cache_bytes": cache_bytes,
        "peak_memory_bytes": peak,
        "memory_method": memory.method,
        "compiled_by_generate": compiled,
    }


def run(settings: DecodeSettings, options: RunOptions, output_dir=None, machine: dict | None = None) -> dict:
    """Check, then time every (context, batch, cache, model); returns the result and writes `decode.json`/`.png`."""
    logger.info("[decode] checking generate() against the full forward")
    checks = check_all(settings, options)
    log_checks(checks)
    require([check for check in checks if check["cache"] == "dynamic"], "decode benchmark")
    refused = {(check["model"], check["cache"]): check for check in checks if not check["passed"]}
    for (name, cache), check in refused.items():
        logger.warning("[decode] %s with the %s cache is not timed: %s", name, cache,
                       check.get("detail") or f"relative error {check['relative_error']:.3g}")

    cases = []
    plan = [(context, batch_size, cache, name) for context in settings.contexts for batch_size in settings.batches
            for cache in settings.caches for name in settings.models]
    for context, batch_size, cache, name in progress(plan, "decode"):
        case = {"model": name, "cache": cache, "context": context, "batch": batch_size}
        if (name, cache) in refused:
            check = refused[(name, cache)]
            reason = check.get("detail") or f"decode logits differ from the forward's by {check['relative_error']:.3g}"
            case.update(status="refused", error=f"its correctness check failed: {reason}")
        else:
            spec = {**case, "options": dataclasses.asdict(options), "settings": dataclasses.asdict(settings)}
            case.update(run_case(measure_case, spec, options))
        cases.append(case)
        logger.info("[decode] %-8s %-7s context=%-6d batch=%-3d %s", name, cache, context, batch_size, _describe(case))

    return finish_benchmark(
        "decode", "generate() decoding throughput after a prompt; greedy; tokens/s over the whole batch", options,
        settings, machine, {"checks": checks, "cases": cases, "summary": summarize(cases, settings)}, output_dir, plot,
    )


def _describe(case: dict) -> str:
    if case["status"] != "ok":
        return f"{case['status']}: {case.get('error', '')}"
    return (f"{case['decode_tokens_per_s']:,.0f} tokens/s, prefill {case['prefill_median_s']:.3g} s, "
            f"cache {format_bytes(case['cache_bytes'])}")


def summarize(cases: list[dict], settings) -> dict:
    """RAT/Llama decode-rate ratio per (cache, context, batch) for each RAT model."""
    rows = []
    for cache in settings.caches:
        for context in settings.contexts:
            for batch_size in settings.batches:
                baseline = find_case(cases, model=BASELINE, cache=cache, context=context, batch=batch_size)
                for name in settings.models:
                    if name == BASELINE:
                        continue
                    candidate = find_case(cases, model=name, cache=cache, context=context, batch=batch_size)
                    rows.append({
                        "model": name, "cache": cache, "context": context, "batch": batch_size,
                        "speed_up": ratio(candidate, baseline, "decode_tokens_per_s"),
                        "cache_ratio": ratio(baseline, candidate, "cache_bytes"),
                    })
    return {"ratios": rows}


def _rate_cell(case):
    if case is None:
        return "–"
    if case["status"] != "ok":
        return case["status"].replace("_", " ")
    return f"{case['decode_tokens_per_s']:,.0f}"


def markdown(result: dict) -> str:
    settings = result["settings"]
    cases = result["cases"]
    models = settings["models"]
    candidates = [name for name in models if name != BASELINE]
    parts = [
        f"### Decoding with generate() (D {settings['hidden_size']}, {settings['num_layers']} layers, "
        f"H {settings['num_heads']}, L {settings['chunk_size']}, vocabulary {settings['vocab_size']}, "
        f"{result['options']['dtype']}, {settings['new_tokens']} new tokens per row)",
        "",
        "Decode rate in tokens/s (whole batch, prefill excluded); speed-up is RAT / Llama (above 1: RAT is faster); "
        "cache is the size after the call (`cache_nbytes`).",
    ]
    for cache in settings["caches"]:
        compiled = any(case.get("compiled_by_generate") for case in cases if case["cache"] == cache)
        headers = ["context", "batch"] + [f"{name} tokens/s" for name in models]
        headers += [f"speed-up {name}" for name in candidates] + [f"{name} cache" for name in models]
        rows = []
        for context in settings["contexts"]:
            for batch_size in settings["batches"]:
                found = {
                    name: find_case(cases, model=name, cache=cache, context=context, batch=batch_size)
                    for name in models
                }
                row = [format_length(context), batch_size] + [_rate_cell(found[name]) for name in models]
                for name in candidates:
                    summary = find_case(result["summary"]["ratios"], model=name, cache=cache, context=context,
                                        batch=batch_size)
                    row.append(format_ratio(summary["speed_up"] if summary else None))
                row += [case_cell(found[name], "cache_bytes", format_bytes) for name in models]
                rows.append(row)
        title = f"**{cache} cache**" + (" (decoding step compiled by generate())" if compiled else "")
        parts += ["", title, "", markdown_table(headers, rows)]
    failures = [check for check in result["checks"] if not check["passed"]]
    if failures:
        parts += ["", "Not timed (correctness check failed):"]
        parts += [f"- {check['name']}: " + (check.get("detail") or f"relative error {check['relative_error']:.3g}")
                  for check in failures]
    return "\n".join(parts)


def plot(result: dict, path) -> None:
    plt = pyplot()
    settings = result["settings"]
    batches = settings["batches"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(
        1, len(batches), figsize=(5.5 * len(batches), 4.5), squeeze=False, layout="constrained"
    )
    for column, batch_size in enumerate(batches):
        axis = axes[0][column]
        for model_index, name in enumerate(settings["models"]):
            for cache in settings["caches"]:
                points = [
                    (case["context"], case["decode_tokens_per_s"]) for case in result["cases"]
                    if case["model"] == name and case["cache"] == cache and case["batch"] == batch_size
                    and case["status"] == "ok"
                ]
                if points:
                    axis.plot(*zip(*points), marker="o", linestyle="-" if cache == "dynamic" else "--",
                              color=colors[model_index % len(colors)], label=f"{name}, {cache} cache")
        length_axis(axis, "context (prompt tokens)")
        axis.set_yscale("log")
        axis.set_ylabel("decode tokens/s (whole batch)")
        axis.set_title(f"batch {batch_size}")
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            axis.legend()
    figure.suptitle(
        f"generate(), D {settings['hidden_size']}, {settings['num_layers']} layers, H {settings['num_heads']}, "
        f"{result['options']['dtype']} on {result['options']['device']}"
    )
    figure.savefig(path, dpi=120)
    plt.close(figure)

