"""Saved RAT checkpoints are ordinary Hub models: `trust_remote_code=True` loads them without this package.

The isolated checks run in a fresh Python process in which `modeling_rat` and `configuration_rat` cannot be imported
(a meta-path blocker first, the editable-install finder removed, `python -I`) and, unless told otherwise, neither can
triton, peft, trl or accelerate (see `hub_upload.run_isolated_check`).
"""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_MAPPING

import configuration_rat.configuration_rat as configuration_module
import hub_upload
from configuration_rat import RatConfig
from configuration_rat.configuration_rat import RemoteCodeNotFoundError, remote_code_files, write_remote_code
from conftest import ROOT, random_ids, tiny_model
from modeling_rat import RatForCausalLM, RatModel


PACKAGE_DIR = ROOT / "modeling_rat"
CONFIG_FILE = ROOT / "configuration_rat" / "configuration_rat.py"
AUTO_MAP = {
    "AutoConfig": "configuration_rat.RatConfig",
    "AutoModel": "modeling_rat.RatModel",
    "AutoModelForCausalLM": "modeling_rat.RatForCausalLM",
}
OPTIONAL = {"triton", "peft", "trl", "accelerate"}
ALL_LAYER_TYPES = ["rat", "sliding_attention", "rnn", "full_attention"]


