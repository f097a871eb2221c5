"""Publish a RAT checkpoint on the Hugging Face Hub, checked before anything leaves the machine.

    python hub_upload.py SOURCE --repo-id OWNER/NAME [--dry-run] [--staging-dir DIR] [options]

SOURCE is a checkpoint directory written by `save_pretrained` (or a Trainer checkpoint folder), or an official RAT
checkpoint file (`.pth`/`.pt`, github CLAIRE-Labo/RAT) converted on the fly: give then the architecture it does not
store (`--num-heads`, `--chunk-size`, `--layer-pattern`, `--window` for sliding-window layers).

What happens, in order:

1. Load the source model with this package (a checkpoint folder must load completely: missing or unexpected weights,
   or weights that are not finite, stop here).
2. Stage the Hub folder: safetensors weights (sharded above `--max-shard-size`), `config.json` with an `auto_map`,
   the model's code (`configuration_rat.py`, `modeling_rat.py` and the modules it imports, taken from the installed
   package), `generation_config.json`, the tokenizer files (`--tokenizer`), and a model card `README.md`. Nothing
   else: optimizer states and pickled files of a training folder are never staged.
3. Validate in a separate Python process in which this package cannot be imported (and neither can triton, peft,
   trl or accelerate), as on the machine of someone who only has transformers: load the staged folder with
   `trust_remote_code=True`, run a forward pass and a short greedy generation on a left-padded batch, and compare
   them with the source model's; run the model card's usage snippet against the staged folder. Any failure refuses
   the upload and says why.
4. List the files and their sizes. With `--dry-run`, stop here: nothing touches the network.
5. Upload through huggingface_hub: `create_repo`, then everything in ONE commit (`upload_folder`), so that a failed
   upload leaves the repo as it was. Weights of an earlier upload that the new commit does not overwrite (other
   shard names) are deleted in that same commit. The token comes from `--token`, `HF_TOKEN` or the saved login
   (`hf auth login`).
"""

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# The Hub API calls, imported here so that tests can replace them on this module (no network in tests).
from huggingface_hub import create_branch, create_repo, get_token, repo_info, upload_folder


logger = logging.getLogger("hub_upload")

# This package's top-level modules. The validation process blocks them so that only the staged folder's code can run.
PACKAGE_MODULES = ("modeling_rat", "configuration_rat", "hub_upload", "cache_rat", "rat_ops", "rat_triton", "convert_official")
# Optional dependencies the remote code must do without: the validation process runs as if they were not installed.
OPTIONAL_DEPENDENCIES = ("triton", "peft", "trl", "accelerate")
# Files that unpickle code when loaded: never staged for upload.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
# Weights of an earlier upload that the new commit does not overwrite are deleted in that commit (a stale
# `model.safetensors` next to a new sharded index would otherwise be loaded instead of the new weights).
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json"]
# Tokenizer files looked for in a checkpoint directory when `--tokenizer` is not given.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
PAPER = "https://arxiv.org/abs/2507.04416"
DEFAULT_LICENSE = "apache-2.0"


class HubUploadError(Exception):
    """A refusal with a message that says what was wrong and what to do; `main` prints it and exits with status 2."""


# =============================================================================================== isolated validation


