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
import functools

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from configuration_rat import PAPER_LAYER_PATTERNS
from modeling_rat import RatConfig, RatForCausalLM

from .common import RunOptions, check_settings, compare, dtype_tolerance, finish_benchmark, measure, run_cases, verify
from .sweep import plot_length_sweep, sweep_plan, sweep_summary, sweep_tables


MODES = ("prefill", "train")
MODE_LABELS = {"prefill": "prefill", "train": "training step"}
BASELINE = "llama"


@dataclasses.dataclass
class Architecture:
    """Width, depth, heads and vocabulary shared by the RAT models and the Llama they are compared with."""

    hidden_size: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_qk_groups: int = 2
    chunk_size: int = 16
    vocab_size: int = 32000
    #: tokens a sliding-window query sees, itself included (the paper's window_size=1024 is 1025 here)
    sliding_window: int = 1025


@dataclasses.dataclass
class ModelSettings:
    architecture: Architecture = dataclasses.field(default_factory=Architecture)
    #: any of the paper's patterns ("rat", "rat-swa", "attention", "attention-swa", "rnn") and "llama"
    models: tuple = ("rat", "rat-swa", BASELINE)
    lengths: tuple = (1024, 2048, 4096, 8192, 16384)
    tokens_per_batch: int = 16384
    modes: tuple = MODES
    learning_rate: float = 1e-4
    check_length: int = 37

    def __post_init__(self):
        check_settings("modes", self.modes, MODES)
        check_settings("models", self.models, (*PAPER_LAYER_PATTERNS, BASELINE))
        check_settings("lengths", self.lengths)
        check_settings("tokens_per_batch", [self.tokens_per_batch])

    def build(self, name: str, options: RunOptions, **kwargs):
        return build_model(self.architecture, name, options, max([*self.lengths, self.check_length]), **kwargs)


# ===================================================================================================== models


def build_model(architecture: Architecture, name: str, options: RunOptions, max_positions: int, dtype=None,
                implementation: str | None = None, attn_implementation: str = "sdpa"):
    """
    The RAT model with the paper's layer pattern `name`, or Llama (`name="llama"`), in eval mode, on the run's
    device, in the run's dtype and RAT implementation unless others are given.
    """
    arch = architecture
    if name == BASELINE:
        config = LlamaConfig(
            vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=4 * arch.hidden_size,
            num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_heads,
            max_position_embeddings=max_positions, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-6, tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=None,
        )
        config._attn_implementation = attn_implementation
    elif name in PAPER_LAYER_PATTERNS:
        layer_types = [PAPER_LAYER_PATTERNS[name](index) for index in range(arch.num_layers)]
        config = RatConfig(
            vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=4 * arch.hidden_size,
            num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads, num_qk_groups=arch.num_qk_groups,
            chunk_size=arch.chunk_size, layer_types=layer_types,
            sliding_window=arch.sliding_window if "sliding_attention" in layer_types else None, pad_token_id=0,
            rat_implementation=implementation or options.rat_implementation,
        )
    else:
        raise ValueError(f"Unknown model {name!r}: choose among {[*PAPER_LAYER_PATTERNS, BASELINE]}.")
    torch.manual_seed(options.seed)
    with torch.device(options.torch_device):
        model = LlamaForCausalLM(config) if name == BASELINE else RatForCausalLM(config)
    return model.to(dtype=dtype or options.torch_dtype).eval()


def parameter_counts(model) -> dict:
    total = model.num_parameters()
    return {"parameters": total, "non_embedding_parameters": total - model.get_input_embeddings().weight.numel()}


# ================================================================================================ correctness


def _prefill_logits(model, ids, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, use_cache=use_cache).logits


