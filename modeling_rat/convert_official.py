"""Convert checkpoints of the official RAT code (github CLAIRE-Labo/RAT, Hub repo barpitf/RAT) to RatForCausalLM.

    python -m modeling_rat.convert_official CHECKPOINT --layer-pattern rat-swa --chunk-size 16 --window 1024 --output DIR

CHECKPOINT is what the official trainer saves (`{"task": state_dict, "config": training config, ...}`, keys possibly
prefixed `_orig_mod.` by torch.compile) or a bare state dict. The weights fix the vocabulary, the width, the depth and
the width of the RAT layers' queries and keys (G·d: key/query groups times head size). What they do not fix is read
from the training config when the checkpoint carries one, else given on the command line:

    --layer-pattern   which of the paper's five models (rat, rnn, attention, rat-swa, attention-swa)
    --num-heads       H; for models with RAT layers it follows from the weights and G (below) and may be left out
    --num-qk-groups   G, the official `ngroups` (default 2, the official default)
    --chunk-size      L, for RAT layers
    --window          the official `window_size` W of sliding-window layers (a query sees W + 1 tokens; the config
                      stores sliding_window = W + 1)

The paper's 1.3B models: hidden size 2048, 24 layers, 16 heads of size 128, 2 key/query groups, chunk size 16,
window_size 1024 for the sliding-window layers of rat-swa and attention-swa, vocabulary 32000 (Llama-2 tokenizer:
--bos-token-id 1 --eos-token-id 2).

The converter prints the geometry it used and where each value came from, and refuses what cannot be right: a head
count that does not divide the width or does not fit the RAT layers' q/k rows, a group count that does not divide the
heads, options that contradict the training config or that the layer pattern does not use, weights that are not
finite. Nothing is written unless the whole checkpoint converts: a foreign or damaged checkpoint gets an error that
names the missing or unexpected keys, or the mismatched shapes.
"""

import argparse
import logging
import re
import shutil
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from .configuration_rat import PAPER_LAYER_PATTERNS, RatConfig


logger = logging.getLogger(__name__)

# The official code's default `ngroups`, used by the paper's models.
OFFICIAL_NUM_QK_GROUPS = 2
PAPER_GEOMETRY = "hidden size 2048, 16 heads of size 128, 2 key/query groups, chunk size 16, window_size 1024"
# The official layer names (`_name_` of a sequence cell) -> RAT layer types.
OFFICIAL_LAYER_TYPES = {"rat": "rat", "rnn": "rnn", "attention": "full_attention", "local_attention": "sliding_attention"}
_LAYER_KEY = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")


class OfficialCheckpointError(ValueError):
    """The file is not an official RAT checkpoint matching the given architecture."""


# ================================================================================================= reading


def load_official_checkpoint(checkpoint) -> tuple[dict, dict | None]:
    """
    The state dict of an official checkpoint (a path, a `{"task": ..., "config": ...}` dict or a bare state dict), with
    `_orig_mod.` prefixes stripped, and its training config if it carries one.
    """
    if not isinstance(checkpoint, dict):
        path = Path(checkpoint)
        if not path.is_file():
            raise OfficialCheckpointError(f"No checkpoint file at {path}.")
        try:
            # The official trainer saves its training config as an `easydict.EasyDict` (a dict subclass whose
            # attributes mirror its items): read it as an OrderedDict, which `weights_only` loading may fill and give
            # attributes, so that neither easydict nor unpickling arbitrary code is needed.
            with torch.serialization.safe_globals([(OrderedDict, "easydict.EasyDict")]):
                checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # truncated file, not a torch file, pickled code...
            raise OfficialCheckpointError(f"Cannot read {path} as a PyTorch checkpoint: {error}") from error
    if not isinstance(checkpoint, dict):
        raise OfficialCheckpointError(f"Expected a dict checkpoint, got {type(checkpoint).__name__}.")
    state = checkpoint.get("task", checkpoint)
    if not isinstance(state, dict) or not state:
        raise OfficialCheckpointError("The checkpoint's 'task' entry is not a state dict.")
    cleaned = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            raise OfficialCheckpointError(
                f"Entry {key!r} is a {type(value).__name__}, not a tensor: this is not an official RAT state dict "
                "(pass the file the official trainer saved, or its 'task' state dict)."
            )
        cleaned[key.replace("_orig_mod.", "")] = value
    training_config = checkpoint.get("config") if "task" in checkpoint else None
    return cleaned, training_config if isinstance(training_config, dict) else None