class _PackageBlocker:
    """Meta-path finder, first on `sys.meta_path`, that makes this package's modules unimportable."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked: only the checkpoint's own code may run)", name=fullname)
        return None


def isolate_from_package(optional_dependencies=()):
    """
    Make this process look like a machine without rat-transformers: its modules cannot be imported (a blocker first on
    `sys.meta_path`; the finder of an editable install removed), nor can `optional_dependencies` (marked absent in
    `sys.modules`, which is also what `importlib.util.find_spec` and transformers' availability checks see).
    """
    sys.meta_path[:] = [finder for finder in sys.meta_path if not _is_editable_finder(finder)]
    sys.meta_path.insert(0, _PackageBlocker(PACKAGE_MODULES))
    for name in list(sys.modules):
        if name.partition(".")[0] in PACKAGE_MODULES:
            del sys.modules[name]
    for name in optional_dependencies:
        sys.modules[name] = None


def _is_editable_finder(finder) -> bool:
    module = getattr(finder, "__module__", None) or type(finder).__module__
    return module.startswith("__editable__")


# Runs in the validation process: loads this file by path (it is not importable there) and calls the check.
_BOOTSTRAP = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("rat_isolated_check", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.exit(module.isolated_check_main(sys.argv[2:]))
"""


def isolated_check_main(argv) -> int:
    """
    Entry point of the validation process: `FOLDER PROBE OUTPUT [BLOCKED_DEPENDENCY ...]`. Loads FOLDER with
    `trust_remote_code=True` and saves to OUTPUT what the probe asks for (see `run_isolated_check`).
    """
    folder, probe_path, output_path, *blocked = argv
    isolate_from_package(blocked)
    import importlib

    for name in ("modeling_rat", "configuration_rat"):
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        raise RuntimeError(f"Isolation failed: `{name}` can still be imported.")

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.dynamic_module_utils import check_imports

    # Loading from a local folder checks the imports of the requested module only; loading from the Hub checks every
    # file of the bundle. Check them all here, so that a kernel module whose guarded import works locally but whose
    # own `import triton` is unguarded is caught before it breaks loading from the Hub.
    for module_file in sorted(Path(folder).glob("*.py")):
        try:
            check_imports(module_file)
        except ImportError as error:
            missing = getattr(error, "name", None) or str(error)
            raise ImportError(
                f"{module_file.name} imports {missing!r} outside a `try:` block: transformers refuses to load this folder "
                f"from the Hub where {missing!r} is not installed. Guard that import (try/except ImportError)."
            ) from error
    probe = torch.load(probe_path, weights_only=True)
    result = {"blocked_dependencies": sorted(name for name in blocked if sys.modules.get(name, 0) is None)}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    result.update(_probe_outputs(model, probe))
    result["model_class"] = f"{type(model).__module__}.{type(model).__qualname__}"
    result["config_class"] = f"{type(model.config).__module__}.{type(model.config).__qualname__}"
    result["loaded_optional_dependencies"] = sorted(name for name in OPTIONAL_DEPENDENCIES if sys.modules.get(name) is not None)
    if probe.get("resave"):
        with tempfile.TemporaryDirectory() as resaved:
            model.save_pretrained(resaved)
            del model
            result["resaved_files"] = sorted(path.name for path in Path(resaved).iterdir())
            result["resaved_code"] = {path.name: path.read_text(encoding="utf-8") for path in Path(resaved).glob("*.py")}
            reloaded = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True).eval()
            result["resaved_logits"] = _probe_outputs(reloaded, probe)["logits"]
            result["resaved_model_class"] = f"{type(reloaded).__module__}.{type(reloaded).__qualname__}"
            del reloaded
    else:
        del model
    if (Path(folder) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        # AutoTokenizer reads config.json to choose the tokenizer class; without the package only the folder's
        # code can read a RAT config, hence trust_remote_code here too.
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        result["tokenizer_size"] = len(tokenizer)
        result["tokenizer_round_trip"] = tokenizer.decode(tokenizer("Hello world").input_ids, skip_special_tokens=True)
    snippet = probe.get("snippet")
    if snippet:
        import contextlib
        import io

        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            exec(compile(snippet, "<model card usage snippet>", "exec"), {"__name__": "__main__"})
        result["snippet_output"] = captured.getvalue()
    torch.save(result, output_path)
    return 0


def _probe_outputs(model, probe) -> dict:
    import torch

    with torch.no_grad():
        logits = model(probe["input_ids"], attention_mask=probe["attention_mask"], use_cache=False).logits
        outputs = {"logits": logits.float()}
        if probe.get("max_new_tokens"):
            outputs["generated"] = model.generate(
                probe["input_ids"],
                attention_mask=probe["attention_mask"],
                max_new_tokens=int(probe["max_new_tokens"]),
                do_sample=False,
                num_beams=1,
                pad_token_id=int(probe["pad_token_id"]),
            )
    return outputs


def run_isolated_check(folder, probe: dict, optional_dependencies=OPTIONAL_DEPENDENCIES, timeout: float | None = None) -> dict:
    """
    Load `folder` with `trust_remote_code=True` in a fresh Python process in which this package (and
    `optional_dependencies`) cannot be imported, and return what it computed on `probe`:

    * `probe`: `input_ids`, `attention_mask` (run through forward: `logits`, and, with `max_new_tokens` and
      `pad_token_id`, greedy `generate`: `generated`); `resave: True` also saves the loaded model again, reloads it
      (`resaved_logits`, `resaved_files`, `resaved_code`); `snippet`: Python code to run after the checks.
    * Also returned: the classes that were loaded (`model_class`, `config_class`, which must come from transformers'
      module cache) and, if the folder has a tokenizer, `tokenizer_size`.

    Raises `HubUploadError` with the process's error output when anything fails.
    """
    import torch

    with tempfile.TemporaryDirectory(prefix="rat-isolated-") as workdir:
        workdir = Path(workdir)
        probe_path, output_path = workdir / "probe.pt", workdir / "result.pt"
        torch.save(probe, probe_path)
        environment = dict(os.environ)
        # A fresh module cache: only the folder's code can be found, and the user's cache is left alone.
        environment["HF_MODULES_CACHE"] = str(workdir / "modules")
        environment["HF_HUB_OFFLINE"] = "1"
        environment.setdefault("TOKENIZERS_PARALLELISM", "false")
        # The process runs in its own folder: give it an absolute path (a relative one would be read as a repo id).
        command = [sys.executable, "-I", "-c", _BOOTSTRAP, str(Path(__file__).resolve()), str(Path(folder).resolve()),
                   str(probe_path), str(output_path)]
        command += list(optional_dependencies)
        try:
            completed = subprocess.run(command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise HubUploadError(f"Loading {folder} with trust_remote_code took longer than {timeout} s.") from error
        if completed.returncode != 0 or not output_path.is_file():
            details = (completed.stderr or completed.stdout).strip()
            raise HubUploadError(
                f"{folder} does not load with `trust_remote_code=True` on a machine without rat-transformers (exit "
                f"status {completed.returncode}):\n{_tail(details, 40)}"
            )
        return torch.load(output_path, weights_only=True)


def _tail(text: str, lines: int) -> str:
    kept = text.splitlines()[-lines:]
    return textwrap.indent("\n".join(kept), "    ")


# ========================================================================================================= source

# Options that describe an official checkpoint file; a checkpoint folder's config.json already says all of that.
_CONVERSION_ONLY = ("num_heads", "chunk_size", "layer_pattern", "window", "bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")


def load_source_model(source, args: argparse.Namespace | None = None):
    """
    The model to publish: a checkpoint directory loaded with this package (it must load completely), or an official
    checkpoint file converted with the architecture options of `args` (see `modeling_rat.convert_official`).
    """
    import torch

    from modeling_rat import RatForCausalLM
    from modeling_rat.convert_official import OfficialCheckpointError, conversion_overrides, convert_official_checkpoint

    source = Path(source)
    dtype = getattr(torch, args.dtype) if args is not None and args.dtype else None
    if source.is_dir():
        given = [f"--{name.replace('_', '-')}" for name in _CONVERSION_ONLY if args is not None and getattr(args, name, None) is not None]
        if given:
            raise HubUploadError(f"{', '.join(given)} describe an official checkpoint file; {source} is a checkpoint folder, whose config.json says all that.")
        config_path = source / "config.json"
        if not config_path.is_file():
            if (source / "adapter_config.json").is_file():
                raise HubUploadError(
                    f"{source} holds a PEFT adapter, not a model: merge it into its base model first "
                    "(`model.merge_and_unload().save_pretrained(...)`) and publish that folder."
                )
            raise HubUploadError(f"{source} has no config.json: give a folder written by `save_pretrained` or an official .pth file.")
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        if model_type != "rat":
            raise HubUploadError(f"{config_path} describes a {model_type!r} model, not a RAT model (model_type 'rat').")
        try:
            model, info = RatForCausalLM.from_pretrained(source, dtype="auto", output_loading_info=True)
        except (OSError, ValueError) as error:
            raise HubUploadError(f"Cannot load {source}: {error}") from error
        problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {kind: keys for kind, keys in problems.items() if keys}
        if problems:
            listed = "; ".join(f"{kind.replace('_', ' ')}: {keys[:6]}{' ...' if len(keys) > 6 else ''}" for kind, keys in problems.items())
            raise HubUploadError(f"{source} does not hold a complete RAT model ({listed}): refusing to publish partly random weights.")
    elif source.is_file():
        if args is None or args.num_heads is None or args.chunk_size is None or args.layer_pattern is None:
            raise HubUploadError(
                f"{source} is a file, so it is converted as an official RAT checkpoint, which does not store its architecture: "
                "give --num-heads, --chunk-size and --layer-pattern (and --window for sliding-window layers)."
            )
        try:
            model = convert_official_checkpoint(
                source, args.num_heads, args.chunk_size, args.layer_pattern, args.window, **conversion_overrides(args)
            )
        except (OfficialCheckpointError, ValueError) as error:
            raise HubUploadError(f"Cannot convert {source}: {error}") from error
    else:
        raise HubUploadError(f"{source} does not exist: give a checkpoint folder or an official .pth checkpoint file.")
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise HubUploadError(f"Parameter {name} holds NaN or infinite values: refusing to publish a broken checkpoint.")
    return model


def load_tokenizer(name_or_path, model):
    """The tokenizer to publish with `model`; fills the model's missing special-token ids from it."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as error:
        raise HubUploadError(f"Cannot load the tokenizer {name_or_path}: {error}") from error
    if len(tokenizer) > model.config.vocab_size:
        raise HubUploadError(
            f"The tokenizer {name_or_path} has {len(tokenizer)} tokens but the model embeds only {model.config.vocab_size}: "
            "ids beyond that would fail. Give the tokenizer the model was trained with."
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = getattr(tokenizer, name, None)
        if token_id is not None and getattr(model.config, name) is None:
            logger.info(f"Setting {name}={token_id} from the tokenizer (the model config had none).")
            setattr(model.config, name, token_id)
            setattr(model.generation_config, name, token_id)
    return tokenizer


# ======================================================================================================== staging


def stage_checkpoint(model, staging_dir, repo_id: str, tokenizer=None, max_shard_size="5GB", card_options: dict | None = None) -> Path:
    """
    Write everything the Hub repo needs into `staging_dir` (which must be empty or not exist): weights as
    safetensors, config and code bundle, generation config, tokenizer, model card.
    """
    staging_dir = Path(staging_dir)
    if staging_dir.exists() and (not staging_dir.is_dir() or any(staging_dir.iterdir())):
        raise HubUploadError(f"The staging directory {staging_dir} is not empty: give an empty or new directory, so that no stray file gets uploaded.")
    staging_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging_dir, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging_dir)
    card = model_card(model, repo_id, has_tokenizer=tokenizer is not None, **(card_options or {}))
    (staging_dir / "README.md").write_text(card, encoding="utf-8")
    pickled = [path.name for path in staging_dir.rglob("*") if path.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise HubUploadError(f"Staging produced pickled files {pickled}, which run code when loaded: refusing to upload them.")
    return staging_dir


def staged_files(staging_dir) -> list[tuple[str, int]]:
    """(path relative to the folder, size in bytes) of every staged file, sorted."""
    staging_dir = Path(staging_dir)
    return sorted((path.relative_to(staging_dir).as_posix(), path.stat().st_size) for path in staging_dir.rglob("*") if path.is_file())


def format_size(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


# ===================================================================================================== model card


def _format_count(count: int) -> str:
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return str(count)


def describe_layer_pattern(layer_types: list[str]) -> str:
    """`['rat', 'sliding_attention'] * 12` -> "`rat`, `sliding_attention` alternating (24 layers)"-like text."""
    count = len(layer_types)
    for period in range(1, count + 1):
        if count % period == 0 and layer_types == layer_types[:period] * (count // period):
            break
    unit = ", ".join(f"`{layer_type}`" for layer_type in layer_types[:period])
    if period == 1:
        return f"{count} × {unit}"
    if period == count:
        return f"{unit} ({count} layers)"
    return f"({unit}) × {count // period} ({count} layers)"


def paper_model_name(layer_types: list[str]) -> str | None:
    """Which of the paper's five models this layer pattern is, if any."""
    try:
        from configuration_rat import PAPER_LAYER_PATTERNS
    except ImportError:
        return None
    for name, pattern in PAPER_LAYER_PATTERNS.items():
        if layer_types == [pattern(i) for i in range(len(layer_types))]:
            return name
    return None


def usage_snippet(repo_id: str, has_tokenizer: bool, vocab_size: int) -> str:
    """The model card's Python example. Validation runs it against the staged folder."""
    if has_tokenizer:
        return textwrap.dedent(
            f"""\
            from transformers import AutoModelForCausalLM, AutoTokenizer

            repo_id = "{repo_id}"
            tokenizer = AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)
            model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)

            inputs = tokenizer("The capital of France is", return_tensors="pt")
            outputs = model.generate(**inputs, max_new_tokens=20, do_sample=False)
            print(tokenizer.decode(outputs[0], skip_special_tokens=True))
            """
        )
    example_ids = list(range(1, min(9, vocab_size)))
    return textwrap.dedent(
        f"""\
        import torch
        from transformers import AutoModelForCausalLM

        repo_id = "{repo_id}"
        model = AutoModelForCausalLM.from_pretrained(repo_id, trust_remote_code=True)

        # This repository has no tokenizer: use the one the model was trained with to make token ids.
        input_ids = torch.tensor([{example_ids}])
        outputs = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=20, do_sample=False)
        print(outputs[0].tolist())
        """
    )


def extract_usage_snippet(card: str) -> str:
    """The first ```python block of a model card."""
    match = re.search(r"```python\n(.*?)```", card, flags=re.DOTALL)
    if match is None:
        raise HubUploadError("The model card has no ```python usage block.")
    return match.group(1)


def _flatten_metrics(metrics: dict, prefix: str = "") -> list[tuple[str, object]]:
    rows = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            rows.extend(_flatten_metrics(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows


def _format_metric(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "\\|")
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def model_card(
    model,
    repo_id: str,
    has_tokenizer: bool = False,
    license: str = DEFAULT_LICENSE,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    metrics: dict | None = None,
    tags: list[str] | None = None,
    model_name: str | None = None,
    description: str | None = None,
) -> str:
    """The model card (`README.md`): YAML metadata, description, usage, architecture, results, citation."""
    from huggingface_hub import ModelCardData

    config = model.config
    layer_types = list(config.layer_types)
    paper_model = paper_model_name(layer_types)
    all_tags = ["rat", "text-generation", "custom_code"] + [t for t in (paper_model,) if t] + list(tags or [])
    all_tags = list(dict.fromkeys(all_tags))
    metadata = ModelCardData(
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=all_tags,
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
    )
    parameters = model.num_parameters()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    title = model_name or repo_id.split("/")[-1]
    lines = ["---", metadata.to_yaml().strip(), "---", "", f"# {title}", ""]
    summary = description or (
        f"A {_format_count(parameters)}-parameter RAT language model"
        + (f" (the paper's `{paper_model}` layout)" if paper_model else "")
        + "."
    )
    lines += [summary, ""]
    if base_model:
        lines += [f"Fine-tuned from [{base_model}](https://huggingface.co/{base_model}).", ""]
    if datasets:
        lines += ["Trained on " + ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets) + ".", ""]
    lines += [
        f"RAT ([Wei et al., 2025]({PAPER})) cuts the sequence into chunks: inside a chunk a gated linear recurrence",
        "summarises keys and values, across chunks every token attends with softmax attention to the summaries of all",
        "earlier chunks plus its own running summary. Chunk size 1 is close to attention, a chunk as long as the",
        "sequence is an RNN; the decoding cache is `chunk_size` times smaller than a key/value cache.",
        "",
        "## Usage",
        "",
        "The model's code is in this repository (`modeling_rat.py` and the files it imports), hence",
        "`trust_remote_code=True`; it needs only `torch` and `transformers`."
        + (
            " The tokenizer needs it too: transformers reads the model's configuration to pick the tokenizer class, "
            "and that configuration is part of the code."
            if has_tokenizer
            else ""
        ),
        "",
        "```python",
        usage_snippet(repo_id, has_tokenizer, config.vocab_size).rstrip("\n"),
        "```",
        "",
        "With the `rat-transformers` package installed, `import modeling_rat` registers RAT with the Auto classes: the",
        "same calls then use the installed code, and `trust_remote_code` is not needed.",
        "",
        "## Architecture",
        "",
        "| | |",
        "|---|---|",
        f"| Parameters | {_format_count(parameters)} ({parameters:,}) |",
        f"| Layers | {describe_layer_pattern(layer_types)} |",
        f"| Hidden size | {config.hidden_size} (MLP {config.intermediate_size}, {config.hidden_act}) |",
        f"| Heads | {config.num_attention_heads} of size {config.head_dim}; {config.num_qk_groups} key/query groups in RAT layers |",
    ]
    if any(t == "rat" for t in layer_types):
        lines.append(f"| Chunk size | {config.chunk_size} |")
    if "sliding_attention" in layer_types:
        lines.append(
            f"| Sliding window | {config.sliding_window} tokens, the query included (official `window_size` {config.sliding_window - 1}) |"
        )
    lines += [
        f"| Vocabulary | {config.vocab_size} |",
        f"| Context length | {config.max_position_embeddings} tokens (`max_position_embeddings`; rotary positions do not cap it) |",
        f"| Weights | safetensors, {dtype} |",
        "",
    ]
    if metrics:
        lines += ["## Training and evaluation results", "", "| Metric | Value |", "|---|---|"]
        lines += [f"| {name} | {_format_metric(value)} |" for name, value in _flatten_metrics(metrics)]
        lines.append("")
    lines += [
        "## Citation",
        "",
        "```bibtex",
        "@article{wei2025rat,",
        "  title   = {RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling},",
        "  author  = {Wei and Yadav and Pascanu and Gulcehre},",
        "  journal = {arXiv preprint arXiv:2507.04416},",
        "  year    = {2025}",
        "}",
        "```",
        "",
    ]
    return "\n".join(lines)


# ===================================================================================================== validation


def make_probe(config, seed: int = 0, max_new_tokens: int = 6) -> dict:
    """A left-padded batch of two rows, longer than two chunks, for comparing a staged folder with its source."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    length = min(max(2 * config.chunk_size + 3, 12), 96)
    input_ids = torch.randint(0, config.vocab_size, (2, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    pad_token_id = next((i for i in (config.pad_token_id, config.eos_token_id, 0) if isinstance(i, int)), 0)
    padding = min(3, length - 1)
    input_ids[1, :padding] = pad_token_id
    attention_mask[1, :padding] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": max_new_tokens, "pad_token_id": pad_token_id}


def logits_tolerance(dtype) -> tuple[float, float]:
    """
    (atol, rtol) for logits of the same weights run by the same code in two processes: only the order of floating
    point reductions may differ. Half-precision weights round every intermediate, hence the looser bound.
    """
    import torch

    return (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 2e-2)


def compare_outputs(reference: dict, loaded: dict, attention_mask, dtype, what: str = "the staged folder") -> list[str]:
    """Differences between the source model's outputs and those computed from the staged folder (empty if none)."""
    problems = []
    valid = attention_mask.bool()
    expected, actual = reference["logits"], loaded["logits"]
    if actual.shape != expected.shape:
        return [f"{what} gives logits of shape {tuple(actual.shape)}, the source model {tuple(expected.shape)}"]
    atol, rtol = logits_tolerance(dtype)
    error = (actual - expected).abs()[valid].max().item()
    bound = atol + rtol * expected[valid].abs().max().item()
    if not error <= bound:
        problems.append(f"{what} gives logits that differ from the source model's by up to {error:.3g} (allowed {bound:.3g})")
    if "generated" in reference:
        generated, expected_generated = loaded.get("generated"), reference["generated"]
        if generated is None or generated.shape != expected_generated.shape or not bool((generated == expected_generated).all()):
            problems.append(
                f"greedy generation from {what} differs from the source model's: {None if generated is None else generated.tolist()} "
                f"instead of {expected_generated.tolist()}"
            )
    return problems


def validate_staged_folder(model, staging_dir, timeout: float | None = None) -> dict:
    """
    Check that `staging_dir` works on a machine without this package (see `run_isolated_check`) and computes what
    `model` computes; run the model card's snippet against it. Raises `HubUploadError` on any difference.
    """
    import torch

    staging_dir = Path(staging_dir)
    config = json.loads((staging_dir / "config.json").read_text(encoding="utf-8"))
    expected_map = {"AutoConfig": "configuration_rat.RatConfig", "AutoModel": "modeling_rat.RatModel", "AutoModelForCausalLM": "modeling_rat.RatForCausalLM"}
    if config.get("auto_map") != expected_map:
        raise HubUploadError(f"The staged config.json has auto_map {config.get('auto_map')}, expected {expected_map}.")
    probe = make_probe(model.config)
    with torch.no_grad():
        reference = {
            "logits": model(probe["input_ids"], attention_mask=probe["attention_mask"], use_cache=False).logits.float(),
            "generated": model.generate(
                probe["input_ids"], attention_mask=probe["attention_mask"], max_new_tokens=probe["max_new_tokens"],
                do_sample=False, num_beams=1, pad_token_id=probe["pad_token_id"],
            ),
        }
    card = (staging_dir / "README.md").read_text(encoding="utf-8")
    repo_id = re.search(r'repo_id = "([^"]+)"', card)
    snippet = extract_usage_snippet(card)
    if repo_id is not None:
        snippet = snippet.replace(f'"{repo_id.group(1)}"', repr(str(staging_dir.resolve())))
    probe["snippet"] = snippet
    loaded = run_isolated_check(staging_dir, probe, timeout=timeout)
    problems = compare_outputs(reference, loaded, probe["attention_mask"], next(model.parameters()).dtype)
    if not loaded["model_class"].startswith("transformers_modules."):
        problems.append(f"the model class came from {loaded['model_class']}, not from the folder's code")
    if (staging_dir / "tokenizer_config.json").is_file():
        size = loaded.get("tokenizer_size")
        if size is None or size > model.config.vocab_size:
            problems.append(f"the staged tokenizer has {size} tokens for a vocabulary of {model.config.vocab_size}")
    logger.info(f"The model card's usage snippet ran against the staged folder; it printed: {loaded.get('snippet_output', '').strip()[:200]}")
    if problems:
        raise HubUploadError("Validation failed, nothing was uploaded:\n  - " + "\n  - ".join(problems))
    return loaded


# ========================================================================================================= upload


def _transport_errors() -> tuple[type, ...]:
    errors = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            error = getattr(module, name, None)
            if isinstance(error, type) and issubclass(error, BaseException):
                errors.append(error)
    return tuple(errors)


def hub_error_message(error: BaseException, repo_id: str, revision: str | None = None) -> str:
    """A message that says what went wrong with the Hub and what to do about it."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError

    owner = repo_id.split("/")[0]
    if isinstance(error, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so the Hub cannot be reached: unset it to upload, or use --dry-run to stage only."
    if isinstance(error, RevisionNotFoundError):
        return f"The revision {revision!r} of {repo_id} does not exist and could not be created: check --revision."
    if isinstance(error, RepositoryNotFoundError):
        return (
            f"{repo_id} was not found, or your token cannot see it: check --repo-id, and that the token belongs to "
            f"{owner!r} or to a member of that organization."
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        server = f" (the Hub said: {error.server_message.strip()})" if getattr(error, "server_message", None) else ""
        if status == 401:
            return f"The Hub rejected the token (401){server}: it is invalid or expired. Log in again with `hf auth login` or pass another --token."
        if status == 403:
            return (
                f"Your token may not write to {repo_id} (403){server}: the namespace {owner!r} belongs to someone else "
                "or the token is read-only. Use a repo id under your own user name or an organization you can write "
                "to, or a token with write access."
            )
        if status is not None and status >= 500:
            return f"The Hub failed ({status}){server}; nothing was committed. Try again later."
        return f"The Hub refused the upload ({status}){server}: {error}"
    if isinstance(error, _transport_errors()):
        return (
            f"Could not reach the Hugging Face Hub ({type(error).__name__}: {error}): check the network connection "
            "(and HF_ENDPOINT or proxy settings); nothing was uploaded. --dry-run stages without the network."
        )
    return f"Upload failed ({type(error).__name__}: {error}); nothing was committed."


def resolve_token(token: str | None) -> str:
    token = token or get_token()
    if not token:
        raise HubUploadError(
            "No Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --token (a token with write access)."
        )
    return token


def upload_staged_folder(
    staging_dir,
    repo_id: str,
    token: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload RAT model",
):
    """Create the repo if needed and upload the staged folder as one commit; returns the commit info."""
    try:
        repo_id = create_repo(repo_id, token=token, private=private or None, exist_ok=True, repo_type="model").repo_id
        if private and not repo_info(repo_id, token=token, repo_type="model").private:
            raise HubUploadError(
                f"{repo_id} already exists and is public; --private does not change an existing repo. Make it private "
                "on the Hub first, or drop --private."
            )
        if revision and revision != "main":
            create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
        return upload_folder(
            repo_id=repo_id,
            folder_path=str(staging_dir),
            commit_message=commit_message,
            revision=revision,
            token=token,
            repo_type="model",
            delete_patterns=STALE_WEIGHT_PATTERNS,
        )
    except HubUploadError:
        raise
    except Exception as error:  # every huggingface_hub failure is mapped to a message that says what to do
        raise HubUploadError(hub_error_message(error, repo_id, revision)) from error


# =========================================================================================================== main


def build_parser() -> argparse.ArgumentParser:
    from modeling_rat.convert_official import add_conversion_arguments

    parser = argparse.ArgumentParser(
        prog="hub_upload.py", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="checkpoint folder (save_pretrained output) or official .pth checkpoint file")
    parser.add_argument("--repo-id", required=True, help="Hub repository OWNER/NAME (created if it does not exist)")
    parser.add_argument("--dry-run", action="store_true", help="stage, validate and list the files, upload nothing (no network)")
    parser.add_argument("--staging-dir", help="stage into this empty or new folder and keep it (default: a temporary folder, removed)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="publish the weights in this dtype (default: as stored)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file; bigger models are sharded (default: 5GB)")
    parser.add_argument("--tokenizer", metavar="PATH_OR_NAME", help="tokenizer to publish with the model (default: SOURCE's, if it has one)")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"license of the model card (default: {DEFAULT_LICENSE})")
    parser.add_argument("--base-model", help="Hub id of the model this one was fine-tuned from (model card metadata)")
    parser.add_argument("--datasets", nargs="+", metavar="DATASET", help="Hub ids of the training datasets (model card metadata)")
    parser.add_argument("--metrics", metavar="JSON", help="JSON file of training/evaluation results, shown in the model card")
    parser.add_argument("--tags", nargs="+", metavar="TAG", help="extra model card tags (`rat` is always there)")
    parser.add_argument("--model-name", help="title of the model card (default: the repo name)")
    parser.add_argument("--description", help="first paragraph of the model card")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing public repo is refused)")
    parser.add_argument("--revision", help="branch to commit to (created from main if needed; default: main)")
    parser.add_argument("--commit-message", default="Upload RAT model", help="message of the upload commit")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN, then the saved `hf auth login`)")
    parser.add_argument("--validation-timeout", type=float, default=3600, help="seconds allowed for the isolated load check (default: 3600)")
    conversion = parser.add_argument_group("official checkpoints (SOURCE is a .pth file)")
    add_conversion_arguments(conversion, required=False)
    return parser


def _read_metrics(path) -> dict:
    try:
        metrics = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise HubUploadError(f"Cannot read --metrics {path} as JSON: {error}") from error
    if not isinstance(metrics, dict):
        raise HubUploadError(f"--metrics {path} must hold a JSON object (metric name -> value), not a {type(metrics).__name__}.")
    return metrics


def publish(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as error:
        raise HubUploadError(f"--repo-id {args.repo_id!r} is not a valid repository id: {error}") from error
    if "/" not in args.repo_id:
        raise HubUploadError(f"--repo-id must be OWNER/NAME (your user or organization name, a slash, the model name), got {args.repo_id!r}.")
    from transformers.utils.hub import convert_file_size_to_int

    try:
        if convert_file_size_to_int(args.max_shard_size) <= 0:
            raise ValueError("it must be positive")
    except ValueError as error:
        raise HubUploadError(f"--max-shard-size {args.max_shard_size!r} is not a size such as 5GB or 500MB: {error}") from error
    metrics = _read_metrics(args.metrics) if args.metrics else None
    token = None if args.dry_run else resolve_token(args.token)  # before hours of work, not after

    logger.info(f"Loading {args.source}")
    model = load_source_model(args.source, args)
    tokenizer_source = args.tokenizer
    if tokenizer_source is None and Path(args.source).is_dir() and any((Path(args.source) / name).is_file() for name in TOKENIZER_FILES):
        tokenizer_source = args.source
    tokenizer = load_tokenizer(tokenizer_source, model) if tokenizer_source else None

    temporary = None
    if args.staging_dir:
        staging_dir = Path(args.staging_dir)
    else:
        temporary = tempfile.mkdtemp(prefix="rat-hub-staging-")
        staging_dir = Path(temporary)
    try:
        logger.info(f"Staging into {staging_dir}")
        card_options = dict(
            license=args.license, base_model=args.base_model, datasets=args.datasets, metrics=metrics,
            tags=args.tags, model_name=args.model_name, description=args.description,
        )
        stage_checkpoint(model, staging_dir, args.repo_id, tokenizer, args.max_shard_size, card_options)
        logger.info("Validating: loading the staged folder with trust_remote_code in a process without rat-transformers")
        validate_staged_folder(model, staging_dir, timeout=args.validation_timeout)
        files = staged_files(staging_dir)
        print(f"{'Would upload' if args.dry_run else 'Uploading'} {len(files)} files to {args.repo_id}"
              f"{f' (revision {args.revision})' if args.revision else ''}:")
        for name, size in files:
            print(f"  {format_size(size):>10}  {name}")
        print(f"  {format_size(sum(size for _, size in files)):>10}  total")
        if args.dry_run:
            kept = f"staged folder kept in {staging_dir}" if temporary is None else "use --staging-dir to keep the staged folder"
            print(f"Dry run: validation passed, nothing was uploaded ({kept}).")
            return 0
        commit = upload_staged_folder(staging_dir, args.repo_id, token, args.private, args.revision, args.commit_message)
        print(f"Uploaded to https://huggingface.co/{args.repo_id}: {getattr(commit, 'commit_url', commit)}")
        return 0
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def main(argv=None) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return publish(args)
    except HubUploadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