def _loss_and_gradients(model, ids):
    """The training loss and every parameter's gradient, in training mode as timed."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    model.eval()
    return loss, {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}


def check_model(settings: ModelSettings, name: str, options: RunOptions) -> list[dict]:
    """One model exactly as timed (device, dtype, implementation) against its float32 reference, same weights."""
    tolerance = dtype_tolerance(options.torch_dtype)
    generator = torch.Generator().manual_seed(options.seed)
    ids = torch.randint(1, settings.architecture.vocab_size, (2, settings.check_length), generator=generator)
    ids = ids.to(options.torch_device)
    model = settings.build(name, options)
    if name == BASELINE:
        reference = settings.build(name, options, dtype=torch.float32, attn_implementation="eager")
        label = f"llama sdpa ({options.dtype}) vs eager attention (float32)"
    else:
        reference = settings.build(name, options, dtype=torch.float32, implementation="reference")
        label = f"{name} {options.rat_implementation} ({options.dtype}) vs reference equations (float32)"
    reference.load_state_dict(model.state_dict())
    # prefill as timed, with a cache (the reference runs without one)
    logits, reference_logits = _prefill_logits(model, ids, use_cache=True), _prefill_logits(reference, ids, False)
    checks = [compare(f"{label}: prefill logits", logits, reference_logits, tolerance)]
    if "train" in settings.modes:
        loss, grads = _loss_and_gradients(model, ids)
        reference_loss, reference_grads = _loss_and_gradients(reference, ids)
        checks.append(compare(f"{label}: training loss", loss, reference_loss, tolerance))
        if grads.keys() != reference_grads.keys():
            differing = sorted(grads.keys() ^ reference_grads.keys())
            checks.append({"name": f"{label}: gradients", "tolerance": tolerance, "passed": False,
                           "detail": f"different parameters got gradients: {differing}"})
        for parameter_name in (name for name in grads if name in reference_grads):
            checks.append(compare(f"{label}: gradient of {parameter_name}", grads[parameter_name],
                                  reference_grads[parameter_name], dtype_tolerance(options.torch_dtype, gradient=True)))
    return checks


# ================================================================================================== measuring


def measure_case(case: dict, settings: ModelSettings, options: RunOptions) -> dict:
    """One configuration (in its own process): build, peak memory of one step, timing."""
    model = settings.build(case["model"], options)
    if case["mode"] == "train":
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.learning_rate)

    def step(ids):
        if case["mode"] == "prefill":
            with torch.no_grad():
                model(ids, use_cache=True, logits_to_keep=1)
        else:
            model(ids, labels=ids, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    vocab_size, device = settings.architecture.vocab_size, options.torch_device
    # One tiny step first, so that one-time library set-up is not counted as the configuration's memory.
    step(torch.randint(1, vocab_size, (1, 2 * settings.architecture.chunk_size + 1), device=device))
    ids = torch.randint(1, vocab_size, (case["batch"], case["seq_len"]), device=device)
    result = measure(functools.partial(step, ids), options)
    return {**result, "tokens_per_s": ids.numel() / result["median_s"]}


def run(settings: ModelSettings, options: RunOptions, output_dir=None, machine: dict | None = None) -> dict:
    """Check, then time every (length, mode, model); returns the result and writes `model.json` and `model.png`."""
    checks = verify("model", [check for name in settings.models for check in check_model(settings, name, options)])
    on_meta = dataclasses.replace(options, device="meta")  # parameter counts without allocating the parameters
    sizes = {name: parameter_counts(settings.build(name, on_meta)) for name in settings.models}
    cases = run_cases("model", measure_case, sweep_plan(settings, "model", settings.models), settings, options)
    candidates = [name for name in settings.models if name != BASELINE]
    summary = sweep_summary(cases, settings, "model", BASELINE, candidates)
    return finish_benchmark(
        "model", "prefill and training step of whole language models; constant tokens per batch", options, settings,
        machine, {"parameters": sizes, "checks": checks, "cases": cases, "summary": summary}, output_dir, plot,
    )


def markdown(result: dict) -> str:
    settings, arch = result["settings"], result["settings"]["architecture"]
    sizes = ", ".join(f"{name} {result['parameters'][name]['parameters'] / 1e6:.3g}M" for name in settings["models"])
    return "\n".join([
        f"### Whole model vs Llama (D {arch['hidden_size']}, {arch['num_layers']} layers, H {arch['num_heads']}, "
        f"L {arch['chunk_size']}, window {arch['sliding_window']}, vocabulary {arch['vocab_size']}, "
        f"{result['options']['dtype']}, {settings['tokens_per_batch']:,} tokens per batch)",
        "",
        f"Parameters: {sizes} (Llama's SwiGLU MLP has three matrices, RAT's GELU MLP two). Median time per batch "
        "and peak memory of one step; ratios are Llama / RAT model (above 1: RAT is better).",
        *sweep_tables(result, "model", settings["models"], BASELINE, MODE_LABELS),
    ])


def plot(result: dict, path) -> None:
    arch = result["settings"]["architecture"]
    title = (f"Language model, D {arch['hidden_size']}, {arch['num_layers']} layers, H {arch['num_heads']}, "
             f"L {arch['chunk_size']}")
    plot_length_sweep(result, path, "model", result["settings"]["models"], MODE_LABELS, title)
