"""Load a saved RAT folder with `trust_remote_code=True` as on a machine without rat-transformers.

    python -I isolated_check.py FOLDER PROBE OUTPUT [--block-modules NAME ...] [--block-dependencies NAME ...]

`validation.run_isolated_check` runs this file as a script in a fresh process: the modules named by `--block-modules`
(this package's) cannot be imported, nor can the optional dependencies named by `--block-dependencies` (triton, peft,
...). The folder is loaded with its own code only; what PROBE (a `torch.save`d dict) asks for is computed and saved to
OUTPUT. Only the standard library is imported before the blocking is in place.
"""

import argparse
import contextlib
import importlib
import io
import sys
import tempfile
from pathlib import Path


class _ModuleBlocker:
    """Meta-path finder, first on `sys.meta_path`, that makes the named top-level modules unimportable."""

    def __init__(self, names):
        self.names = frozenset(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked: only the checkpoint's own code may run)", name=fullname)
        return None


def _is_editable_finder(finder) -> bool:
    module = getattr(finder, "__module__", None) or type(finder).__module__
    return module.startswith("__editable__")


def isolate(blocked_modules, blocked_dependencies=()):
    """
    Make this process look like a machine without rat-transformers: `blocked_modules` cannot be imported (a blocker
    first on `sys.meta_path`; the finder of an editable install removed), nor can `blocked_dependencies` (marked absent
    in `sys.modules`, which is also what `importlib.util.find_spec` and transformers' availability checks see).
    """
    sys.meta_path[:] = [finder for finder in sys.meta_path if not _is_editable_finder(finder)]
    sys.meta_path.insert(0, _ModuleBlocker(blocked_modules))
    for name in list(sys.modules):
        if name.partition(".")[0] in blocked_modules:
            del sys.modules[name]
    for name in blocked_dependencies:
        sys.modules[name] = None
    for name in blocked_modules:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        raise RuntimeError(f"Isolation failed: `{name}` can still be imported.")


def _check_bundle_imports(folder: Path):
    """
    Loading from a local folder checks the imports of the requested module only; loading from the Hub checks every
    file of the bundle. Check them all here, so that a kernel module whose own `import triton` is unguarded is caught
    before it breaks loading from the Hub.
    """
    from transformers.dynamic_module_utils import check_imports

    for module_file in sorted(folder.glob("*.py")):
        try:
            check_imports(module_file)
        except ImportError as error:
            missing = getattr(error, "name", None) or str(error)
            raise ImportError(
                f"{module_file.name} imports {missing!r} outside a `try:` block: transformers refuses to load this folder "
                f"from the Hub where {missing!r} is not installed. Guard that import (try/except ImportError)."
            ) from error


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


def _class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def check_folder(folder: Path, probe: dict, optional_dependencies) -> dict:
    """Load `folder` with its own code and compute what `probe` asks for (see `validation.run_isolated_check`)."""
    from transformers import AutoModelForCausalLM

    _check_bundle_imports(folder)
    result = {}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    result.update(_probe_outputs(model, probe))
    result["model_class"], result["config_class"] = _class_name(model), _class_name(model.config)
    if probe.get("resave"):
        with tempfile.TemporaryDirectory() as resaved:
            model.save_pretrained(resaved)
            result["resaved_files"] = sorted(path.name for path in Path(resaved).iterdir())
            result["resaved_code"] = {path.name: path.read_text(encoding="utf-8") for path in Path(resaved).glob("*.py")}
            result["resaved_config"] = (Path(resaved) / "config.json").read_text(encoding="utf-8")
            reloaded = AutoModelForCausalLM.from_pretrained(resaved, trust_remote_code=True).eval()
            result["resaved_logits"] = _probe_outputs(reloaded, probe)["logits"]
            result["resaved_model_class"] = _class_name(reloaded)
            del reloaded
    del model
    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        # AutoTokenizer reads config.json to choose the tokenizer class; without the package only the folder's code
        # can read a RAT config, hence trust_remote_code here too.
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        result["tokenizer_size"] = len(tokenizer)
        result["tokenizer_round_trip"] = tokenizer.decode(tokenizer("Hello world").input_ids, skip_special_tokens=True)
    if probe.get("snippet"):  # the usage snippet hub_upload generated for the model card (never text a user passed)
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            exec(compile(probe["snippet"], "<model card usage snippet>", "exec"), {"__name__": "__main__"})
        result["snippet_output"] = captured.getvalue()
    result["loaded_optional_dependencies"] = sorted(name for name in optional_dependencies if sys.modules.get(name) is not None)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("probe", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--block-modules", nargs="*", default=[])
    parser.add_argument("--block-dependencies", nargs="*", default=[])
    parser.add_argument("--optional-dependencies", nargs="*", default=[])
    args = parser.parse_args(argv)
    isolate(args.block_modules, args.block_dependencies)
    import torch

    probe = torch.load(args.probe, weights_only=True)
    result = check_folder(args.folder, probe, args.optional_dependencies)
    result["blocked_dependencies"] = sorted(name for name in args.block_dependencies if sys.modules.get(name, 0) is None)
    torch.save(result, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
