"""Saved RAT checkpoints are ordinary Hub models: `trust_remote_code=True` loads them without this package.

transformers' own machinery writes the bundle: `import modeling_rat` registers every class for its Auto class
(`register_for_auto_class`), so `save_pretrained` copies the class's module and, recursively, the sibling modules it
imports with `from .name import` (`custom_object_save`). The isolated checks run in a fresh Python process in which
`modeling_rat` and `configuration_rat` cannot be imported (a meta-path blocker first, the editable-install finder
removed, `python -I`) and, unless told otherwise, neither can triton, peft, trl or accelerate (see
`modeling_rat/hub/isolated_check.py`).
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import configuration_rat
import modeling_rat
from conftest import ROOT, random_ids, tiny_model
from modeling_rat import RAT_AUTO_CLASSES, RatConfig, RatForCausalLM, RatModel
from modeling_rat.configuration_rat import rat_auto_map
from modeling_rat.hub import HubUploadError
from modeling_rat.hub.validation import run_isolated_check


PACKAGE_DIR = ROOT / "modeling_rat"
OPTIONAL = {"triton", "peft", "trl", "accelerate"}
ALL_LAYER_TYPES = ["rat", "sliding_attention", "rnn", "full_attention"]


def _relative_imports(path: Path) -> list[ast.ImportFrom]:
    """Relative imports of a module, read with `ast` (independently of the code under test), wherever they appear."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]


def expected_bundle() -> set[str]:
    """`modeling_rat.py` and every module it imports with `from .name import`, recursively."""
    names, pending = {"modeling_rat"}, ["modeling_rat"]
    while pending:
        for node in _relative_imports(PACKAGE_DIR / f"{pending.pop()}.py"):
            if node.module not in names:
                names.add(node.module)
                pending.append(node.module)
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


def test_bundle_modules_are_flat_siblings():
    """
    transformers follows only `from .name import x` with `name.py` a sibling file: `from . import x`, dotted modules
    and parent packages would save a folder that fails to load elsewhere. The configuration is one of the siblings.
    """
    bundle = expected_bundle()
    assert {"modeling_rat.py", "configuration_rat.py", "cache_rat.py", "rat_ops.py"} <= bundle
    for name in bundle:
        assert (PACKAGE_DIR / name).is_file(), f"{name} is imported by the bundle but is not a sibling of modeling_rat.py"
        for node in _relative_imports(PACKAGE_DIR / name):
            written = "." * node.level + (node.module or "")
            assert node.level == 1 and node.module and "." not in node.module, (
                f"{name} line {node.lineno}: `from {written} import` cannot be bundled as remote code"
            )


def test_bundle_imports_no_optional_dependency_at_import_time():
    """
    transformers' loader requires every import outside `try:` blocks to be installed: only torch, transformers, the
    libraries transformers itself requires, and the standard library may be imported that way.
    """
    for name in expected_bundle():
        imports = set(get_imports(PACKAGE_DIR / name))
        assert not imports & OPTIONAL, f"{name} imports {imports & OPTIONAL} outside a try block"
        allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "huggingface_hub", "safetensors"}
        assert imports <= allowed, f"{name} needs {imports - allowed}, which a plain transformers install may lack"


def test_save_pretrained_writes_auto_map_and_the_package_code(tmp_path):
    model = tiny_model(ALL_LAYER_TYPES)
    model.save_pretrained(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["auto_map"] == rat_auto_map()
    assert {p.name for p in (tmp_path / "model").glob("*.py")} == expected_bundle()
    for name in expected_bundle():
        assert (tmp_path / "model" / name).read_bytes() == (PACKAGE_DIR / name).read_bytes(), name
    assert (tmp_path / "model" / "generation_config.json").is_file()
    # a configuration alone: its code and the full auto_map (transformers' convention: the model's code comes with the model)
    model.config.save_pretrained(tmp_path / "config")
    assert json.loads((tmp_path / "config" / "config.json").read_text())["auto_map"] == rat_auto_map()
    assert {p.name for p in (tmp_path / "config").iterdir()} == {"config.json", "configuration_rat.py"}


@pytest.mark.parametrize("auto_class_name, class_name", list(RAT_AUTO_CLASSES.items()))
def test_every_auto_class_of_the_table_is_registered_exported_and_saved(auto_class_name, class_name, tmp_path):
    """One table (`RAT_AUTO_CLASSES`) drives the Auto registration, the exports and every saved `auto_map`."""
    model_class = getattr(modeling_rat, class_name, None)
    assert model_class is not None, f"{class_name} is in RAT_AUTO_CLASSES but modeling_rat/__init__.py does not export it"
    auto_class = getattr(transformers, auto_class_name)
    assert auto_class._model_mapping[RatConfig] is model_class
    assert model_class._auto_class == auto_class_name
    assert rat_auto_map()[auto_class_name] == f"modeling_rat.{class_name}"
    model = model_class(tiny_model().config)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == rat_auto_map()
    assert type(auto_class.from_pretrained(tmp_path)) is model_class


def test_auto_map_keeps_local_entries_and_replaces_hub_references():
    expected = rat_auto_map()
    assert expected["AutoConfig"] == "configuration_rat.RatConfig"
    loaded_from_the_hub = {"AutoConfig": "someone/rat--configuration_rat.RatConfig",
                           "AutoModelForCausalLM": "someone/rat--modeling_rat.RatForCausalLM"}
    assert rat_auto_map(loaded_from_the_hub) == expected, "the code is saved beside the weights: no other repo is needed"
    registered_subclass = {"AutoModelForCausalLM": "my_rat.MyRatForCausalLM", "AutoTokenizer": [None, "my_tokenizer.Fast"]}
    assert rat_auto_map(registered_subclass) == {**expected, **registered_subclass}


def test_register_for_auto_class_then_save_pretrained(tmp_path):
    """The pattern of transformers' custom-model guide, with this package imported (it raised FileNotFoundError)."""
    RatConfig.register_for_auto_class()
    RatForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    model = tiny_model(["rat", "rnn"])
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.glob("*.py")} == expected_bundle()
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == rat_auto_map()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    ids = random_ids(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_configuration_import_paths_name_one_class():
    assert configuration_rat.RatConfig is RatConfig is modeling_rat.configuration_rat.RatConfig
    assert configuration_rat.RAT_AUTO_CLASSES is RAT_AUTO_CLASSES


def test_importing_the_package_registers_the_auto_classes(tmp_path):
    assert CONFIG_MAPPING["rat"] is RatConfig
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


@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty"])
@pytest.mark.parametrize("loader", [RatForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained], ids=["class", "auto"])
def test_an_unreadable_weight_file_is_named(damage, loader, tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "random bytes": torch.randint(0, 256, (len(data),), dtype=torch.uint8).numpy().tobytes(), "empty": b""}[damage])
    with pytest.raises(OSError, match="model.safetensors cannot be read .*truncated or not a safetensors file"):
        loader(tmp_path)


