"""
Decode benchmark: `generate()` throughput of `RatForCausalLM` against transformers' `LlamaForCausalLM` (SDPA) of the
same width, depth and heads, after prompts of several lengths, at several batch sizes, with transformers' default
dynamic cache and with the static cache (`cache_implementation="static"`; on GPUs transformers then compiles the
decoding step).

Greedy decoding of `new_tokens` tokens per row (no end-of-sequence token, so every row decodes them all). The
decode rate is batch * (new_tokens - 1) / (time of `generate()` for `new_tokens` tokens - time of `generate()` for
one token, the prefill), both timed in the same process. The cache size after the call (`cache_nbytes`) and the
peak memory of one call are reported too.

Checked first, for every model and cache: the logits `generate()` produced at each decoding step (a short prompt,
decoding across chunk boundaries) against the logits of one full forward pass over the generated sequence. A model
whose dynamic-cache decoding disagrees is refused; a failing or disagreeing static cache is reported as such (its
cases are not timed) without stopping the suite.
"""

import dataclasses

import torch

from configuration_rat import PAPER_LAYER_PATTERNS
from modeling_rat import cache_nbytes

from .common import (
    PeakMemory,
    RunOptions,
    case_cell,
    check_settings,
    compare,
    describe_check,
    dtype_tolerance,
    failure_record,
    find_case,
    finish_benchmark,
    format_bytes,
    format_length,
    format_ratio,
    length_axis,
    markdown_table,
    memory_record,
    pyplot,
    ratio,
    run_cases,
    time_call,
    verify,
)
from .model import BASELINE, Architecture, build_model


CACHES = ("dynamic", "static")


@dataclasses.dataclass
class DecodeSettings:
    architecture: Architecture = dataclasses.field(default_factory=lambda: Architecture(num_layers=2))
    models: tuple = ("rat", BASELINE)
    contexts: tuple = (1024, 4096, 16384)
    batches: tuple = (1, 16, 64)
    new_tokens: int = 64
    caches: tuple = CACHES
    check_prompt_length: int = 37
    #: decoded in the check: from position 37 to 57, across two chunk boundaries of 16
    check_new_tokens: int = 21

    def __post_init__(self):
        check_settings("caches", self.caches, CACHES)
        check_settings("models", self.models, (*PAPER_LAYER_PATTERNS, BASELINE))
        check_settings("contexts", self.contexts)
        check_settings("batches", self.batches)
        if self.new_tokens < 2:
            raise ValueError(
                f"`new_tokens` must be at least 2 (the rate counts the steps after the first), got {self.new_tokens}."
            )

    def build(self, name: str, options: RunOptions):
        """The model `name` as timed: the run's device, dtype and RAT implementation."""
        longest = max(max(self.contexts) + self.new_tokens, self.check_prompt_length + self.check_new_tokens)
        return build_model(self.architecture, name, options, longest)


def generate(model, prompt: torch.Tensor, cache: str, new_tokens: int, **kwargs):
    """Greedy `generate()` of exactly `new_tokens` tokens per row with the dynamic or the static cache."""
    if cache not in CACHES:
        raise ValueError(f"Unknown cache {cache!r}: choose among {CACHES}.")
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                              cache_implementation="static" if cache == "static" else None, **kwargs)


def returned_cache(output):
    """The cache of a forward or `generate()` output (transformers 5.24 renamed `past_key_values` to `cache`)."""
    return next((getattr(output, field) for field in ("cache", "past_key_values")
                 if getattr(output, field, None) is not None), None)


# ================================================================================================ correctness


def check_generate(model, label: str, cache: str, prompt_length: int, new_tokens: int, tolerance: float,
                   seed: int = 0) -> dict:
    """
    The logits `generate()` produced at each decoding step against the logits of one full forward pass (no cache)
    over the generated sequence. A `generate()` that raises is a failed check whose `detail` says what it raised.
    """
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, model.config.vocab_size, (2, prompt_length), generator=generator).to(model.device)
    try:
        output = generate(model, prompt, cache, new_tokens, output_logits=True, return_dict_in_generate=True)
        with torch.no_grad():
            full_logits = model(output.sequences[:, :-1], use_cache=False).logits[:, prompt_length - 1 :]
    except Exception as error:  # noqa: BLE001 - reported as a failed check
        record = failure_record(error)
        return {"name": label, "tolerance": tolerance, "passed": False,
                "detail": f"generate() failed: {record['error']}", "traceback": record["traceback"]}
    return compare(label, torch.stack(output.logits, dim=1), full_logits, tolerance)


