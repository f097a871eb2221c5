"""
Mixer benchmark: one RAT token mixer against one softmax attention mixer through SDPA (the "full_attention" layer
of the same model), same width and heads, projections included, no MLP.

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
import functools
import math

import torch

from modeling_rat import RatConfig, RatModel

from .common import RunOptions, check_settings, compare, dtype_tolerance, finish_benchmark, measure, run_cases, verify
from .sweep import plot_length_sweep, sweep_plan, sweep_summary, sweep_tables


MIXERS = ("rat", "attention")
BASELINE = "attention"
MODES = ("forward", "forward_backward")
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
    #: length of the correctness checks' input (not a multiple of the chunk size: a partial last chunk)
    check_length: int = 37

    def __post_init__(self):
        check_settings("modes", self.modes, MODES)
        check_settings("lengths", self.lengths)
        check_settings("tokens_per_batch", [self.tokens_per_batch])


# ==================================================================================================== modules


def build_mixer(settings: MixerSettings, kind: str, options: RunOptions, dtype=None, implementation=None):
    """
    A one-layer `RatModel` whose layer is a RAT or attention mixer, initialised as the model initialises it, on the
    run's device, in the run's dtype and RAT implementation unless others are given.
    """
    if kind not in MIXERS:
        raise ValueError(f"Unknown mixer {kind!r}: choose one of {MIXERS}.")
    config = RatConfig(
        vocab_size=8,
        hidden_size=settings.hidden_size,
        intermediate_size=8,  # the MLP is never run
        num_hidden_layers=1,
        num_attention_heads=settings.num_heads,
        num_qk_groups=settings.num_qk_groups,
        chunk_size=settings.chunk_size,
        layer_types=["rat" if kind == "rat" else "full_attention"],
        rat_implementation=implementation or options.rat_implementation,
    )
    torch.manual_seed(options.seed)
    return RatModel(config).to(device=options.torch_device, dtype=dtype or options.torch_dtype)


class _ArgumentsTaken(Exception):
    """Stops the model's forward once its mixer's arguments are known."""


def mixer_call(model: RatModel, batch_size: int, seq_len: int):
    """
    A function that runs the model's token mixer alone on hidden states of shape (batch_size, seq_len, D), with the
    other arguments the model gives the mixer (the sequence layout), taken from the start of one forward of the
    model on an input of that shape: the mixer runs exactly as inside the model, without norms, MLP or embedding.
    """
    mixer = model.layers[0].mixer
    arguments = {}

    def take_arguments(module, args, kwargs):
        arguments.update(args=args[1:], kwargs=kwargs)
        raise _ArgumentsTaken

    parameter = next(model.parameters())
    zeros = torch.zeros((), device=parameter.device, dtype=parameter.dtype)  # expanded: no memory of that shape
    handle = mixer.register_forward_pre_hook(take_arguments, with_kwargs=True)
    try:
        with torch.no_grad():
            model(inputs_embeds=zeros.expand(batch_size, seq_len, model.config.hidden_size), use_cache=False)
    except _ArgumentsTaken:
        pass
    finally:
        handle.remove()
    return lambda hidden_states: mixer(hidden_states, *arguments["args"], **arguments["kwargs"])


def softmax_attention_reference(mixer, hidden_states: torch.Tensor) -> torch.Tensor:
    """
    Causal multi-head softmax attention with token-level rotary embeddings ("rotate_half" convention), written out
    from the attention mixer's projection weights: its reference.
    """
    batch_size, seq_len, hidden_size = hidden_states.shape
    num_heads = mixer.num_heads
    head_dim = hidden_size // num_heads

    def heads(projection):
        return (hidden_states @ projection.weight.T).view(batch_size, seq_len, num_heads, head_dim).transpose(1, 2)

    query, key, value = heads(mixer.q_proj), heads(mixer.k_proj), heads(mixer.v_proj)
    inverse_frequency = mixer.config.rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
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


def compare_with_reference(name, module, run, reference, run_reference, inputs, output_gradient, gradients: bool):
    """
    `run(x)` against `run_reference(x)` in float32: the output and, when asked, the gradients of the input and of
    every parameter of `module` against those of `reference`.
    """
    dtype = next(module.parameters()).dtype
    module_inputs = inputs.detach().to(dtype).clone().requires_grad_(gradients)
    reference_inputs = module_inputs.detach().float().clone().requires_grad_(gradients)  # same values, float32
    output, reference_output = run(module_inputs), run_reference(reference_inputs)
    checks = [compare(f"{name}: output", output, reference_output, dtype_tolerance(dtype))]
    if gradients:
        output_gradient = output_gradient.to(dtype)
        grads = torch.autograd.grad(output, [module_inputs, *module.parameters()], output_gradient)
        reference_grads = torch.autograd.grad(
            reference_output, [reference_inputs, *reference.parameters()], output_gradient.float()
        )
        names = ["input", *(parameter_name for parameter_name, _ in module.named_parameters())]
        for parameter_name, grad, reference_grad in zip(names, grads, reference_grads):
            checks.append(compare(f"{name}: gradient of {parameter_name}", grad, reference_grad,
                                  dtype_tolerance(dtype, gradient=True)))
    return checks


def check_mixers(settings: MixerSettings, options: RunOptions) -> list[dict]:
    """The mixers exactly as timed (device, dtype, RAT implementation) against float32 references."""
    device = options.torch_device
    shape = (2, settings.check_length, settings.hidden_size)
    generator = torch.Generator().manual_seed(options.seed)
    inputs = torch.randn(shape, generator=generator).to(device)
    output_gradient = torch.randn(shape, generator=generator).to(device)
    gradients = "forward_backward" in settings.modes

    rat = build_mixer(settings, "rat", options)
    rat_reference = build_mixer(settings, "rat", options, torch.float32, "reference")
    rat_reference.load_state_dict(rat.state_dict())
    checks = compare_with_reference(
        f"RAT mixer ({options.rat_implementation}, {options.dtype}) vs reference equations",
        rat.layers[0].mixer, mixer_call(rat, *shape[:2]),
        rat_reference.layers[0].mixer, mixer_call(rat_reference, *shape[:2]),
        inputs, output_gradient, gradients,
    )
    attention = build_mixer(settings, "attention", options)
    attention_reference = copy.deepcopy(attention.layers[0].mixer).float()
    checks += compare_with_reference(
        f"SDPA attention mixer ({options.dtype}) vs softmax attention written out",
        attention.layers[0].mixer, mixer_call(attention, *shape[:2]),
        attention_reference, functools.partial(softmax_attention_reference, attention_reference),
        inputs, output_gradient, gradients,
    )
    return checks


# ================================================================================================== measuring


def measure_case(case: dict, settings: MixerSettings, options: RunOptions) -> dict:
    """One configuration (in its own process): build the mixer and input, peak memory of one call, timing."""
    device, dtype = options.torch_device, options.torch_dtype
    model = build_mixer(settings, case["mixer"], options)
    # One tiny call first, so that one-time library set-up (thread pools, kernel selection) is not counted as the
    # configuration's memory.
    tiny = torch.randn(1, 2 * settings.chunk_size + 1, settings.hidden_size, device=device, dtype=dtype)
    mixer_call(model, *tiny.shape[:2])(tiny.requires_grad_()).sum().backward()
    model.zero_grad(set_to_none=True)
    call = mixer_call(model, case["batch"], case["seq_len"])
    inputs = torch.randn(case["batch"], case["seq_len"], settings.hidden_size, device=device, dtype=dtype)
    if case["mode"] == "forward":

        def step():
            with torch.no_grad():
                call(inputs)

    else:
        inputs.requires_grad_(True)
        output_gradient = torch.randn_like(inputs)

        def step():
            call(inputs).backward(output_gradient)
            inputs.grad = None
            model.zero_grad(set_to_none=True)

    return measure(step, options)


def run(settings: MixerSettings, options: RunOptions, output_dir=None, machine: dict | None = None) -> dict:
    """Check, then time every (length, mode, mixer); returns the result and writes `mixer.json` and `mixer.png`."""
    checks = verify("mixer", check_mixers(settings, options))
    cases = run_cases("mixer", measure_case, sweep_plan(settings, "mixer", MIXERS), settings, options)
    summary = sweep_summary(cases, settings, "mixer", BASELINE, ["rat"])
    return finish_benchmark(
        "mixer", "one token mixer, projections included, no MLP; constant tokens per batch", options, settings,
        machine, {"checks": checks, "cases": cases, "summary": summary}, output_dir, plot,
    )


def markdown(result: dict) -> str:
    settings = result["settings"]
    return "\n".join([
        f"### Token mixer: RAT vs SDPA attention (D {settings['hidden_size']}, H {settings['num_heads']}, "
        f"L {settings['chunk_size']}, {result['options']['dtype']}, {settings['tokens_per_batch']:,} tokens per batch)",
        "",
        "Median time per batch and peak memory of one call; ratios are attention / RAT (above 1: RAT is better).",
        *sweep_tables(result, "mixer", MIXERS, BASELINE, MODE_LABELS),
    ])


def plot(result: dict, path) -> None:
    settings = result["settings"]
    title = f"Token mixer, D {settings['hidden_size']}, H {settings['num_heads']}, L {settings['chunk_size']}"
    plot_length_sweep(result, path, "mixer", MIXERS, MODE_LABELS, title)
