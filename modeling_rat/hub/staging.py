"""The model to publish, and the Hub folder staged from it: exactly the files a Hub model repository needs."""

import json
import logging
import os
from pathlib import Path

import torch

from ..convert_official import OfficialCheckpointError, convert_official_checkpoint, new_folder_problem
from ..modeling_rat import RatForCausalLM
from . import HubUploadError


logger = logging.getLogger("hub_upload")

# Files that unpickle code when loaded: never staged for upload.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".npz")
# Tokenizer files looked for in a checkpoint directory when no tokenizer is given.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Loading options that transformers writes into a saved `tokenizer_config.json`: they describe how the tokenizer was
# loaded on this machine, and would make a Hub download behave as if offline (`local_files_only`).
TOKENIZER_LOADING_KEYS = ("is_local", "local_files_only", "cache_dir", "force_download", "proxies", "token", "revision",
                          "subfolder", "trust_remote_code", "_commit_hash")


def load_source_model(source, conversion_options: dict | None = None, dtype: torch.dtype | None = None):
    """
    The model to publish: a checkpoint directory loaded with this package (it must load completely), or an official
    checkpoint file converted with `conversion_options` (see `modeling_rat.convert_official`). Every weight must be
    finite.
    """
    source = Path(source)
    conversion_options = conversion_options or {}
    if source.is_dir():
        if conversion_options:
            given = ", ".join(f"--{name.replace('_', '-')}" for name in conversion_options)
            raise HubUploadError(f"{given} describe an official checkpoint file; {source} is a checkpoint folder, whose config.json says all that.")
        config_path = source / "config.json"
        if not config_path.is_file():
            if (source / "adapter_config.json").is_file():
                raise HubUploadError(
                    f"{source} holds a PEFT adapter, not a model: merge it into its base model first "
                    "(`model.merge_and_unload().save_pretrained(...)`) and publish that folder."
                )
            raise HubUploadError(f"{source} has no config.json: give a folder written by `save_pretrained` or an official .pth file.")
        try:
            model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as error:
            raise HubUploadError(f"Cannot read {config_path} as a JSON object: {error}") from error
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
        try:
            model = convert_official_checkpoint(source, **conversion_options)
        except OfficialCheckpointError as error:
            raise HubUploadError(f"Cannot convert {source} as an official RAT checkpoint: {error}") from error
    else:
        raise HubUploadError(f"{source} does not exist: give a checkpoint folder or an official .pth checkpoint file.")
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter).all()):
            raise HubUploadError(f"Parameter {name} holds NaN or infinite values: refusing to publish a broken checkpoint.")
    return model


def tokenizer_source(tokenizer, source) -> str | None:
    """What to load the tokenizer from: `tokenizer` (a folder or Hub id), else the source folder if it holds one."""
    if tokenizer is not None:
        path = Path(tokenizer).expanduser()
        looks_local = path.is_absolute() or tokenizer.startswith(".") or tokenizer.count("/") > 1
        if not path.exists() and looks_local:
            raise HubUploadError(f"--tokenizer {tokenizer} does not exist: give a tokenizer folder or a Hub id (OWNER/NAME).")
        return str(path) if path.exists() else tokenizer
    if Path(source).is_dir() and any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
        return str(source)
    return None


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


def prepare_staging_dir(staging_dir) -> Path:
    """`staging_dir`, created if needed; it must be an empty folder this process can write to."""
    staging_dir = Path(staging_dir)
    problem = new_folder_problem(staging_dir, "--staging-dir")
    if problem:  # an empty folder: no stray file gets uploaded
        raise HubUploadError(problem)
    try:
        staging_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise HubUploadError(f"Cannot create --staging-dir {staging_dir}: {error.strerror or error}.") from error
    if not os.access(staging_dir, os.W_OK | os.X_OK):
        raise HubUploadError(f"Cannot write into --staging-dir {staging_dir}: permission denied.")
    return staging_dir


def _clean_tokenizer_config(staging_dir: Path):
    path = staging_dir / "tokenizer_config.json"
    if not path.is_file():
        return
    tokenizer_config = json.loads(path.read_text(encoding="utf-8"))
    removed = [key for key in TOKENIZER_LOADING_KEYS if tokenizer_config.pop(key, None) is not None]
    if removed:
        logger.info(f"Left the loading options {removed} out of the staged tokenizer_config.json.")
        path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def stage_checkpoint(model, staging_dir, card: str, tokenizer=None, max_shard_size="5GB") -> Path:
    """
    Write everything the Hub repo needs into `staging_dir` (see `prepare_staging_dir`): weights as safetensors,
    config and code, generation config, tokenizer, the model card `card`. Training leftovers are not staged:
    `use_cache: false` is reset, loading options are removed from the tokenizer's config, pickled files are refused.
    """
    staging_dir = prepare_staging_dir(staging_dir)
    if model.config.use_cache is False:  # set by training with gradient checkpointing; generation needs the cache
        logger.info("Setting use_cache=True in the staged config (it was turned off for training).")
        model.config.use_cache = True
    try:
        model.save_pretrained(staging_dir, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging_dir)
            _clean_tokenizer_config(staging_dir)
        (staging_dir / "README.md").write_text(card, encoding="utf-8")
    except OSError as error:
        raise HubUploadError(f"Cannot write the staged folder {staging_dir}: {error.strerror or error}.") from error
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
