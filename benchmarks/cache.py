"""
Cache-memory benchmark: bytes per sequence that the decoding cache of each of the paper's five models holds
after a prompt of n tokens, measured with `modeling_rat.cache_nbytes` on the cache a real prefill built, against
the formula (per layer, in values of the model's dtype unless said otherwise):

    rat                2 * floor(n / L) * D    (key and value summaries of completed chunks)
                       + 2 * D float32         (running state of the unfinished chunk)
    full attention     2 * n * D               (keys and values)
    sliding attention  2 * min(n, W - 1) * D   (W = `sliding_window`, tokens a query sees, itself included)
    rnn                D float32               (the state)

A measurement that differs from the formula is reported as such. The formula is also evaluated for a larger model
(the paper's 1.3B by default) and longer contexts, where running the models would take long.

Checked first: every model decodes exactly what its full forward computes (`generate()` against one forward pass),
so the cache being measured is one that works.
"""

import dataclasses

import torch

from configuration_rat import PAPER_LAYER_PATTERNS, PRESET_SIZES
from modeling_rat import RatConfig, RatForCausalLM, cache_nbytes

from .common import (
    RunOptions,
    byte_unit,
    check_settings,
    dtype_tolerance,
    finish_benchmark,
    format_bytes,
    format_length,
    format_ratio,
    length_axis,
    markdown_table,
    pyplot,
    run_cases,
    verify,
)
from .decode import check_generate, returned_cache


PAPER_MODELS = ("attention", "rnn", "rat", "attention-swa", "rat-swa")


@dataclasses.dataclass
class CacheSettings:
    #: `RatConfig.from_preset` size of the measured models
    size: str = "small"
    models: tuple = PAPER_MODELS
    contexts: tuple = (1024, 2048, 4096, 8192, 16384)
    #: sliding window of the "-swa" models; None: the preset's (the paper's 1025)
    sliding_window: int | None = None
    #: size and contexts at which the formula alone is evaluated
    formula_size: str = "1.3b"
    formula_contexts: tuple = (4096, 16384, 65536, 262144, 1048576)
    check_prompt_length: int = 37
    check_new_tokens: int = 21

    def __post_init__(self):
        check_settings("models", self.models, PAPER_LAYER_PATTERNS)
        check_settings("size, formula_size", [self.size, self.formula_size], PRESET_SIZES)
        check_settings("contexts", self.contexts)
        check_settings("formula_contexts", self.formula_contexts)

    def config(self, name: str, size: str | None = None, **overrides) -> RatConfig:
        """The preset of model `name` at `size` (default: the measured size), with this sliding window."""
        if name.endswith("-swa") and self.sliding_window is not None:
            overrides["sliding_window"] = self.sliding_window
        return RatConfig.from_preset(name, size or self.size, **overrides)


