"""
Mixer benchmark: one RAT token mixer (`RatMixer`) against one softmax attention mixer through SDPA (`RatAttention`
with `layer_types=["full_attention"]`), same width and heads, projections included, no MLP.

Lengths T run at a constant number of tokens per batch (batch = tokens_per_batch // T), so every configuration
processes the same tokens and the time per batch shows the cost per token growing with the context: linearly for
attention (every token attends to all earlier tokens), as T / L for RAT (every token attends to T / L chunk
summaries). Both directions are timed: "forward" (under `torch.no_grad()`, as in inference) and
"forward_backward" (forward then backward of a fixed random output gradient, as in training).

Checked first, on a short input whose length is not a multiple of the chunk size: the RAT mixer's timed path
against the reference equations (`rat_implementation="reference"`, float32), outputs and all gradients; the
attention mixer against softmax attention written out in this file (float32), outputs and all gradients.
"""

import copy
import dataclasses
import logging
import math

import torch

from modeling_rat import RatConfig
from modeling_rat.modeling_rat import RatModel, RatSequenceLayout

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

MIXERS = ("rat", "attention")
MODES = ("forward", "forward_backward")
MIXER_LABELS = {"rat": "RAT mixer", "attention": "SDPA attention"}
MODE_LABELS = {"forward": "forward", "forward_backward": "forward + backward"}


