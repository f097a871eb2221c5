"""
Model benchmark: prefill and training step of `RatForCausalLM` (the paper's "rat" and "rat-swa" models) against
transformers' `LlamaForCausalLM` with SDPA attention of the same width, depth, heads and MLP width.

"Equal size": same D, layers, heads, vocabulary and tied embeddings, and an MLP of intermediate size 4·D for both.
The two MLPs are not the same shape: RAT's is the paper's GELU MLP (two matrices), Llama's a SwiGLU MLP (three
matrices), so Llama has more parameters at equal widths; both counts are reported. Lengths run at a constant number
of tokens per batch (batch = tokens_per_batch // T).

* prefill: `model(ids, use_cache=True, logits_to_keep=1)` under `torch.no_grad()`, what `generate()` runs on a
  prompt (the cache is built; only the last position's logits are computed).
* train: forward with `labels` (`use_cache=False`), backward, and an SGD step. SGD keeps no state, so the peak
  memory shows activations and gradients; AdamW would add two float32 copies of the parameters to each model.

Checked first, on a short input: each RAT model's timed path (with its cache) against the same weights run with
`rat_implementation="reference"` in float32 (logits; loss and every gradient for "train"), and Llama's SDPA
attention against its eager attention in float32.
"""

import dataclasses
import logging

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from configuration_rat import PAPER_LAYER_PATTERNS
from modeling_rat import RatConfig, RatForCausalLM

from .common import (
    RunOptions,
    break_even,
    case_cell,
    check_choices,
    check_positive,
    compare,
    describe_timing,
    dtype_tolerance,
    find_case,
    finish_benchmark,
    format_bytes,
    format_count,
    format_length,
    format_ratio,
    format_seconds,
    log_checks,
    markdown_table,
    measure,
    plot_length_sweep,
    prepare_process,
    progress,
    ratio,
    require,
    run_case,
)


logger = logging.getLogger("benchmarks")

MODES = ("prefill", "train")
MODE_LABELS = {"prefill": "prefill", "train": "training step"}
BASELINE = "llama"