def read_training_config(training_config: dict) -> dict:
    """
    The architecture an official training config states (the resolved hydra config the trainer saves): `layer_types`,
    `num_heads`, `num_qk_groups`, `chunk_size`, `window` (official window_size), `rnn_forget_gate_init_length` (the
    training length), `rope_theta`; and `hidden_size`, `num_layers`, `vocab_size`, `intermediate_size`, `tie_word_embeddings`
    to check against the weights. Only what the config states is returned.
    """
    try:
        backbone = training_config["model"]["backbone"]
        if backbone["_name_"] not in ("sequence", "sequence_interleave"):
            raise OfficialCheckpointError(f"Unknown official backbone {backbone['_name_']!r} in the training config.")
        if backbone["_name_"] == "sequence_interleave":  # layer i uses seq_cell1 when i % interleave_step == 0
            step = backbone.get("interleave_step", 2)
            cells = [backbone["seq_cell1"] if i % step == 0 else backbone["seq_cell"] for i in range(backbone["num_layers"])]
        else:
            cells = [backbone["seq_cell"]] * backbone["num_layers"]
        unknown = sorted({cell["_name_"] for cell in cells} - set(OFFICIAL_LAYER_TYPES))
        if unknown:
            raise OfficialCheckpointError(f"The training config has layers {unknown}, which RAT models do not have.")
        if any(cell.get("k_channel", cell.get("d_head")) != cell.get("d_head") for cell in cells):
            raise OfficialCheckpointError("The training config's k_channel differs from d_head: RAT models tie them.")
        stated = {
            "layer_types": [OFFICIAL_LAYER_TYPES[cell["_name_"]] for cell in cells],
            "hidden_size": backbone["d_model"],
            "num_layers": backbone["num_layers"],
        }
        for option, key in (("num_heads", "num_head"), ("num_qk_groups", "ngroups"), ("chunk_size", "chunk_size"), ("window", "window_size")):
            values = {cell[key] for cell in cells if cell.get(key) is not None and (key != "ngroups" or cell["_name_"] == "rat")}
            if len(values) > 1:
                raise OfficialCheckpointError(
                    f"The training config gives its layers different {key} values {sorted(values)}: a RAT model has one."
                )
            if values:
                stated[option] = values.pop()
        hidden_cell = backbone.get("hidden_cell") or {}
        if hidden_cell.get("d_ffn") is not None:
            stated["intermediate_size"] = hidden_cell["d_ffn"]
        data = training_config.get("data") or {}
        if data.get("seq_len") is not None:
            stated["rnn_forget_gate_init_length"] = data["seq_len"]
        if data.get("vocab_size") is not None:
            stated["vocab_size"] = data["vocab_size"]
        base = ((training_config.get("model") or {}).get("embedding") or {}).get("pe", {}).get("base")
        if base is not None:
            stated["rope_theta"] = float(base)
        tie = (training_config.get("task") or {}).get("tie_embedding")
        if tie is not None:
            stated["tie_word_embeddings"] = bool(tie)
    except (KeyError, TypeError, AttributeError) as error:
        raise OfficialCheckpointError(
            f"The checkpoint's training config does not have the official layout (model.backbone...: {error!r}); give the "
            "architecture on the command line, or convert the 'task' state dict alone."
        ) from error
    return stated


# ================================================================================================ geometry


