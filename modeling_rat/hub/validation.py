"""Check a staged Hub folder where this package is not installed: it must load with `trust_remote_code=True` and compute
what the source model computes."""

import json
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from ..configuration_rat import rat_auto_map
from . import HubUploadError


logger = logging.getLogger("hub_upload")

# This package's top-level modules: the validation process cannot import them, so that only the folder's code can run.
PACKAGE_MODULES = ("modeling_rat", "configuration_rat", "hub_upload")
# Optional dependencies the remote code must do without: the validation process runs as if they were not installed.
OPTIONAL_DEPENDENCIES = ("triton", "peft", "trl", "accelerate")
ISOLATED_CHECK_SCRIPT = Path(__file__).resolve().with_name("isolated_check.py")


def run_isolated_check(folder, probe: dict, optional_dependencies=OPTIONAL_DEPENDENCIES, timeout: float | None = None) -> dict:
    """
    Load `folder` with `trust_remote_code=True` in a fresh Python process in which this package (and
    `optional_dependencies`) cannot be imported (`isolated_check.py`), and return what it computed on `probe`:

    * `probe`: `input_ids`, `attention_mask` (run through forward: `logits`, and, with `max_new_tokens` and
      `pad_token_id`, greedy `generate`: `generated`); `resave: True` also saves the loaded model again and reloads it
      (`resaved_logits`, `resaved_files`, `resaved_code`, `resaved_config`); `snippet`: Python code to run after the
      checks (only code this package generated: the model card's usage snippet).
    * Also returned: the classes that were loaded (`model_class`, `config_class`, which must come from transformers'
      module cache), `blocked_dependencies`, `loaded_optional_dependencies` and, with a tokenizer, `tokenizer_size`.

    Raises `HubUploadError` with the process's error output when anything fails.
    """
    with tempfile.TemporaryDirectory(prefix="rat-isolated-") as workdir:
        workdir = Path(workdir)
        probe_path, output_path = workdir / "probe.pt", workdir / "result.pt"
        torch.save(probe, probe_path)
        environment = dict(os.environ)
        # A fresh module cache: only the folder's code can be found, and the user's cache is left alone.
        environment["HF_MODULES_CACHE"] = str(workdir / "modules")
        environment["HF_HUB_OFFLINE"] = "1"
        environment.setdefault("TOKENIZERS_PARALLELISM", "false")
        # `-I`: neither the working folder, the script's folder nor PYTHONPATH is importable. The process runs in its own
        # folder: give it an absolute path (a relative one would be read as a repo id).
        command = [sys.executable, "-I", str(ISOLATED_CHECK_SCRIPT), str(Path(folder).resolve()), str(probe_path),
                   str(output_path), "--block-modules", *PACKAGE_MODULES, "--block-dependencies", *optional_dependencies,
                   "--optional-dependencies", *OPTIONAL_DEPENDENCIES]
        try:
            completed = subprocess.run(command, cwd=workdir, env=environment, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise HubUploadError(f"Loading {folder} with trust_remote_code took longer than {timeout} s (--validation-timeout).") from error
        if completed.returncode != 0 or not output_path.is_file():
            details = (completed.stderr or completed.stdout).strip()
            raise HubUploadError(
                f"{folder} does not load with `trust_remote_code=True` on a machine without rat-transformers (exit "
                f"status {completed.returncode}):\n{_tail(details, 40)}"
            )
        return torch.load(output_path, weights_only=True)


def _tail(text: str, lines: int) -> str:
    return textwrap.indent("\n".join(text.splitlines()[-lines:]), "    ")


def make_probe(config, seed: int = 0, max_new_tokens: int = 6) -> dict:
    """A left-padded batch of two rows, longer than two chunks, for comparing a staged folder with its source."""
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


def validate_staged_folder(model, staging_dir, snippet: str | None = None, timeout: float | None = None) -> dict:
    """
    Check that `staging_dir` works on a machine without this package (see `run_isolated_check`) and computes what
    `model` computes; run `snippet` (the model card's usage snippet, generated for this folder) against it. Raises
    `HubUploadError` on any difference.
    """
    staging_dir = Path(staging_dir)
    config = json.loads((staging_dir / "config.json").read_text(encoding="utf-8"))
    expected_map = rat_auto_map()
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
    probe["snippet"] = snippet
    loaded = run_isolated_check(staging_dir, probe, timeout=timeout)
    problems = compare_outputs(reference, loaded, probe["attention_mask"], next(model.parameters()).dtype)
    if not loaded["model_class"].startswith("transformers_modules."):
        problems.append(f"the model class came from {loaded['model_class']}, not from the folder's code")
    if (staging_dir / "tokenizer_config.json").is_file():
        size = loaded.get("tokenizer_size")
        if size is None or size > model.config.vocab_size:
            problems.append(f"the staged tokenizer has {size} tokens for a vocabulary of {model.config.vocab_size}")
    if snippet:
        logger.info(f"The model card's usage snippet ran against the staged folder; it printed: {loaded.get('snippet_output', '').strip()[:200]}")
    if problems:
        raise HubUploadError("Validation failed, nothing was uploaded:\n  - " + "\n  - ".join(problems))
    return loaded