def check_decoding(settings: DecodeSettings, options: RunOptions) -> list[dict]:
    """Every model and cache as timed (device, dtype, implementation): decoding against the full forward."""
    checks = []
    for name in settings.models:
        model = settings.build(name, options)
        for cache in settings.caches:
            label = f"{name} generate() with the {cache} cache ({options.dtype}) vs full forward"
            check = check_generate(model, label, cache, settings.check_prompt_length, settings.check_new_tokens,
                                   dtype_tolerance(options.torch_dtype), seed=options.seed)
            checks.append({**check, "model": name, "cache": cache})
    return checks


# ================================================================================================== measuring


def measure_case(case: dict, settings: DecodeSettings, options: RunOptions) -> dict:
    """One configuration (in its own process): peak memory and cache size of one call, then the two timings."""
    model, device, new_tokens = settings.build(case["model"], options), options.torch_device, settings.new_tokens
    vocab_size, chunk_size = settings.architecture.vocab_size, settings.architecture.chunk_size
    # One tiny call first, so that one-time library set-up is not counted as the configuration's memory.
    generate(model, torch.randint(1, vocab_size, (1, 2 * chunk_size + 1), device=device), case["cache"], 2)
    prompt = torch.randint(1, vocab_size, (case["batch"], case["context"]), device=device)
    compiled = case["cache"] == "static" and device.type in ("cuda", "xpu")
    if compiled:  # compilation for these shapes happens here, not during the measured call
        generate(model, prompt, case["cache"], new_tokens)
    memory = PeakMemory(device).start()
    output = generate(model, prompt, case["cache"], new_tokens, return_dict_in_generate=True)
    peak = memory.stop()
    if output.sequences.shape[1] - prompt.shape[1] != new_tokens:
        raise RuntimeError(f"generate() produced {output.sequences.shape[1] - prompt.shape[1]} tokens, expected "
                           f"{new_tokens}: the rate would be wrong.")
    cache_bytes = cache_nbytes(returned_cache(output))
    del output
    whole = time_call(lambda: generate(model, prompt, case["cache"], new_tokens), options)
    prefill = time_call(lambda: generate(model, prompt, case["cache"], 1), options)
    decode_s = whole["median_s"] - prefill["median_s"]
    if decode_s <= 0:
        raise RuntimeError(f"generate() of {new_tokens} tokens took no longer than of one ({whole['median_s']:.3g} s "
                           f"against {prefill['median_s']:.3g} s): decode more tokens to measure a rate.")
    return {
        "status": "ok",
        "decode_tokens_per_s": case["batch"] * (new_tokens - 1) / decode_s,
        "decode_s": decode_s,
        "generate_median_s": whole["median_s"],
        "prefill_median_s": prefill["median_s"],
        "generate_times_s": whole["times_s"],
        "prefill_times_s": prefill["times_s"],
        "cache_bytes": cache_bytes,
        **memory_record(memory, peak),
        "compiled_by_generate": compiled,
    }


def run(settings: DecodeSettings, options: RunOptions, output_dir=None, machine: dict | None = None) -> dict:
    """Check, then time every (context, batch, cache, model); returns the result and writes `decode.json`/`.png`."""
    checks = check_decoding(settings, options)
    verify("decode", checks, required=[check for check in checks if check["cache"] == "dynamic"])
    refused = {(check["model"], check["cache"]): check for check in checks if not check["passed"]}
    plan = [{"model": name, "cache": cache, "context": context, "batch": batch_size}
            for context in settings.contexts for batch_size in settings.batches
            for cache in settings.caches for name in settings.models]
    timed = [case for case in plan if (case["model"], case["cache"]) not in refused]
    cases = run_cases("decode", measure_case, timed, settings, options) + [
        {**case, "status": "refused", "error": "its correctness check failed: "
                                               + describe_check(refused[(case["model"], case["cache"])])}
        for case in plan if case not in timed
    ]
    return finish_benchmark(
        "decode", "generate() decoding throughput after a prompt; greedy; tokens/s over the whole batch", options,
        settings, machine, {"checks": checks, "cases": cases, "summary": summarize(cases, settings)}, output_dir, plot,
    )


