"""Convert checkpoints of the official RAT code (github CLAIRE-Labo/RAT, Hub repo barpitf/RAT) to RatForCausalLM.

    python -m modeling_rat.convert_official CHECKPOINT --num-heads 16 --chunk-size 16 \
        --layer-pattern rat-swa --window 1024 --output DIR

CHECKPOINT is what the official trainer saves (`{"task": state_dict, ...}`, keys possibly prefixed `_orig_mod.` by
torch.compile) or a bare state dict. The number of heads, the chunk size, the window and the layer pattern are not
stored in official checkpoints and must be given; the key/query group count follows from the shapes. `--window` is
the official `window_size` W (a query sees W + 1 tokens); the config stores `sliding_window = W + 1`.

Nothing is written unless the whole checkpoint converts: a foreign or damaged checkpoint gets an error that names
the missing or unexpected keys, or the mismatched shapes.
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch


try:
    from .configuration_rat import PAPER_LAYER_PATTERNS, RatConfig
except ImportError:
    from configuration_rat import PAPER_LAYER_PATTERNS, RatConfig


class OfficialCheckpointError(ValueError):
    """The file is not an official RAT checkpoint matching the given architecture."""


_LAYER_KEY = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")


def load_official_state_dict(checkpoint) -> dict:
    """The state dict of an official checkpoint (path, `{"task": ...}` dict or bare state dict), prefixes stripped."""
    if isinstance(checkpoint, (str, os.PathLike)):
        path = Path(checkpoint)
        if not path.is_file():
            raise OfficialCheckpointError(f"No checkpoint file at {path}.")
        try:
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
    return cleaned


def _layer_types_for(pattern: str, num_layers: int) -> list[str]:
    if pattern not in PAPER_LAYER_PATTERNS:
        raise OfficialCheckpointError(f"Unknown layer pattern {pattern!r}: choose one of {list(PAPER_LAYER_PATTERNS)}.")
    return [PAPER_LAYER_PATTERNS[pattern](i) for i in range(num_layers)]


def official_to_rat(
    state: dict,
    num_heads: int,
    chunk_size: int,
    layer_pattern: str,
    window: int | None = None,
    **config_overrides,
) -> tuple[RatConfig, dict]:
    """Map an official state dict to (RatConfig, RatForCausalLM state dict), checking every key and shape."""
    problems = []

    def take(key, shape=None):
        if key not in state:
            problems.append(f"missing key {key!r}")
            return None
        tensor = state[key]
        used.add(key)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            problems.append(f"{key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            return None
        return tensor

    used = set()
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
    if hidden_size % num_heads:
        raise OfficialCheckpointError(f"--num-heads {num_heads} does not divide the hidden size {hidden_size}.")
    head_dim = hidden_size // num_heads
    layer_types = _layer_types_for(layer_pattern, num_layers)
    if "sliding_attention" in layer_types and window is None:
        raise OfficialCheckpointError(f"The '{layer_pattern}' pattern has sliding-window layers: give --window (official window_size).")
    up = state.get("backbone.layers.0.hidden_layer.fc1.weight")
    intermediate_size = up.shape[0] if up is not None else 4 * hidden_size

    converted = {"model.embed_tokens.weight": take("embedding.wte.weight")}
    converted["model.norm.weight"] = take("backbone.ln.weight", (hidden_size,))
    num_qk_groups = None
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
            qk_rows = rows - 3 * hidden_size
            if not has_gate or qk_rows <= 0 or qk_rows % (2 * head_dim):
                problems.append(
                    f"layer {i} should be a RAT layer (pattern '{layer_pattern}') but its in_proj has {rows} rows"
                    f"{'' if has_gate else ' and no gate_bias'}; a RAT in_proj has 3*D + 2*G*d rows (D={hidden_size}, "
                    f"d={head_dim})."
                )
                continue
            groups = qk_rows // (2 * head_dim)
            if num_qk_groups not in (None, groups):
                problems.append(f"layer {i} has {groups} key/query groups, earlier layers {num_qk_groups}")
            num_qk_groups = groups
            z, v, f, q, k = torch.split(take(f"{source}.seq_layer.in_proj.weight"), [hidden_size] * 3 + [groups * head_dim] * 2)
            names = ["output_gate_proj", "v_proj", "forget_gate_proj", "q_proj", "k_proj"]
            for name, weight in zip(names, (z, v, f, q, k)):
                converted[f"{target}.mixer.{name}.weight"] = weight
            converted[f"{target}.mixer.forget_gate_bias"] = take(f"{source}.seq_layer.gate_bias", (hidden_size,))
        elif layer_type == "rnn":
            if not has_gate or rows != 3 * hidden_size:
                problems.append(f"layer {i} should be an rnn layer (in_proj 3*D rows and gate_bias) but has {rows} rows, gate_bias: {has_gate}")
                continue
            z, v, f = torch.split(take(f"{source}.seq_layer.in_proj.weight"), hidden_size)
            for name, weight in zip(("output_gate_proj", "v_proj", "forget_gate_proj"), (z, v, f)):
                converted[f"{target}.mixer.{name}.weight"] = weight
            converted[f"{target}.mixer.forget_gate_bias"] = take(f"{source}.seq_layer.gate_bias", (hidden_size,))
        else:  # full or sliding attention: rows v, q, k (value first)
            if has_gate or rows != 3 * hidden_size:
                problems.append(
                    f"layer {i} should be an attention layer (pattern '{layer_pattern}': {layer_type}) with a 3*D-row "
                    f"in_proj and no gate_bias, but has {rows} rows, gate_bias: {has_gate}"
                )
                continue
            v, q, k = torch.split(take(f"{source}.seq_layer.in_proj.weight"), hidden_size)
            for name, weight in zip(("v_proj", "q_proj", "k_proj"), (v, q, k)):
                converted[f"{target}.mixer.{name}.weight"] = weight
    head = state.get("head.lm_head.weight")
    tie_word_embeddings = head is None or (head.shape == embedding.shape and torch.equal(head, embedding))
    if head is not None:
        if head.shape != embedding.shape:
            problems.append(f"'head.lm_head.weight' has shape {tuple(head.shape)}, expected {tuple(embedding.shape)}")
        used.add("head.lm_head.weight")
        if not tie_word_embeddings:
            converted["lm_head.weight"] = head
    unexpected = sorted(set(state) - used)
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    if problems:
        raise OfficialCheckpointError("The checkpoint does not match the given architecture:\n  - " + "\n  - ".join(problems))
    config = RatConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_qk_groups=num_qk_groups or 2,
        chunk_size=chunk_size,
        layer_types=layer_types,
        sliding_window=window + 1 if window is not None and "sliding_attention" in layer_types else None,
        tie_word_embeddings=tie_word_embeddings,
        **config_overrides,
    )
    return config, {key: value.contiguous() for key, value in converted.items()}


def convert_official_checkpoint(
    checkpoint,
    num_heads: int,
    chunk_size: int,
    layer_pattern: str,
    window: int | None = None,
    output_dir=None,
    dtype: torch.dtype | None = None,
    **config_overrides,
):
    """
    Convert an official checkpoint to a `RatForCausalLM`; with `output_dir`, also save it there (config.json,
    model.safetensors and the remote code). Nothing is written if anything fails.
    """
    try:
        from .modeling_rat import RatForCausalLM
    except ImportError:
        from modeling_rat import RatForCausalLM

    state = load_official_state_dict(checkpoint)
    config, converted = official_to_rat(state, num_heads, chunk_size, layer_pattern, window, **config_overrides)
    with torch.device("meta"):
        model = RatForCausalLM(config)
    model.load_state_dict(converted, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=output_dir.parent))
        try:
            model.save_pretrained(staging)
            if output_dir.exists():
                if any(output_dir.iterdir()):
                    raise FileExistsError(f"{output_dir} exists and is not empty; choose another --output.")
                output_dir.rmdir()
            staging.rename(output_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return model


CONFIG_OVERRIDE_ARGUMENTS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def add_conversion_arguments(parser: argparse.ArgumentParser, required: bool = True):
    """
    Add the architecture options of an official checkpoint (which it does not store) to `parser`: `--num-heads`,
    `--chunk-size`, `--layer-pattern`, `--window` and the config overrides. `hub_upload.py` shares them.
    """
    needed = " (required for an official checkpoint)" if not required else ""
    parser.add_argument("--num-heads", type=int, required=required, help=f"attention heads H (16 for the paper's 1.3B models){needed}")
    parser.add_argument("--chunk-size", type=int, required=required, help=f"chunk length L (16 in the paper){needed}")
    parser.add_argument(
        "--layer-pattern", required=required, choices=list(PAPER_LAYER_PATTERNS), help=f"which of the paper's five models{needed}"
    )
    parser.add_argument("--window", type=int, help="official window_size W of sliding layers (a query sees W + 1 tokens)")
    parser.add_argument("--bos-token-id", type=int, help="beginning-of-sequence id (1 for the Llama-2 tokenizer)")
    parser.add_argument("--eos-token-id", type=int, help="end-of-sequence id (2 for the Llama-2 tokenizer)")
    parser.add_argument("--pad-token-id", type=int, help="padding id (none by default)")
    parser.add_argument("--max-position-embeddings", type=int, help="training context length (informational)")


def conversion_overrides(args: argparse.Namespace) -> dict:
    """The `RatConfig` arguments given on the command line (see `add_conversion_arguments`)."""
    return {name: getattr(args, name) for name in CONFIG_OVERRIDE_ARGUMENTS if getattr(args, name, None) is not None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="official checkpoint file ({'task': state_dict} or a bare state dict)")
    add_conversion_arguments(parser)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="save in this dtype (default: as stored)")
    parser.add_argument("--output", required=True, help="directory to create (must not exist or be empty)")
    args = parser.parse_args(argv)
    try:
        model = convert_official_checkpoint(
            args.checkpoint, args.num_heads, args.chunk_size, args.layer_pattern, args.window, args.output,
            dtype=getattr(torch, args.dtype) if args.dtype else None, **conversion_overrides(args),
        )
    except (OfficialCheckpointError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"Converted {args.checkpoint} -> {args.output}: {model.num_parameters():,} parameters, layers "
        f"{model.config.layer_types}, chunk size {model.config.chunk_size}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