@dataclasses.dataclass
class MixerSettings:
    hidden_size: int = 512
    num_heads: int = 8
    num_qk_groups: int = 2
    chunk_size: int = 16
    lengths: tuple = (1024, 2048, 4096, 8192, 16384, 32768)
    tokens_per_batch: int = 32768
    modes: tuple = MODES
    warmup: int = 2
    repeats: int = 5
    max_seconds: float = 30.0
    #: length of the correctness checks' input (not a multiple of the chunk size: a partial last chunk)
    check_length: int = 37

    def __post_init__(self):
        check_choices("modes", self.modes, MODES)
        check_positive("lengths", self.lengths)
        check_positive("tokens_per_batch, repeats", [self.tokens_per_batch, self.repeats])

    def batch_size(self, seq_len: int) -> int:
        return max(1, self.tokens_per_batch // seq_len)


# ==================================================================================================== modules


def mixer_config(settings: MixerSettings, kind: str, implementation: str = "auto") -> RatConfig:
    if kind not in MIXERS:
        raise ValueError(f"Unknown mixer {kind!r}: choose one of {MIXERS}.")
    return RatConfig(
        vocab_size=8,
        hidden_size=settings.hidden_size,
        intermediate_size=8,  # the MLP of the one-layer model is not used
        num_hidden_layers=1,
        num_attention_heads=settings.num_heads,
        num_qk_groups=settings.num_qk_groups,
        chunk_size=settings.chunk_size,
        layer_types=["rat" if kind == "rat" else "full_attention"],
        max_position_embeddings=max([*settings.lengths, settings.check_length]),
        rat_implementation=implementation,
    )


def build_mixer(settings: MixerSettings, kind: str, device, dtype, implementation: str = "auto", seed: int = 0):
    """The token mixer of a one-layer `RatModel`, initialised as in the model (N(0, 0.02), forget-gate bias)."""
    torch.manual_seed(seed)
    mixer = RatModel(mixer_config(settings, kind, implementation)).layers[0].mixer
    return mixer.to(device=device, dtype=dtype)


def call_mixer(mixer, hidden_states: torch.Tensor) -> torch.Tensor:
    """One forward of a mixer, building its sequence layout as the model does at every forward."""
    batch_size, seq_len = hidden_states.shape[:2]
    layout = RatSequenceLayout.build(batch_size, seq_len, hidden_states.device)
    return mixer(hidden_states, layout)


def softmax_attention_reference(mixer, hidden_states: torch.Tensor, rope_theta: float = 10000.0) -> torch.Tensor:
    """
    Causal multi-head softmax attention with token-level rotary embeddings ("rotate_half" convention), written out
    from the mixer's projection weights: the reference of the attention mixer.
    """
    batch_size, seq_len, hidden_size = hidden_states.shape
    num_heads = mixer.num_heads
    head_dim = hidden_size // num_heads

    def heads(projection):
        return (hidden_states @ projection.weight.T).view(batch_size, seq_len, num_heads, head_dim).transpose(1, 2)

    query, key, value = heads(mixer.q_proj), heads(mixer.k_proj), heads(mixer.v_proj)
    inverse_frequency = rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(seq_len, dtype=torch.float32)[:, None] * inverse_frequency[None, :]
    angles = torch.cat([angles, angles], dim=-1).to(hidden_states.device)

    def rotate(x):
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()

    scores = rotate(query) @ rotate(key).transpose(-1, -2) / math.sqrt(head_dim)
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=hidden_states.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
    out = (weights @ value).transpose(1, 2).reshape(batch_size, seq_len, hidden_size)
    return out @ mixer.o_proj.weight.T


# ================================================================================================ correctness


def compare_with_reference(name, module, reference, run, run_reference, inputs, output_gradient, gradients: bool):
    """Checks of `run(module, x)` against `run_reference(reference, x)` (float32): output and, if asked, every gradient."""
    dtype = next(module.parameters()).dtype
    module_inputs = inputs.detach().to(dtype).clone().requires_grad_(gradients)
    reference_inputs = module_inputs.detach().float().clone().requires_grad_(gradients)  # same values, float32
    output = run(module, module_inputs)
    reference_output = run_reference(reference, reference_inputs)
    checks = [compare(f"{name}: output", output, reference_output, dtype_tolerance(dtype))]
    gradient_tolerance = dtype_tolerance(dtype, gradient=True)
    if gradients:
        names = [parameter_name for parameter_name, _ in module.named_parameters()]
        grads = torch.autograd.grad(output, [module_inputs, *module.parameters()], output_gradient.to(dtype))
        reference_grads = torch.autograd.grad(
            reference_output, [reference_inputs, *reference.parameters()], output_gradient.to(dtype).float()
        )
        for parameter_name, grad, reference_grad in zip(["input", *names], grads, reference_grads):
            checks.append(compare(f"{name}: gradient of {parameter_name}", grad, reference_grad, gradient_tolerance))
    return checks


def check_mixers(settings: MixerSettings, options: RunOptions) -> list[dict]:
    """The mixers exactly as timed (device, dtype, RAT implementation) against float32 references."""
    device, dtype = options.torch_device, options.torch_dtype
    gradients = "forward_backward" in settings.modes
    generator = torch.Generator().manual_seed(options.seed)
    inputs = torch.randn(2, settings.check_length, settings.hidden_size, generator=generator).to(device)
    output_gradient = torch.randn(inputs.shape, generator=generator).to(device)

    rat = build_mixer(settings, "rat", device, dtype, options.rat_implementation, seed=options.seed)
    rat_reference = build_mixer(settings, "rat", device, torch.float32, "reference", seed=options.seed)
    rat_reference.load_state_dict(rat.state_dict())
    checks = compare_with_reference(
        f"RAT mixer ({options.rat_implementation}, {options.dtype}) vs reference equations",
        rat, rat_reference, call_mixer, call_mixer, inputs, output_gradient, gradients,
    )
    attention = build_mixer(settings, "attention", device, dtype, seed=options.seed)
    attention_reference = copy.deepcopy(attention).float()
    checks += compare_with_reference(
        f"SDPA attention mixer ({options.dtype}) vs softmax attention written out",
        attention, attention_reference, call_mixer, softmax_attention_reference,
        inputs, output_gradient, gradients,
    )
    return checks


# ================================================================================================== measuring


def measure_case(spec: dict) -> dict:
    """One configuration (runs in its own process): build the mixer and input, peak memory of one call, timing."""
    options = RunOptions(**spec["options"])
    settings = MixerSettings(**spec["settings"])
    prepare_process(options)
    device, dtype = options.torch_device, options.torch_dtype
    mixer = build_mixer(settings, spec["mixer"], device, dtype, options.rat_implementation, seed=options.seed)
    batch_size, seq_len = spec["batch"], spec["seq_len"]
    # One tiny call first, so that one-time library set-up (thread pools, kernel selection) is not counted as the
    # configuration's memory.
    tiny = torch.randn(1, 2 * settings.chunk_size + 1, settings.hidden_size, device=device, dtype=dtype)
    call_mixer(mixer, tiny.requires_grad_(spec["mode"] != "forward")).sum().backward()
    mixer.zero_grad(set_to_none=True)
    del tiny
    inputs = torch.randn(batch_size, seq_len, settings.hidden_size, device=device, dtype=dtype)
    if spec["mode"] == "forward":
        mixer.eval()

        def step():
            with torch.no_grad():
                call_mixer(mixer, inputs)

    else:
        inputs.requires_grad_(True)
        output_gradient = torch.randn_like(inputs)
        parameters = list(mixer.parameters())

        def step():
            call_mixer(mixer, inputs).backward(output_gradient)
            inputs.grad = None
            for parameter in parameters:
                parameter.grad = None

    return measure(step, device, settings.warmup, settings.repeats, settings.max_seconds)


def run(settings: MixerSettings, options: RunOptions, output_dir=None, machine: dict | None = None) -> dict:
    """Check, then time every (length, mode, mixer); returns the result and writes `mixer.json`/`mixer.png`."""
    logger.info("[mixer] checking the mixers against their references")
    checks = check_mixers(settings, options)
    log_checks(checks)
    require(checks, "mixer benchmark")

    cases = []
    plan = [(seq_len, mode, kind) for seq_len in settings.lengths for mode in settings.modes for kind in MIXERS]
    for seq_len, mode, kind in progress(plan, "mixer"):
        batch_size = settings.batch_size(seq_len)
        spec = {
            "mixer": kind, "mode": mode, "seq_len": seq_len, "batch": batch_size,
            "options": dataclasses.asdict(options), "settings": dataclasses.asdict(settings),
        }
        result = run_case(measure_case, spec, options)
        case = {"mixer": kind, "mode": mode, "seq_len": seq_len, "batch": batch_size, "tokens": batch_size * seq_len}
        case.update(result)
        cases.append(case)
        logger.info("[mixer] %-9s %-16s T=%-6d batch=%-3d %s", kind, mode, seq_len, batch_size, describe_timing(case))

    return finish_benchmark(
        "mixer", "one token mixer, projections included, no MLP; constant tokens per batch", options, settings,
        machine, {"checks": checks, "cases": cases, "summary": summarize(cases, settings)}, output_dir, plot,
    )


# ==================================================================================================== summary


def summarize(cases: list[dict], settings) -> dict:
    """Per mode: attention/RAT time and memory ratios per length, and the break-even length."""
    summary = {}
    for mode in settings.modes:
        rows = []
        for seq_len in settings.lengths:
            attention = find_case(cases, mixer="attention", mode=mode, seq_len=seq_len)
            rat = find_case(cases, mixer="rat", mode=mode, seq_len=seq_len)
            rows.append({
                "seq_len": seq_len,
                "time_ratio": ratio(attention, rat, "median_s"),
                "memory_ratio": ratio(attention, rat, "peak_memory_bytes"),
            })
        summary[mode] = {
            "ratios": rows,
            "break_even": break_even([row["seq_len"] for row in rows], [row["time_ratio"] for row in rows]),
        }
    return summary


def markdown(result: dict) -> str:
    settings = result["settings"]
    cases = result["cases"]
    parts = [
        f"### Token mixer: RAT vs SDPA attention (D {settings['hidden_size']}, H {settings['num_heads']}, "
        f"L {settings['chunk_size']}, {result['options']['dtype']}, {settings['tokens_per_batch']:,} tokens per batch)",
        "",
        "Median time per batch and peak memory of one call; ratios are attention / RAT (above 1: RAT is better).",
    ]
    for mode in settings["modes"]:
        rows = []
        for row in result["summary"][mode]["ratios"]:
            rat = find_case(cases, mixer="rat", mode=mode, seq_len=row["seq_len"])
            attention = find_case(cases, mixer="attention", mode=mode, seq_len=row["seq_len"])
            rows.append([
                format_length(row["seq_len"]),
                rat["batch"] if rat else "–",
                case_cell(rat, "median_s", format_seconds),
                case_cell(attention, "median_s", format_seconds),
                format_ratio(row["time_ratio"]),
                case_cell(rat, "peak_memory_bytes", format_bytes),
                case_cell(attention, "peak_memory_bytes", format_bytes),
                format_ratio(row["memory_ratio"]),
            ])
        parts += [
            "",
            f"**{MODE_LABELS[mode]}** (break-even: {result['summary'][mode]['break_even']['text']})",
            "",
            markdown_table(
                ["T", "batch", "RAT time", "attention time", "speed-up", "RAT memory", "attention memory", "memory ratio"],
                rows,
            ),
        ]
    return "\n".join(parts)


def plot(result: dict, path) -> None:
    settings = result["settings"]
    title = f"Token mixer, D {settings['hidden_size']}, H {settings['num_heads']}, L {settings['chunk_size']}"
    plot_length_sweep(result, path, "mixer", MIXER_LABELS, MODE_LABELS, title)