def summarize(cases: list[dict], settings: DecodeSettings) -> dict:
    """RAT / Llama decode rate and Llama / RAT cache size per (cache, context, batch) for each RAT model."""
    rows = []
    for cache in settings.caches:
        for context in settings.contexts:
            for batch_size in settings.batches:
                where = {"cache": cache, "context": context, "batch": batch_size}
                baseline = find_case(cases, model=BASELINE, **where)
                for name in settings.models:
                    if name != BASELINE:
                        candidate = find_case(cases, model=name, **where)
                        rows.append({"model": name, **where,
                                     "speed_up": ratio(candidate, baseline, "decode_tokens_per_s"),
                                     "cache_ratio": ratio(baseline, candidate, "cache_bytes")})
    return {"ratios": rows}


def markdown(result: dict) -> str:
    settings, arch, cases = result["settings"], result["settings"]["architecture"], result["cases"]
    models = settings["models"]
    candidates = [name for name in models if name != BASELINE]
    parts = [
        f"### Decoding with generate() (D {arch['hidden_size']}, {arch['num_layers']} layers, H {arch['num_heads']}, "
        f"L {arch['chunk_size']}, vocabulary {arch['vocab_size']}, {result['options']['dtype']}, "
        f"{settings['new_tokens']} new tokens per row)",
        "",
        "Decode rate in tokens/s (whole batch, prefill excluded); speed-up is RAT / Llama (above 1: RAT is faster); "
        "cache is the size after the call (`cache_nbytes`).",
    ]
    for cache in settings["caches"]:
        headers = ["context", "batch", *(f"{name} tokens/s" for name in models),
                   *(f"speed-up {name}" for name in candidates), *(f"{name} cache" for name in models)]
        rows = []
        for context in settings["contexts"]:
            for batch_size in settings["batches"]:
                where = {"cache": cache, "context": context, "batch": batch_size}
                found = [find_case(cases, model=name, **where) for name in models]
                speed_ups = [find_case(result["summary"]["ratios"], model=name, **where) for name in candidates]
                rows.append([format_length(context), batch_size,
                             *(case_cell(case, "decode_tokens_per_s", "{:,.0f}".format) for case in found),
                             *(format_ratio(row["speed_up"] if row else None) for row in speed_ups),
                             *(case_cell(case, "cache_bytes", format_bytes) for case in found)])
        compiled = any(case.get("compiled_by_generate") for case in cases if case["cache"] == cache)
        title = f"**{cache} cache**" + (" (decoding step compiled by generate())" if compiled else "")
        parts += ["", title, "", markdown_table(headers, rows)]
    failures = [check for check in result["checks"] if not check["passed"]]
    if failures:
        parts += ["", "Not timed (correctness check failed):"]
        parts += [f"- {check['name']}: {describe_check(check)}" for check in failures]
    return "\n".join(parts)


def plot(result: dict, path) -> None:
    plt = pyplot()
    settings = result["settings"]
    batches = settings["batches"]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    figure, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.5), squeeze=False,
                                layout="constrained")
    for axis, batch_size in zip(axes[0], batches):
        for color, name in zip(colors, settings["models"]):
            for cache in settings["caches"]:
                points = [(case["context"], case["decode_tokens_per_s"]) for case in result["cases"]
                          if case["status"] == "ok" and case["model"] == name and case["cache"] == cache
                          and case["batch"] == batch_size]
                if points:
                    axis.plot(*zip(*points), marker="o", linestyle="-" if cache == "dynamic" else "--", color=color,
                              label=f"{name}, {cache} cache")
        length_axis(axis, "context (prompt tokens)")
        axis.set(yscale="log", ylabel="decode tokens/s (whole batch)", title=f"batch {batch_size}")
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            axis.legend()
    arch = settings["architecture"]
    figure.suptitle(f"generate(), D {arch['hidden_size']}, {arch['num_layers']} layers, H {arch['num_heads']}, "
                    f"{result['options']['dtype']} on {result['options']['device']}")
    figure.savefig(path, dpi=120)
    plt.close(figure)