def _sibling_imports(path: Path) -> set[str]:
    """Relative imports of a module, read with `ast` (independently of the code under test)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}


def _expected_bundle() -> set[str]:
    names, pending = {"configuration_rat", "modeling_rat"}, ["modeling_rat"]
    while pending:
        for name in _sibling_imports(PACKAGE_DIR / f"{pending.pop()}.py"):
            if name not in names:
                names.add(name)
                pending.append(name)
    return {f"{name}.py" for name in names}


def _left_padded_batch():
    input_ids = random_ids(2, 11, seed=3)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :3] = 0  # the tiny models' pad token
    attention_mask[1, :3] = 0
    return input_ids, attention_mask


def _reference_outputs(model, input_ids, attention_mask, max_new_tokens=8):
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask, use_cache=False).logits
        generated = model.generate(
            input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=0
        )
    return logits, generated


# ------------------------------------------------------------------------------------------------------- the bundle


def test_bundle_is_the_package_source_and_follows_every_relative_import():
    files = remote_code_files()
    assert set(files) == _expected_bundle()
    assert {"configuration_rat.py", "modeling_rat.py", "cache_rat.py", "rat_ops.py"} <= set(files)
    assert files["configuration_rat.py"] == CONFIG_FILE.resolve()
    for name, source in files.items():
        if name != "configuration_rat.py":
            assert source == (PACKAGE_DIR / name).resolve(), f"{name} must come from the package, not a copy"


def test_bundle_imports_no_optional_dependency_at_import_time():
    """
    transformers' loader requires every import outside `try:` blocks to be installed: only torch, transformers, the
    libraries transformers itself requires, and the standard library may be imported that way.
    """
    for name, source in remote_code_files().items():
        imports = set(get_imports(source))
        assert not imports & OPTIONAL, f"{name} imports {imports & OPTIONAL} outside a try block"
        allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "huggingface_hub", "safetensors"}
        assert imports <= allowed, f"{name} needs {imports - allowed}, which a plain transformers install may lack"


def _write_module(directory: Path, name: str, text: str):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(text, encoding="utf-8")


def test_bundle_picks_up_guarded_optional_modules(tmp_path):
    code = tmp_path / "code"
    _write_module(code, "modeling_rat", "try:\n    from .fast_kernels import kernel\nexcept ImportError:\n    kernel = None\n")
    _write_module(code, "fast_kernels", "from .helpers import x\ntry:\n    import triton\nexcept ImportError:\n    triton = None\n")
    _write_module(code, "helpers", "x = 1\n")
    files = remote_code_files(code)
    assert set(files) == {"configuration_rat.py", "modeling_rat.py", "fast_kernels.py", "helpers.py"}
    # configuration_rat.py is not in that folder: it comes from the installed configuration package
    assert files["configuration_rat.py"] == CONFIG_FILE.resolve()
    written = write_remote_code(tmp_path / "out", modeling_dir=code)
    assert sorted(p.name for p in written) == sorted(files)
    assert (tmp_path / "out" / "fast_kernels.py").read_text() == (code / "fast_kernels.py").read_text()


def test_bundle_errors_name_what_cannot_be_bundled(tmp_path):
    missing = tmp_path / "missing"
    _write_module(missing, "modeling_rat", "try:\n    from .rat_triton import kernel\nexcept ImportError:\n    pass\n")
    with pytest.raises(RemoteCodeNotFoundError, match="rat_triton.py"):
        remote_code_files(missing)
    assert not (tmp_path / "out").exists()
    with pytest.raises(RemoteCodeNotFoundError):
        write_remote_code(tmp_path / "out", modeling_dir=missing)
    assert not (tmp_path / "out").exists(), "nothing is written when the bundle is incomplete"
    for name, text in {"package_import": "from . import rat_ops\n", "dotted": "from .ops.kernels import f\n", "parent": "from ..x import y\n"}.items():
        folder = tmp_path / name
        _write_module(folder, "modeling_rat", text)
        with pytest.raises(ValueError, match="cannot be bundled|only flat sibling modules"):
            remote_code_files(folder)


def test_save_pretrained_writes_auto_map_and_the_package_code(tmp_path):
    model = tiny_model(ALL_LAYER_TYPES)
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for name, source in remote_code_files().items():
        assert (tmp_path / "model" / name).read_bytes() == source.read_bytes(), name
    assert (tmp_path / "model" / "generation_config.json").is_file()
    model.config.save_pretrained(tmp_path / "config")
    assert json.loads((tmp_path / "config" / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert {p.name for p in (tmp_path / "config").glob("*.py")} == set(remote_code_files())


def test_config_alone_without_model_code_saves_its_own_code_and_warns(tmp_path, monkeypatch, caplog):
    """A configuration loaded by itself with remote code from a local folder has no model code beside it."""
    monkeypatch.setattr(configuration_module, "_default_model_code_directory", lambda: None)
    with caplog.at_level("WARNING"):
        RatConfig(**tiny_model().config.to_diff_dict()).save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", "configuration_rat.py"}
    assert "not the model code" in caplog.text and "model.save_pretrained" in caplog.text


def test_importing_the_package_registers_the_auto_classes(tmp_path):
    assert CONFIG_MAPPING["rat"] is RatConfig
    assert MODEL_MAPPING[RatConfig] is RatModel
    assert MODEL_FOR_CAUSAL_LM_MAPPING[RatConfig] is RatForCausalLM
    model = tiny_model(["rat", "sliding_attention"])
    model.save_pretrained(tmp_path)
    # no trust_remote_code: the installed classes are used
    assert type(AutoConfig.from_pretrained(tmp_path)) is RatConfig
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is RatForCausalLM
    assert type(AutoModel.from_pretrained(tmp_path)) is RatModel
    ids = random_ids(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- isolated, as on the Hub


@pytest.mark.slow
def test_remote_code_loads_generates_and_resaves_without_the_package(tmp_path):
    model = tiny_model(ALL_LAYER_TYPES)
    model.save_pretrained(tmp_path / "model")
    input_ids, attention_mask = _left_padded_batch()
    logits, generated = _reference_outputs(model, input_ids, attention_mask)
    probe = {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": 8, "pad_token_id": 0, "resave": True}
    result = hub_upload.run_isolated_check(tmp_path / "model", probe, optional_dependencies=sorted(OPTIONAL))

    assert result["model_class"].startswith("transformers_modules.") and result["model_class"].endswith("RatForCausalLM")
    assert result["config_class"].startswith("transformers_modules.")
    assert result["blocked_dependencies"] == sorted(OPTIONAL)
    assert result["loaded_optional_dependencies"] == []
    # Same weights, same code, same machine: the logits agree to float32 rounding of differently ordered reductions.
    torch.testing.assert_close(result["logits"], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(result["generated"], generated), (result["generated"], generated)
    # the left-padded row generates what it generates alone
    alone = model.generate(input_ids[1:, 3:], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(result["generated"][1, 3:], alone[0])

    # saved again by the remote-code model (its bundle comes from transformers' module cache) and reloaded
    assert {"config.json", "model.safetensors", "generation_config.json"} | set(remote_code_files()) <= set(result["resaved_files"])
    assert set(result["resaved_code"]) == set(remote_code_files())
    for name, source in remote_code_files().items():
        assert result["resaved_code"][name] == source.read_text(encoding="utf-8"), name
    assert result["resaved_model_class"].startswith("transformers_modules.")
    torch.testing.assert_close(result["resaved_logits"], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_remote_code_loads_with_the_optional_dependencies_installed(tmp_path):
    model = tiny_model(["rat", "rnn"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    input_ids, attention_mask = _left_padded_batch()
    logits, generated = _reference_outputs(model, input_ids, attention_mask, max_new_tokens=4)
    probe = {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": 4, "pad_token_id": 0}
    result = hub_upload.run_isolated_check(tmp_path, probe, optional_dependencies=())
    assert result["blocked_dependencies"] == []
    assert result["model_class"].startswith("transformers_modules.")
    # bfloat16 weights are loaded as bfloat16 (config `dtype`): same computation as the source model
    torch.testing.assert_close(result["logits"], logits.float(), rtol=1e-2, atol=1e-2)
    assert torch.equal(result["generated"], generated)


@pytest.mark.slow
def test_an_unguarded_optional_import_in_a_bundled_module_is_caught(tmp_path):
    """
    The way a kernel module must NOT be written: `modeling_rat.py` guards `from .fast_kernels import ...`, but
    `fast_kernels.py` imports triton unguarded. Loading a local folder would work (the guard catches the ImportError),
    loading from the Hub would not (transformers checks the imports of every file it fetches): the isolated check is as
    strict as the Hub, and the bundle test above rejects such a module at save time.
    """
    tiny_model(["rat"]).save_pretrained(tmp_path)
    modeling_file = tmp_path / "modeling_rat.py"
    modeling_file.write_text(
        modeling_file.read_text(encoding="utf-8") + "\ntry:\n    from .fast_kernels import kernel\nexcept ImportError:\n    kernel = None\n",
        encoding="utf-8",
    )
    (tmp_path / "fast_kernels.py").write_text("import triton\n\nkernel = triton\n", encoding="utf-8")
    input_ids, attention_mask = _left_padded_batch()
    with pytest.raises(hub_upload.HubUploadError, match="fast_kernels.py imports 'triton' outside a `try:` block"):
        hub_upload.run_isolated_check(tmp_path, {"input_ids": input_ids, "attention_mask": attention_mask})
    # with the import guarded inside the module too, the same folder loads without triton
    (tmp_path / "fast_kernels.py").write_text("try:\n    import triton\nexcept ImportError:\n    triton = None\n\nkernel = triton\n")
    result = hub_upload.run_isolated_check(tmp_path, {"input_ids": input_ids, "attention_mask": attention_mask})
    assert result["model_class"].startswith("transformers_modules.")


def test_isolation_blocks_the_package_and_optional_dependencies():
    """`isolate_from_package` in a subprocess: the package and the optional dependencies are unimportable."""
    import subprocess

    script = (
        "import importlib, importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('isolation', {str(ROOT / 'hub_upload.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "module.isolate_from_package(['peft'])\n"
        "for name in ('modeling_rat', 'configuration_rat', 'modeling_rat.rat_ops', 'peft'):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        print('blocked', name)\n"
        "print('peft spec', importlib.util.find_spec('peft'))\n"
        "print('editable finders', [f for f in sys.meta_path if module._is_editable_finder(f)])\n"
    )
    completed = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr
    for name in ("modeling_rat", "configuration_rat", "modeling_rat.rat_ops", "peft"):
        assert f"blocked {name}\n" in completed.stdout
    assert "peft spec None" in completed.stdout
    assert "editable finders []" in completed.stdout
    # and without isolation the package is importable in such a process (the check above is not vacuous)
    plain = subprocess.run([sys.executable, "-c", "import modeling_rat; print('ok')"], capture_output=True, text=True, cwd=ROOT)
    assert plain.stdout.strip() == "ok", plain.stderr


@pytest.mark.slow
@pytest.mark.triton
def test_remote_code_runs_the_bundled_triton_kernels(tmp_path, monkeypatch):
    """
    With triton installed, a folder loaded with remote code runs the kernels of its own bundled `rat_triton.py` (on the
    CPU under Triton's interpreter here) and computes what the installed package's fast path computes.
    """
    if "rat_triton.py" not in remote_code_files():
        pytest.skip("this tree has no Triton kernels (modeling_rat.py does not import .rat_triton)")
    pytest.importorskip("triton", reason="the Triton kernels need the `triton` package")
    model = tiny_model(["rat", "sliding_attention"])
    input_ids, attention_mask = _left_padded_batch()
    logits, generated = _reference_outputs(model, input_ids, attention_mask, max_new_tokens=4)
    model.config.rat_implementation = "triton"  # strict: the model raises rather than fall back if the kernels cannot run
    model.save_pretrained(tmp_path)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the validation process when it imports the bundled kernels
    probe = {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": 4, "pad_token_id": 0}
    result = hub_upload.run_isolated_check(tmp_path, probe, optional_dependencies=())
    assert result["model_class"].startswith("transformers_modules.")
    assert "triton" in result["loaded_optional_dependencies"]
    # kernels against the PyTorch fast path: fp32 accumulations in another order (as in tests/test_triton.py)
    torch.testing.assert_close(result["logits"], logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(result["generated"], generated)