def test_an_unreadable_shard_is_named_among_good_ones(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert len(shards) >= 2
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    with pytest.raises(OSError) as raised:
        RatForCausalLM.from_pretrained(tmp_path)
    assert str(shards[1]) in str(raised.value) and str(shards[0]) not in str(raised.value)


# ----------------------------------------------------------------------------------------- isolated, as on the Hub


@pytest.mark.slow
def test_remote_code_loads_generates_and_resaves_without_the_package(tmp_path):
    model = tiny_model(ALL_LAYER_TYPES)
    model.save_pretrained(tmp_path / "model")
    input_ids, attention_mask = _left_padded_batch()
    logits, generated = _reference_outputs(model, input_ids, attention_mask)
    probe = {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": 8, "pad_token_id": 0, "resave": True}
    result = run_isolated_check(tmp_path / "model", probe, optional_dependencies=sorted(OPTIONAL))

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

    # saved again by the remote-code model (transformers copies its bundle from its module cache) and reloaded
    assert {"config.json", "model.safetensors", "generation_config.json"} | expected_bundle() <= set(result["resaved_files"])
    assert set(result["resaved_code"]) == expected_bundle()
    for name in expected_bundle():
        assert result["resaved_code"][name] == (PACKAGE_DIR / name).read_text(encoding="utf-8"), name
    assert json.loads(result["resaved_config"])["auto_map"] == rat_auto_map()
    assert result["resaved_model_class"].startswith("transformers_modules.")
    torch.testing.assert_close(result["resaved_logits"], logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_remote_code_loads_with_the_optional_dependencies_installed(tmp_path):
    model = tiny_model(["rat", "rnn"], dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    input_ids, attention_mask = _left_padded_batch()
    logits, generated = _reference_outputs(model, input_ids, attention_mask, max_new_tokens=4)
    probe = {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": 4, "pad_token_id": 0}
    result = run_isolated_check(tmp_path, probe, optional_dependencies=())
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
    with pytest.raises(HubUploadError, match="fast_kernels.py imports 'triton' outside a `try:` block"):
        run_isolated_check(tmp_path, {"input_ids": input_ids, "attention_mask": attention_mask})
    # with the import guarded inside the module too, the same folder loads without triton
    (tmp_path / "fast_kernels.py").write_text("try:\n    import triton\nexcept ImportError:\n    triton = None\n\nkernel = triton\n")
    result = run_isolated_check(tmp_path, {"input_ids": input_ids, "attention_mask": attention_mask})
    assert result["model_class"].startswith("transformers_modules.")


def test_isolation_blocks_the_package_and_optional_dependencies():
    """`isolate` in a subprocess: the package and the optional dependencies are unimportable."""
    script = (
        "import importlib, importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('isolation', {str(PACKAGE_DIR / 'hub' / 'isolated_check.py')!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "module.isolate(['modeling_rat', 'configuration_rat'], ['peft'])\n"
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
    if "rat_triton.py" not in expected_bundle():
        pytest.skip("this tree has no Triton kernels (modeling_rat.py does not import .rat_triton)")
    pytest.importorskip("triton", reason="the Triton kernels need the `triton` package")
    model = tiny_model(["rat", "sliding_attention"])
    input_ids, attention_mask = _left_padded_batch()
    logits, generated = _reference_outputs(model, input_ids, attention_mask, max_new_tokens=4)
    model.config.rat_implementation = "triton"  # strict: the model raises rather than fall back if the kernels cannot run
    model.save_pretrained(tmp_path)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read by the validation process when it imports the bundled kernels
    probe = {"input_ids": input_ids, "attention_mask": attention_mask, "max_new_tokens": 4, "pad_token_id": 0}
    result = run_isolated_check(tmp_path, probe, optional_dependencies=())
    assert result["model_class"].startswith("transformers_modules.")
    assert "triton" in result["loaded_optional_dependencies"]
    # kernels against the PyTorch fast path: fp32 accumulations in another order (as in tests/test_triton.py)
    torch.testing.assert_close(result["logits"], logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(result["generated"], generated)