def _is_count(value, smallest: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= smallest


def _divisors(number: int) -> list[int]:
    return [d for d in range(1, number + 1) if number % d == 0]


def _fitting_head_counts(hidden_size: int, group_width: int) -> list[str]:
    """Head counts H (with their group counts G) for which the RAT q/k width G·d equals `group_width`, d = D / H."""
    fitting = []
    for heads in _divisors(hidden_size):
        head_dim = hidden_size // heads
        if group_width % head_dim == 0 and heads % (group_width // head_dim) == 0 and head_dim % 2 == 0:
            groups = group_width // head_dim
            fitting.append(f"{heads} (head size {head_dim}, {groups} group{'s' if groups > 1 else ''})")
    return fitting


def _infer_heads(hidden_size, group_width, has_attention, num_heads, num_qk_groups) -> tuple[int, int, str]:
    """
    (heads H, key/query groups G, how they were found). `group_width` is G·d, the width of the RAT layers' queries
    (None without RAT layers). Refuses every combination that does not fit the weights.
    """
    for option, value in (("--num-heads", num_heads), ("--num-qk-groups", num_qk_groups)):
        if value is not None and not _is_count(value):
            raise OfficialCheckpointError(f"{option} must be a positive integer, got {value!r}.")
    if num_heads is not None and hidden_size % num_heads:
        raise OfficialCheckpointError(
            f"--num-heads {num_heads} does not divide the hidden size {hidden_size}: head counts that do are "
            f"{_divisors(hidden_size)}."
        )
    if group_width is None:
        if num_heads is None and has_attention:
            raise OfficialCheckpointError(
                "Give --num-heads: attention layers do not reveal their head count in the weights (the paper's 1.3B "
                f"models: {PAPER_GEOMETRY})."
            )
        if num_heads is None:  # rnn layers have no heads
            return 1, 1, "unused by rnn layers"
        groups = num_qk_groups if num_qk_groups is not None else 1
        if num_heads % groups:
            raise OfficialCheckpointError(f"--num-qk-groups {groups} does not divide --num-heads {num_heads}.")
        return num_heads, groups, "unused without RAT layers"
    fitting = _fitting_head_counts(hidden_size, group_width)
    fits = f"Head counts that fit the weights: {', '.join(fitting) or 'none'}."
    if num_heads is not None:
        head_dim = hidden_size // num_heads
        if group_width % head_dim:
            raise OfficialCheckpointError(
                f"--num-heads {num_heads} (head size {head_dim}) does not fit the RAT layers, whose queries are "
                f"{group_width} wide (key/query groups × head size). {fits}"
            )
        groups = group_width // head_dim
        if num_qk_groups is None and groups != OFFICIAL_NUM_QK_GROUPS:
            raise OfficialCheckpointError(
                f"With --num-heads {num_heads} (head size {head_dim}) the RAT layers' {group_width}-wide queries would be "
                f"{groups} key/query groups, but the official default (ngroups) is {OFFICIAL_NUM_QK_GROUPS}. {fits} Check "
                f"--num-heads, or pass --num-qk-groups {groups} if the model was trained with ngroups={groups}."
            )
        if num_qk_groups is not None and groups != num_qk_groups:
            raise OfficialCheckpointError(
                f"--num-heads {num_heads} and --num-qk-groups {num_qk_groups} do not fit the RAT layers' {group_width}-wide "
                f"queries ({num_qk_groups} × {head_dim} = {num_qk_groups * head_dim}). {fits}"
            )
        how = f"the RAT queries are {group_width} wide = {groups} × head size {head_dim}"
    else:
        groups = num_qk_groups if num_qk_groups is not None else OFFICIAL_NUM_QK_GROUPS
        if group_width % groups or hidden_size % (group_width // groups):
            raise OfficialCheckpointError(
                f"The RAT layers' queries are {group_width} wide, which is not {groups} key/query groups of a head size "
                f"dividing the hidden size {hidden_size}: give --num-qk-groups (and --num-heads). {fits}"
            )
        head_dim = group_width // groups
        num_heads = hidden_size // head_dim
        how = f"the RAT queries are {group_width} wide = {groups} × head size {head_dim}"
    if num_heads % groups:
        raise OfficialCheckpointError(f"{groups} key/query groups do not divide {num_heads} heads: this combination cannot be right.")
    if (hidden_size // num_heads) % 2:
        raise OfficialCheckpointError(f"{num_heads} heads give an odd head size {hidden_size // num_heads}: rotary embeddings need it even.")
    return num_heads, groups, how


def _choose(option: str, given, stated):
    """A conversion option given on the command line and/or stated by the training config, which must agree."""
    if given is not None and stated is not None and given != stated:
        raise OfficialCheckpointError(
            f"{option} {given} disagrees with the checkpoint's training config ({stated}): leave {option} out, or check "
            "that this is the checkpoint you meant."
        )
    if given is not None:
        return given, "given"
    return stated, "training config" if stated is not None else None


# ============================================================================================== conversion


def official_to_rat(
    state: dict,
    num_heads: int | None = None,
    chunk_size: int | None = None,
    layer_pattern: str | None = None,
    window: int | None = None,
    num_qk_groups: int | None = None,
    training_config: dict | None = None,
    **config_overrides,
) -> tuple[RatConfig, dict, list[str]]:
    """
    Map an official state dict to (RatConfig, RatForCausalLM state dict, lines describing the geometry), checking every
    key, shape and value. Options left out are read from `training_config` (see `read_training_config`) or inferred
    from the weights where they can be.
    """
    stated = read_training_config(training_config) if training_config is not None else {}
    embedding = state.get("embedding.wte.weight")
    if embedding is None or embedding.dim() != 2:
        raise OfficialCheckpointError(
            "No 2-D 'embedding.wte.weight' in the checkpoint: this is not an official RAT checkpoint. Keys found: "
            f"{sorted(state)[:8]}{' ...' if len(state) > 8 else ''}"
        )
    vocab_size, hidden_size = embedding.shape
    layer_indices = sorted({int(m.group(1)) for m in map(_LAYER_KEY.match, state) if m})
    num_layers = len(layer_indices)
    if layer_indices != list(range(num_layers)) or num_layers == 0:
        raise OfficialCheckpointError(f"Layer indices are not 0..n-1: found {layer_indices}.")
    up = state.get("backbone.layers.0.hidden_layer.fc1.weight")
    intermediate_size = up.shape[0] if up is not None and up.dim() == 2 else 4 * hidden_size
    for option, value in (("hidden_size", hidden_size), ("num_layers", num_layers), ("vocab_size", vocab_size),
                          ("intermediate_size", intermediate_size)):
        if stated.get(option, value) != value:
            raise OfficialCheckpointError(f"The training config states {option} {stated[option]}, the weights {value}: they do not belong together.")

    if layer_pattern is not None and layer_pattern not in PAPER_LAYER_PATTERNS:
        raise OfficialCheckpointError(f"Unknown layer pattern {layer_pattern!r}: choose one of {list(PAPER_LAYER_PATTERNS)}.")
    given_types = [PAPER_LAYER_PATTERNS[layer_pattern](i) for i in range(num_layers)] if layer_pattern else None
    layer_types, types_source = _choose("--layer-pattern", given_types, stated.get("layer_types"))
    if layer_types is None:
        raise OfficialCheckpointError(
            f"Give --layer-pattern (one of {list(PAPER_LAYER_PATTERNS)}): this checkpoint carries no training config."
        )
    window, window_source = _choose("--window", window, stated.get("window"))
    has_sliding = "sliding_attention" in layer_types
    if has_sliding and window is None:
        raise OfficialCheckpointError("The layer pattern has sliding-window layers: give --window (official window_size; the paper's is 1024).")
    if window is not None and not has_sliding:
        raise OfficialCheckpointError(f"--window is for sliding-window layers, and the layers {sorted(set(layer_types))} have none: leave it out or check --layer-pattern.")
    if has_sliding and not _is_count(window, smallest=0):
        raise OfficialCheckpointError(
            f"--window must be an integer >= 0 (the official window_size W: a query sees W + 1 tokens), got {window!r}."
        )
    chunk_size, chunk_source = _choose("--chunk-size", chunk_size, stated.get("chunk_size"))
    if "rat" in layer_types and chunk_size is None:
        raise OfficialCheckpointError("Give --chunk-size: the chunk size of RAT layers is not in the weights (the paper's is 16).")
    if chunk_size is not None and not _is_count(chunk_size):
        raise OfficialCheckpointError(f"--chunk-size must be a positive integer (the paper's is 16), got {chunk_size!r}.")

    problems = [f"{key!r} holds NaN or infinite values" for key, tensor in state.items()
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    group_width = _rat_query_width(state, layer_types, hidden_size)
    num_heads, heads_source = _choose("--num-heads", num_heads, stated.get("num_heads"))
    num_qk_groups, groups_source = _choose("--num-qk-groups", num_qk_groups, stated.get("num_qk_groups"))
    if groups_source is None:
        groups_source = "inferred" if num_heads is not None else "the official default"
    has_attention = any(t in ("full_attention", "sliding_attention") for t in layer_types)
    num_heads, num_qk_groups, heads_how = _infer_heads(hidden_size, group_width, has_attention, num_heads, num_qk_groups)
    head_dim = hidden_size // num_heads

    converted = _convert_weights(state, layer_types, hidden_size, intermediate_size, num_qk_groups * head_dim, problems)
    head = state.get("head.lm_head.weight")
    tie_word_embeddings = head is None or (head.shape == embedding.shape and torch.equal(head, embedding))
    if head is not None and not tie_word_embeddings and head.shape == embedding.shape:
        converted["lm_head.weight"] = head
    if stated.get("tie_word_embeddings") and not tie_word_embeddings:
        problems.append("the training config ties the LM head to the embedding, but 'head.lm_head.weight' differs from it")
    if problems:
        raise OfficialCheckpointError("The checkpoint cannot be converted:\n  - " + "\n  - ".join(problems))
    for name in ("rnn_forget_gate_init_length", "rope_theta"):
        if name in stated:
            config_overrides.setdefault(name, stated[name])
    try:
        config = RatConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_qk_groups=num_qk_groups,
            chunk_size=chunk_size if chunk_size is not None else 16,  # unused without RAT layers
            layer_types=layer_types,
            sliding_window=window + 1 if has_sliding else None,
            tie_word_embeddings=tie_word_embeddings,
            **config_overrides,
        )
    except ValueError as error:
        raise OfficialCheckpointError(f"The converted configuration is invalid: {error}") from error
    geometry = [
        f"{num_layers} layers ({types_source}: {', '.join(dict.fromkeys(layer_types))}), hidden size {hidden_size}, "
        f"vocabulary {vocab_size}, MLP {intermediate_size}",
        f"heads: {num_heads} of size {head_dim} ({heads_source or 'inferred'}); key/query groups: {num_qk_groups} ({groups_source}; {heads_how})",
    ]
    if "rat" in layer_types:
        geometry.append(f"chunk size: {chunk_size} ({chunk_source})")
    if has_sliding:
        geometry.append(f"sliding window: official window_size {window} ({window_source}) -> sliding_window {window + 1}")
    geometry.append(f"(the paper's 1.3B models: {PAPER_GEOMETRY})")
    return config, {key: value.contiguous() for key, value in converted.items()}, geometry


def _rat_query_width(state, layer_types, hidden_size) -> int | None:
    """G·d, the width of the RAT layers' queries (and keys), from their in_proj rows (3·D + 2·G·d); None without RAT layers."""
    layers_by_rows = {}  # in_proj row count -> the layers that should be RAT layers and have it
    for i, layer_type in enumerate(layer_types):
        in_proj = state.get(f"backbone.layers.{i}.seq_layer.in_proj.weight")
        if layer_type == "rat" and in_proj is not None and in_proj.dim() == 2:
            layers_by_rows.setdefault(in_proj.shape[0], []).append(i)
    if len(layers_by_rows) > 1:
        listed = "; ".join(f"layers {layers}: {rows} rows" for rows, layers in sorted(layers_by_rows.items()))
        raise OfficialCheckpointError(
            f"The layers that --layer-pattern makes RAT layers have in_proj weights of different sizes ({listed}); "
            f"3·D = {3 * hidden_size} rows is an attention or rnn layer: check --layer-pattern."
        )
    if not layers_by_rows:
        return None
    qk_rows = next(iter(layers_by_rows)) - 3 * hidden_size
    if qk_rows <= 0 or qk_rows % 2:
        raise OfficialCheckpointError(
            f"A layer that should be a RAT layer has an in_proj of {qk_rows + 3 * hidden_size} rows; a RAT in_proj has "
            f"3·D + 2·G·d rows (D={hidden_size}): check --layer-pattern."
        )
    return qk_rows // 2


def _convert_weights(state, layer_types, hidden_size, intermediate_size, qk_width, problems) -> dict:
    """The RatForCausalLM state dict; every missing, misshaped or unexpected key is appended to `problems`."""
    used = set()

    def take(key, shape=None):
        if key not in state:
            problems.append(f"missing key {key!r}")
            return None
        used.add(key)
        if shape is not None and tuple(state[key].shape) != tuple(shape):
            problems.append(f"{key!r} has shape {tuple(state[key].shape)}, expected {tuple(shape)}")
            return None
        return state[key]

    embedding = take("embedding.wte.weight")
    converted = {"model.embed_tokens.weight": embedding, "model.norm.weight": take("backbone.ln.weight", (hidden_size,))}
    for i, layer_type in enumerate(layer_types):
        source, target = f"backbone.layers.{i}", f"model.layers.{i}"
        converted[f"{target}.mlp_norm.weight"] = take(f"{source}.hidden_layer.ln.weight", (hidden_size,))
        converted[f"{target}.mlp.up_proj.weight"] = take(f"{source}.hidden_layer.fc1.weight", (intermediate_size, hidden_size))
        converted[f"{target}.mlp.down_proj.weight"] = take(f"{source}.hidden_layer.fc2.weight", (hidden_size, intermediate_size))
        converted[f"{target}.mixer_norm.weight"] = take(f"{source}.seq_layer.input_norm.weight", (hidden_size,))
        converted[f"{target}.mixer.o_proj.weight"] = take(f"{source}.seq_layer.out_proj.weight", (hidden_size, hidden_size))
        in_proj = state.get(f"{source}.seq_layer.in_proj.weight")
        has_gate = f"{source}.seq_layer.gate_bias" in state
        if in_proj is None or in_proj.dim() != 2 or in_proj.shape[1] != hidden_size:
            problems.append(f"layer {i}: missing or malformed {source}.seq_layer.in_proj.weight")
            continue
        rows = in_proj.shape[0]
        if layer_type == "rat":
            if not has_gate or rows != 3 * hidden_size + 2 * qk_width:
                problems.append(
                    f"layer {i} should be a RAT layer but its in_proj has {rows} rows{'' if has_gate else ' and no gate_bias'}; "
                    f"a RAT in_proj has 3·D + 2·G·d = {3 * hidden_size + 2 * qk_width} rows here."
                )
                continue
            names, sizes = ["output_gate_proj", "v_proj", "forget_gate_proj", "q_proj", "k_proj"], [hidden_size] * 3 + [qk_width] * 2
        elif layer_type == "rnn":
            if not has_gate or rows != 3 * hidden_size:
                problems.append(f"layer {i} should be an rnn layer (in_proj 3·D rows and gate_bias) but has {rows} rows, gate_bias: {has_gate}")
                continue
            names, sizes = ["output_gate_proj", "v_proj", "forget_gate_proj"], [hidden_size] * 3
        else:  # full or sliding attention: rows v, q, k (value first)
            if has_gate or rows != 3 * hidden_size:
                problems.append(
                    f"layer {i} should be an attention layer ({layer_type}) with a 3·D-row in_proj and no gate_bias, but "
                    f"has {rows} rows, gate_bias: {has_gate}"
                )
                continue
            names, sizes = ["v_proj", "q_proj", "k_proj"], [hidden_size] * 3
        for name, weight in zip(names, torch.split(take(f"{source}.seq_layer.in_proj.weight"), sizes)):
            converted[f"{target}.mixer.{name}.weight"] = weight
        if layer_type in ("rat", "rnn"):
            converted[f"{target}.mixer.forget_gate_bias"] = take(f"{source}.seq_layer.gate_bias", (hidden_size,))
    head = state.get("head.lm_head.weight")
    if head is not None:
        used.add("head.lm_head.weight")
        if head.shape != embedding.shape:
            problems.append(f"'head.lm_head.weight' has shape {tuple(head.shape)}, expected {tuple(embedding.shape)}")
    unexpected = sorted(set(state) - used)
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    return converted


def new_folder_problem(folder: Path, option: str) -> str | None:
    """Why `folder` (given as `option`) cannot be an output folder: it is a file, a folder that is not empty, or lies
    under a file; None if it can."""
    if folder.exists() and not folder.is_dir():
        return f"{option} {folder} is a file: give the path of an empty or new folder."
    if folder.is_dir() and any(folder.iterdir()):
        return f"{option} {folder} exists and is not empty: give an empty or new folder."
    blocking = next((parent for parent in folder.parents if parent.exists() and not parent.is_dir()), None)
    if blocking is not None:
        return f"{option} {folder} cannot be created: {blocking} is a file, not a folder."
    return None


def _writing_folder(output_dir: Path) -> Path:
    """
    A new hidden folder beside `output_dir`, where the converted model is written before it is renamed to
    `output_dir`; made before any work, so that a place that cannot be written to is reported at once.
    """
    problem = new_folder_problem(output_dir, "--output")
    if problem:
        raise OfficialCheckpointError(problem)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".converting-", dir=output_dir.parent))
    except OSError as error:
        raise OfficialCheckpointError(f"Cannot write the converted model to --output {output_dir}: {error.strerror or error}.") from error


def convert_official_checkpoint(
    checkpoint,
    num_heads: int | None = None,
    chunk_size: int | None = None,
    layer_pattern: str | None = None,
    window: int | None = None,
    output_dir=None,
    dtype: torch.dtype | None = None,
    num_qk_groups: int | None = None,
    report=logger.info,
    **config_overrides,
):
    """
    Convert an official checkpoint to a `RatForCausalLM` (see `official_to_rat` for the options; `report` receives the
    geometry used, as text); with `output_dir`, also save it there (config.json, model.safetensors and the remote code).
    Nothing is written if anything fails.
    """
    from .modeling_rat import RatForCausalLM

    writing = _writing_folder(Path(output_dir)) if output_dir is not None else None
    try:
        state, training_config = load_official_checkpoint(checkpoint)
        config, converted, geometry = official_to_rat(
            state, num_heads, chunk_size, layer_pattern, window, num_qk_groups, training_config, **config_overrides
        )
        report("Geometry of the converted model:\n  " + "\n  ".join(geometry))
        with torch.device("meta"):
            model = RatForCausalLM(config)
        model.load_state_dict(converted, strict=not config.tie_word_embeddings, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
        model.eval()
        if dtype is not None:
            model = model.to(dtype)
        if writing is not None:
            try:
                model.save_pretrained(writing)
                if Path(output_dir).exists():
                    Path(output_dir).rmdir()
                writing.rename(output_dir)
            except OSError as error:
                raise OfficialCheckpointError(f"Cannot write the converted model to --output {output_dir}: {error.strerror or error}.") from error
    finally:
        if writing is not None and writing.exists():
            shutil.rmtree(writing)
    return model


CONFIG_OVERRIDE_ARGUMENTS = ("bos_token_id", "eos_token_id", "pad_token_id", "rnn_forget_gate_init_length")


def add_conversion_arguments(parser: argparse.ArgumentParser):
    """
    Add the architecture options of an official checkpoint (which its weights do not fix) to `parser`: `--layer-pattern`,
    `--num-heads`, `--num-qk-groups`, `--chunk-size`, `--window` and the config overrides. `hub_upload.py` shares them.
    """
    parser.add_argument(
        "--layer-pattern", choices=list(PAPER_LAYER_PATTERNS),
        help="which of the paper's five models (default: from the checkpoint's training config)",
    )
    parser.add_argument("--num-heads", type=int, help="attention heads H (16 in the paper's 1.3B models; inferred from the weights with RAT layers)")
    parser.add_argument("--num-qk-groups", type=int, help=f"key/query groups G, the official ngroups (default: {OFFICIAL_NUM_QK_GROUPS})")
    parser.add_argument("--chunk-size", type=int, help="chunk length L of RAT layers (16 in the paper)")
    parser.add_argument("--window", type=int, help="official window_size W of sliding layers (a query sees W + 1 tokens; 1024 in the paper)")
    parser.add_argument("--bos-token-id", type=int, help="beginning-of-sequence id (1 for the Llama-2 tokenizer)")
    parser.add_argument("--eos-token-id", type=int, help="end-of-sequence id (2 for the Llama-2 tokenizer)")
    parser.add_argument("--pad-token-id", type=int, help="padding id (none by default)")
    parser.add_argument(
        "--rnn-forget-gate-init-length", "--max-position-embeddings", type=int, dest="rnn_forget_gate_init_length",
        help="training context length, which sets the rnn layers' forget-gate initialisation (default: from the training "
        "config, else 2048; --max-position-embeddings is its former name)",
    )


def conversion_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of `convert_official_checkpoint` given on the command line (see `add_conversion_arguments`)."""
    names = ("num_heads", "chunk_size", "layer_pattern", "window", "num_qk_groups") + CONFIG_OVERRIDE_ARGUMENTS
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m modeling_rat.convert_official", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="official checkpoint file ({'task': state_dict, 'config': ...} or a bare state dict)")
    add_conversion_arguments(parser)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="save in this dtype (default: as stored)")
    parser.add_argument("--output", required=True, help="folder to create (must not exist, or be empty)")
    args = parser.parse_args(argv)
    try:
        model = convert_official_checkpoint(
            args.checkpoint, output_dir=args.output, dtype=getattr(torch, args.dtype) if args.dtype else None, report=print,
            **conversion_options(args),
        )
    except (OfficialCheckpointError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was written to {args.output}", file=sys.stderr)
        return 130
    print(f"Converted {args.checkpoint} -> {args.output}: {model.num_parameters():,} parameters.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