def formula_bytes(config: RatConfig, context: int, element_size: int) -> int:
    """Bytes per sequence of the cache after `context` tokens, by the formula of the module docstring."""
    hidden_size, float32 = config.hidden_size, 4
    total = 0
    for layer_type in config.layer_types:
        if layer_type == "rat":
            total += 2 * (context // config.chunk_size) * hidden_size * element_size + 2 * hidden_size * float32
        elif layer_type == "full_attention":
            total += 2 * context * hidden_size * element_size
        elif layer_type == "sliding_attention":
            total += 2 * min(context, config.sliding_window - 1) * hidden_size * element_size
        elif layer_type == "rnn":
            total += hidden_size * float32
        else:
            raise ValueError(f"No cache formula for layer type {layer_type!r}.")
    return total


def build(name: str, settings: CacheSettings, options: RunOptions) -> RatForCausalLM:
    config = settings.config(name, rat_implementation=options.rat_implementation)
    torch.manual_seed(options.seed)
    with torch.device(options.torch_device):
        model = RatForCausalLM(config)
    return model.to(dtype=options.torch_dtype).eval()


def check_models(settings: CacheSettings, options: RunOptions) -> list[dict]:
    checks = []
    for name in settings.models:
        label = f"{name} ({settings.size}) generate() with the dynamic cache vs full forward"
        check = check_generate(build(name, settings, options), label, "dynamic", settings.check_prompt_length,
                               settings.check_new_tokens, dtype_tolerance(options.torch_dtype), seed=options.seed)
        checks.append({**check, "model": name})
    return checks


def measure_case(case: dict, settings: CacheSettings, options: RunOptions) -> dict:
    """One model (in its own process): prefill each context on a batch of one, read the cache's size."""
    model = build(case["model"], settings, options)
    element_size = options.torch_dtype.itemsize
    points = []
    for context in settings.contexts:
        ids = torch.randint(1, model.config.vocab_size, (1, context), device=options.torch_device)
        with torch.no_grad():
            cache = returned_cache(model(ids, use_cache=True, logits_to_keep=1))
        if cache is None:
            raise RuntimeError(f"{case['model']}: the forward pass with use_cache=True returned no cache.")
        measured, expected = cache_nbytes(cache), formula_bytes(model.config, context, element_size)
        points.append({"context": context, "bytes": measured, "formula_bytes": expected,
                       "matches_formula": measured == expected})
        del cache
    return {"status": "ok", "points": points}


def run(settings: CacheSettings, options: RunOptions, output_dir=None, machine: dict | None = None) -> dict:
    checks = verify("cache", check_models(settings, options))
    models = run_cases("cache", measure_case, [{"model": name} for name in settings.models], settings, options)
    element_size = options.torch_dtype.itemsize
    for entry in models:
        entry["layer_types"] = settings.config(entry["model"]).layer_types
        large = settings.config(entry["model"], settings.formula_size)
        entry["formula_at_size"] = [{"context": context, "formula_bytes": formula_bytes(large, context, element_size)}
                                    for context in settings.formula_contexts]
    swa = settings.config("rat-swa")
    sections = {
        "measured_size": {**PRESET_SIZES[settings.size], "chunk_size": swa.chunk_size,
                          "sliding_window": swa.sliding_window},
        "formula_size": PRESET_SIZES[settings.formula_size],
        "element_size": element_size,
        "checks": checks,
        "models": models,
        "all_match_formula": all(point["matches_formula"] for entry in models if entry["status"] == "ok"
                                 for point in entry["points"]),
    }
    return finish_benchmark(
        "cache", "decoding-cache bytes per sequence after n tokens, measured (cache_nbytes) and by formula", options,
        settings, machine, sections, output_dir, plot,
    )


def _point_cell(point: dict) -> str:
    if point["matches_formula"]:
        return format_bytes(point["bytes"])
    return f"{format_bytes(point['bytes'])} (formula: {format_bytes(point['formula_bytes'])})"


def markdown(result: dict) -> str:
    settings = result["settings"]
    measured = result["measured_size"]
    by_model = {entry["model"]: entry for entry in result["models"]}
    attention = by_model.get("attention")
    headers = ["model"] + [format_length(context) for context in settings["contexts"]] + ["attention / model"]
    rows = []
    for entry in result["models"]:
        if entry["status"] != "ok":
            rows.append([entry["model"]] + [entry["status"]] * len(settings["contexts"]) + ["–"])
            continue
        last = entry["points"][-1]
        reference = attention["points"][-1]["bytes"] if attention and attention["status"] == "ok" else None
        rows.append([entry["model"]] + [_point_cell(point) for point in entry["points"]]
                    + [format_ratio(reference / last["bytes"] if reference and last["bytes"] else None)])
    formula = result["formula_size"]
    formula_headers = ["model"] + [format_length(context) for context in settings["formula_contexts"]]
    formula_rows = [
        [entry["model"]] + [format_bytes(point["formula_bytes"]) for point in entry["formula_at_size"]]
        for entry in result["models"]
    ]
    verdict = ("every measurement equals the formula" if result["all_match_formula"]
               else "**some measurements differ from the formula** (shown with the formula's value)")
    return "\n".join([
        f"### Decoding cache per sequence (`cache_nbytes` after a prefill of n tokens, {result['options']['dtype']})",
        "",
        f"Measured on the `{settings['size']}` models (D {measured['hidden_size']}, {measured['num_hidden_layers']} "
        f"layers, L {measured['chunk_size']}, window {measured['sliding_window']}): {verdict}. The last column is "
        f"the attention model's cache over this model's at {format_length(settings['contexts'][-1])}.",
        "",
        markdown_table(headers, rows),
        "",
        f"By the formula at the `{settings['formula_size']}` size (D {formula['hidden_size']}, "
        f"{formula['num_hidden_layers']} layers, same L and window):",
        "",
        markdown_table(formula_headers, formula_rows),
    ])


def plot(result: dict, path) -> None:
    plt = pyplot()
    settings = result["settings"]
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    measured_axis, formula_axis = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    measured = [point["bytes"] for entry in result["models"] if entry["status"] == "ok" for point in entry["points"]]
    formula = [point["formula_bytes"] for entry in result["models"] for point in entry["formula_at_size"]]
    measured_unit, measured_size = byte_unit(max(measured, default=1))
    formula_unit, formula_size = byte_unit(max(formula, default=1))
    for index, entry in enumerate(result["models"]):
        color = colors[index % len(colors)]
        if entry["status"] == "ok":
            contexts = [point["context"] for point in entry["points"]]
            measured_axis.plot(contexts, [point["bytes"] / measured_size for point in entry["points"]], "o",
                               color=color, label=f"{entry['model']} (measured)")
            measured_axis.plot(contexts, [point["formula_bytes"] / measured_size for point in entry["points"]], "--",
                               color=color, label=f"{entry['model']} (formula)")
        formula_axis.plot([point["context"] for point in entry["formula_at_size"]],
                          [point["formula_bytes"] / formula_size for point in entry["formula_at_size"]], "-",
                          color=color, label=entry["model"])
    measured_axis.set_title(f"measured, {settings['size']} models")
    measured_axis.set_ylabel(f"cache per sequence ({measured_unit})")
    formula_axis.set_title(f"formula, {settings['formula_size']} models")
    formula_axis.set_ylabel(f"cache per sequence ({formula_unit})")
    for axis in axes:
        length_axis(axis, "context n (tokens)")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
    figure.suptitle(f"Decoding cache per sequence ({result['options']['dtype']})")
    figure.savefig(path, dpi=120)
    plt.close(figure)
