"""The converter of official checkpoints: fixture parity, the CLI, and its errors."""

import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, ROOT, fixture_paths
from modeling_rat import RatForCausalLM
from modeling_rat.convert_official import OfficialCheckpointError, convert_official_checkpoint, main


PATTERN = {None: "rat", "local": "rat-swa"}


def _load_fixture(path):
    fixture = torch.load(path, weights_only=True)
    arch = fixture["arch"]
    pattern = PATTERN[arch["interleave"]]
    return fixture, arch, pattern


def _convert(fixture, arch, pattern, **kwargs):
    return convert_official_checkpoint(fixture["checkpoint"], arch["num_head"], arch["chunk_size"], pattern, arch["window"], **kwargs)


def test_fixtures_are_present():
    assert len(fixture_paths()) >= 2, f"official fixtures not found in {FIXTURES} (set RAT_FIXTURES)"


@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.stem)
@pytest.mark.parametrize("implementation", ["fast", "reference"])
def test_converted_fixture_reproduces_official_logits(path, implementation):
    fixture, arch, pattern = _load_fixture(path)
    model = _convert(fixture, arch, pattern)
    model.set_rat_implementation(implementation)
    ids, expected = fixture["input_ids"], fixture["logits"]
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits
        error = (logits - expected).abs().max().item()
        assert error <= 1e-3, f"max abs error {error}"
        for prefix in range(1, ids.shape[1], 4):  # odd prefixes: 1, 5, 9, ...
            prefix_logits = model(ids[:, :prefix], use_cache=False).logits
            assert (prefix_logits - expected[:, :prefix]).abs().max().item() <= 1e-3, prefix
    assert model.config.layer_types == ["rat" if i % 2 == 0 or pattern == "rat" else "sliding_attention" for i in range(arch["num_layers"])]
    assert model.config.num_qk_groups == arch["ngroups"]
    if pattern == "rat-swa":
        assert model.config.sliding_window == arch["window"] + 1


@pytest.mark.parametrize("path", fixture_paths()[:1], ids=lambda p: p.stem)
def test_cli_writes_a_loadable_checkpoint_and_prefixes_are_stripped(path, tmp_path):
    fixture, arch, pattern = _load_fixture(path)
    compiled = {"task": {f"_orig_mod.{k}": v for k, v in fixture["checkpoint"]["task"].items()}, "step": 10}
    source = tmp_path / "official.pth"
    torch.save(compiled, source)
    output = tmp_path / "converted"
    command = [sys.executable, "-m", "modeling_rat.convert_official", str(source), "--num-heads", str(arch["num_head"]),
               "--chunk-size", str(arch["chunk_size"]), "--layer-pattern", pattern, "--window", str(arch["window"]),
               "--output", str(output)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Converted" in result.stdout
    assert {"config.json", "model.safetensors", "modeling_rat.py", "configuration_rat.py"} <= {p.name for p in output.iterdir()}
    model = RatForCausalLM.from_pretrained(output)
    with torch.no_grad():
        logits = model(fixture["input_ids"], use_cache=False).logits
    assert (logits - fixture["logits"]).abs().max().item() <= 1e-3


@pytest.fixture
def rat_fixture():
    paths = [p for p in fixture_paths() if p.stem == "rat_tiny"]
    if not paths:
        pytest.fail(f"rat_tiny fixture missing in {FIXTURES}")
    return _load_fixture(paths[0])


def _state(fixture):
    return dict(fixture["checkpoint"]["task"])


def test_wrong_layer_pattern_is_refused(rat_fixture):
    fixture, arch, _ = rat_fixture
    with pytest.raises(OfficialCheckpointError, match="should be an attention layer"):
        convert_official_checkpoint(fixture["checkpoint"], arch["num_head"], arch["chunk_size"], "attention")


def test_missing_unexpected_and_misshaped_keys_are_named(rat_fixture, tmp_path):
    fixture, arch, _ = rat_fixture
    state = _state(fixture)
    del state["backbone.layers.1.hidden_layer.fc2.weight"]
    state["backbone.layers.0.extra.weight"] = torch.zeros(3)
    state["backbone.ln.weight"] = torch.zeros(7)
    output = tmp_path / "out"
    with pytest.raises(OfficialCheckpointError) as error:
        convert_official_checkpoint({"task": state}, arch["num_head"], arch["chunk_size"], "rat", output_dir=output)
    message = str(error.value)
    assert "missing key 'backbone.layers.1.hidden_layer.fc2.weight'" in message
    assert "unexpected keys ['backbone.layers.0.extra.weight']" in message
    assert "'backbone.ln.weight' has shape (7,), expected (64,)" in message
    assert not output.exists()


def test_foreign_and_damaged_files_are_refused(tmp_path, rat_fixture):
    fixture, arch, _ = rat_fixture
    foreign = tmp_path / "llama.pth"
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, foreign)
    with pytest.raises(OfficialCheckpointError, match="not an official RAT checkpoint"):
        convert_official_checkpoint(foreign, 4, 4, "rat")
    damaged = tmp_path / "damaged.pth"
    good = tmp_path / "good.pth"
    torch.save(fixture["checkpoint"], good)
    damaged.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(OfficialCheckpointError, match="Cannot read"):
        convert_official_checkpoint(damaged, 4, 4, "rat")
    with pytest.raises(OfficialCheckpointError, match="not a tensor"):
        convert_official_checkpoint({"task": {"embedding.wte.weight": "oops"}}, 4, 4, "rat")
    with pytest.raises(OfficialCheckpointError, match="does not divide"):
        convert_official_checkpoint(fixture["checkpoint"], 5, 4, "rat")
    with pytest.raises(OfficialCheckpointError, match="give --window"):
        convert_official_checkpoint(fixture["checkpoint"], 4, 4, "rat-swa")


def test_cli_reports_errors_without_writing(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"task": {"something": torch.zeros(2)}}, bad)
    output = tmp_path / "never"
    code = main([str(bad), "--num-heads", "4", "--chunk-size", "4", "--layer-pattern", "rat", "--output", str(output)])
    assert code == 2
    assert "error:" in capsys.readouterr().err
    assert not output.exists()
    assert not list(tmp_path.glob(".converting-*"))