@dataclasses.dataclass
class ModelSettings:
    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_qk_groups: int = 2
    chunk_size: int = 16
    vocab_size: int = 32000
    #: tokens a sliding-window query sees, itself included (the paper's window_size=1024 is 1025 here)
    sliding_window: int = 1025
    #: Llama's MLP width; None: 4 * hidden_size, RAT's
    llama_intermediate_size: int | None = None
    #: any of the paper's patterns ("rat", "rat-swa", "attention", "attention-swa", "rnn") and "llama"
    models: tuple = ("rat", "rat-swa", BASELINE)
    lengths: tuple = (1024, 2048, 4096, 8192, 16384)
    tokens_per_batch: int = 16384
    modes: tuple = MODES
    warmup: int = 2
    repeats: int = 5
    max_seconds: float = 60.0
    learning_rate: float = 1e-4
    check_length: int = 37

    def __post_init__(self):
        check_choices("modes", self.modes, MODES)
        check_choices("models", self.models, (*PAPER_LAYER_PATTERNS, BASELINE))
        check_positive("lengths", self.lengths)
        check_positive("tokens_per_batch, repeats", [self.tokens_per_batch, self.repeats])

    def batch_size(self, seq_len: int) -> int:
        return max(1, self.tokens_per_batch // seq_len)


# ===================================================================================================== models


def model_config(settings: ModelSettings, name: str, implementation: str = "auto", attn_implementation: str = "sdpa"):
    longest = max([*settings.lengths, settings.check_length])
    if name == BASELINE:
        config = LlamaConfig(
            vocab_size=settings.vocab_size,
            hidden_size=settings.hidden_size,
            intermediate_size=settings.llama_intermediate_size or 4 * settings.hidden_size,
            num_hidden_layers=settings.num_layers,
            num_attention_heads=settings.num_heads,
            num_key_value_heads=settings.num_heads,
            max_position_embeddings=longest,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=None,
            eos_token_id=None,
        )
        config._attn_implementation = attn_implementation
        return config
    if name not in PAPER_LAYER_PATTERNS:
        raise ValueError(f"Unknown model {name!r}: choose among {[*PAPER_LAYER_PATTERNS, BASELINE]}.")
    layer_types = [PAPER_LAYER_PATTERNS[name](index) for index in range(settings.num_layers)]
    return RatConfig(
        vocab_size=settings.vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=4 * settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_qk_groups=settings.num_qk_groups,
        chunk_size=settings.chunk_size,
        layer_types=layer_types,
        sliding_window=settings.sliding_window if "sliding_attention" in layer_types else None,
        max_position_embeddings=longest,
        pad_token_id=0,
        rat_implementation=implementation,
    )


def build_model(settings: ModelSettings, name: str, device, dtype, implementation: str = "auto",
                attn_implementation: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    config = model_config(settings, name, implementation, attn_implementation)
    with torch.device(device):
        model = LlamaForCausalLM(config) if name == BASELINE else RatForCausalLM(config)
    return model.to(dtype=dtype).eval()


def parameter_counts(model) -> dict:
    total = model.num_parameters()
    embedding = model.get_input_embeddings().weight.numel()
    return {"parameters": total, "non_embedding_parameters": total - embedding}


# ================================================================================================ correctness


def _forward_and_gradients(model, ids, gradients: bool, use_cache: bool):
    if not gradients:
        with torch.no_grad():
            return model(ids, use_cache=use_cache).logits, None, None
    model.train()
    model.zero_grad(set_to_none=True)
    output = model(ids, labels=ids, use_cache=False)
    output.loss.backward()
    grads = {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}
    model.eval()
    return output.logits, output.loss, grads


def check_model(settings: ModelSettings, name: str, options: RunOptions) -> list[dict]:
    """One model exactly as timed (device, dtype, implementation) against its float32 reference, same weights."""
    device, dtype = options.torch_device, options.torch_dtype
    tolerance = dtype_tolerance(dtype)
    generator = torch.Generator().manual_seed(options.seed)
    ids = torch.randint(1, settings.vocab_size, (2, settings.check_length), generator=generator).to(device)
    model = build_model(settings, name, device, dtype, options.rat_implementation, seed=options.seed)
    if name == BASELINE:
        reference = build_model(settings, name, device, torch.float32, attn_implementation="eager", seed=options.seed)
        label = f"llama sdpa ({options.dtype}) vs eager attention (float32)"
    else:
        reference = build_model(settings, name, device, torch.float32, "reference", seed=options.seed)
        label = f"{name} {options.rat_implementation} ({options.dtype}) vs reference equations (float32)"
    reference.load_state_dict(model.state_dict())
    checks = []
    # prefill as timed: with a cache (the reference path runs without one)
    logits, _, _ = _forward_and_gradients(model, ids, gradients=False, use_cache=True)
    reference_logits, _, _ = _forward_and_gradients(reference, ids, gradients=False, use_cache=False)
    checks.append(compare(f"{label}: prefill logits", logits, reference_logits, tolerance))
    if "train" in settings.modes:
        _, loss, grads = _forward_and_gradients(model, ids, gradients=True, use_cache=False)
        _, reference_loss, reference_grads = _forward_and_gradients(reference, ids, gradients=True, use_cache=False)
        checks.append(compare(f"{label}: training loss", loss, reference_loss, tolerance))
        if grads.keys() != reference_grads.keys():
            differing = sorted(grads.keys() ^ reference_grads.keys())
            checks.append({"name": f"{label}: gradients", "tolerance": tolerance, "passed": False,
                           "detail": f"different parameters got gradients: {differing}"})
        for parameter_name in grads:
            if parameter_name in reference_grads:
                checks.append(compare(f"{label}: gradient of {parameter_name}", grads[parameter_name],
                                      reference_grads[parameter_name], dtype_tolerance(dtype, gradient=True)))
    return checks


def check_models(settings: ModelSettings, options: RunOptions) -> list[dict]:
    checks = []
    for name in settings.models:
        checks += check_model(settings, name, options)
    return checks


# ================================================================================================== measuring


def measure_case(spec: dict) -> dict:
    """One configuration (runs in its own process): build, peak memory of one step, timing."""
    options = RunOptions(**spec["options"])
    settings = ModelSettings(**spec["settings"])
    prepare_process(options)
    device, dtype = options.torch_device, options.torch_dtype
    model = build_model(settings, spec["model"], device, dtype, options.rat_implementation, seed=options.seed)
    batch_size, seq_len = spec["batch"], spec["seq_len"]

    if spec["mode"] == "prefill":
        def make_step(ids):
            def step():
                with torch.no_grad():
                    model(ids, use_cache=True, logits_to_keep=1)
            return step
    else:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)

        def make_step(ids):
            def step():
                model(ids, labels=ids, use_cache=False).loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return step

    # One tiny step first, so that one-time library set-up is not counted as the configuration's memory.
    make_step(torch.randint(1, settings.vocab_size, (1, 2 * settings.chunk_size + 1), device=device))()
    ids = torch.randint(1, settings.vocab_size, (batch_size, seq_len), device=device)
    result = measure(make_step(ids), device, settings.warmup, settings.repeats, settings.max_seconds)
    result["tokens_per_s"] = batch_size * seq_len / result["median_s"]
    return result


def run(settings: ModelSettings, options: RunOptions, output_dir=None, machine: dict | None = None) -> dict:
    """Check, then time every (length, mode, model); returns the result and writes `model.json`/`model.png`."""
    logger.info("[model] checking the models against their references")
    checks = check_models(settings, options)
    log_checks(checks)
    require(checks, "model benchmark")
    sizes = {}
    for name in settings.models:
        sizes[name] = parameter_counts(build_model(settings, name, "meta", torch.float32, seed=options.seed))
        logger.info("[model] %-8s %s parameters (%s without the embedding)", name,
                    f"{sizes[name]['parameters']:,}", f"{sizes[name]['non_embedding_parameters']:,}")

    cases = []
    plan = [(seq_len, mode, name) for seq_len in settings.lengths for mode in settings.modes for name in settings.models]
    for seq_len, mode, name in progress(plan, "model"):
        batch_size = settings.batch_size(seq_len)
        spec = {
            "model": name, "mode": mode, "seq_len": seq_len, "batch": batch_size,
            "options": dataclasses.asdict(options), "settings": dataclasses.asdict(settings),
        }
        case = {"model": name, "mode": mode, "seq_len": seq_len, "batch": batch_size, "tokens": batch_size * seq_len}
        case.update(run_case(measure_case, spec, options))
        cases.append(case)
        logger.info("[model] %-8s %-8s T=%-6d batch=%-3d %s", name, mode, seq_len, batch_size, describe_timing(case))

    return finish_benchmark(
        "model", "prefill and training step of whole language models; constant tokens per batch", options, settings,
        machine, {"parameters": sizes, "checks": checks, "cases": cases, "summary": summarize(cases, settings)},
        output_dir, plot,
    )


def summarize(cases: list[dict], settings) -> dict:
    """Per mode and RAT model: Llama/RAT time and memory ratios per length, and the break-even length."""
    summary = {}
    for mode in settings.modes:
        summary[mode] = {}
        for name in settings.models:
            if name == BASELINE:
                continue
            rows = []
            for seq_len in settings.lengths:
                baseline = find_case(cases, model=BASELINE, mode=mode, seq_len=seq_len)
                candidate = find_case(cases, model=name, mode=mode, seq_len=seq_len)
                rows.append({
                    "seq_len": seq_len,
                    "time_ratio": ratio(baseline, candidate, "median_s"),
                    "memory_ratio": ratio(baseline, candidate, "peak_memory_bytes"),
                })
            summary[mode][name] = {
                "ratios": rows,
                "break_even": break_even([row["seq_len"] for row in rows], [row["time_ratio"] for row in rows]),
            }
    return summary


def markdown(result: dict) -> str:
    settings = result["settings"]
    cases = result["cases"]
    models = settings["models"]
    candidates = [name for name in models if name != BASELINE]
    sizes = ", ".join(f"{name} {format_count(result['parameters'][name]['parameters'])}" for name in models)
    parts = [
        f"### Whole model vs Llama (D {settings['hidden_size']}, {settings['num_layers']} layers, "
        f"H {settings['num_heads']}, L {settings['chunk_size']}, window {settings['sliding_window']}, "
        f"vocabulary {settings['vocab_size']}, {result['options']['dtype']}, "
        f"{settings['tokens_per_batch']:,} tokens per batch)",
        "",
        f"Parameters: {sizes} (Llama's SwiGLU MLP has three matrices, RAT's GELU MLP two). Median time per batch "
        "and peak memory of one step; ratios are Llama / RAT model (above 1: RAT is better).",
    ]
    for mode in settings["modes"]:
        headers = ["T", "batch"]
        headers += [f"{name} time" for name in models] + [f"speed-up {name}" for name in candidates]
        headers += [f"{name} memory" for name in models] + [f"memory ratio {name}" for name in candidates]
        rows = []
        for index, seq_len in enumerate(settings["lengths"]):
            found = {name: find_case(cases, model=name, mode=mode, seq_len=seq_len) for name in models}
            row = [format_length(seq_len), next((case["batch"] for case in found.values() if case), "–")]
            row += [case_cell(found[name], "median_s", format_seconds) for name in models]
            row += [format_ratio(result["summary"][mode][name]["ratios"][index]["time_ratio"]) for name in candidates]
            row += [case_cell(found[name], "peak_memory_bytes", format_bytes) for name in models]
            row += [format_ratio(result["summary"][mode][name]["ratios"][index]["memory_ratio"]) for name in candidates]
            rows.append(row)
        even = "; ".join(f"{name}: {result['summary'][mode][name]['break_even']['text']}" for name in candidates)
        parts += ["", f"**{MODE_LABELS[mode]}** (break-even with Llama: {even})", "", markdown_table(headers, rows)]
    return "\n".join(parts)


def plot(result: dict, path) -> None:
    settings = result["settings"]
    title = (f"Language model, D {settings['hidden_size']}, {settings['num_layers']} layers, "
             f"H {settings['num_heads']}, L {settings['chunk_size']}")
    plot_length_sweep(result, path, "model", {name: name for name in settings["models"]}, MODE_LABELS, title)
