"""The converter of official checkpoints: fixture parity, the geometry it infers or reads, the CLI, and its errors."""

import re
import subprocess
import sys
import types

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


def _window(arch, pattern):
    """The fixtures record a window for every model; only sliding-window layers use one."""
    return arch["window"] if pattern.endswith("-swa") else None


def _convert(fixture, arch, pattern, **kwargs):
    return convert_official_checkpoint(fixture["checkpoint"], arch["num_head"], arch["chunk_size"], pattern, _window(arch, pattern), **kwargs)


def _cli_arguments(path, arch, pattern, output):
    arguments = [str(path), "--num-heads", str(arch["num_head"]), "--chunk-size", str(arch["chunk_size"]), "--layer-pattern", pattern,
                 "--output", str(output)]
    return arguments + (["--window", str(arch["window"])] if pattern.endswith("-swa") else [])


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
    command = [sys.executable, "-m", "modeling_rat.convert_official", *_cli_arguments(source, arch, pattern, output)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Converted" in result.stdout
    # the geometry it used, and where each value came from
    assert f"heads: {arch['num_head']} of size {arch['d_head']} (given); key/query groups: {arch['ngroups']} (inferred" in result.stdout
    assert f"chunk size: {arch['chunk_size']} (given)" in result.stdout
    assert "the paper's 1.3B models: hidden size 2048, 16 heads of size 128, 2 key/query groups, chunk size 16" in result.stdout
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


# ------------------------------------------------------------------------------------------ geometry and options


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_heads=0), "--num-heads must be a positive integer, got 0"),
        (dict(num_heads=-4), "--num-heads must be a positive integer"),
        (dict(num_heads=3), r"--num-heads 3 does not divide the hidden size 64: head counts that do are \[1, 2, 4"),
        # the fixture has 4 heads of size 16 and 2 groups: 8 heads would need 4 groups, which the default (2) rules out
        (dict(num_heads=8), r"would be 4 key/query groups, but the official default \(ngroups\) is 2.*4 \(head size 16, 2 groups\)"),
        (dict(num_heads=8, num_qk_groups=2), "do not fit the RAT layers' 32-wide queries"),
        (dict(num_heads=1), "--num-heads 1 \\(head size 64\\) does not fit the RAT layers, whose queries are 32 wide"),
        (dict(num_heads=None, num_qk_groups=3), "not 3 key/query groups"),
        (dict(num_heads=None, num_qk_groups=0), "--num-qk-groups must be a positive integer"),
        (dict(chunk_size=0), r"--chunk-size must be a positive integer \(the paper's is 16\), got 0"),
        (dict(chunk_size=None), "Give --chunk-size"),
        (dict(layer_pattern=None), "Give --layer-pattern"),
        (dict(layer_pattern="mamba"), "Unknown layer pattern 'mamba'"),
        (dict(window=8), "--window is for sliding-window layers, and the layers \\['rat'\\] have none"),
    ],
)
def test_geometry_that_cannot_be_right_is_refused(options, message, rat_fixture, tmp_path):
    fixture, arch, _ = rat_fixture
    arguments = dict(num_heads=arch["num_head"], chunk_size=arch["chunk_size"], layer_pattern="rat") | options
    output = tmp_path / "out"
    with pytest.raises(OfficialCheckpointError, match=message):
        convert_official_checkpoint(fixture["checkpoint"], output_dir=output, **arguments)
    assert list(tmp_path.iterdir()) == [], "nothing is written"


@pytest.mark.parametrize("window, message", [(-5, r"--window must be an integer >= 0 \(the official window_size W: a query sees W \+ 1"),
                                             (None, "give --window")])
def test_sliding_window_options(window, message):
    path = [p for p in fixture_paths() if p.stem == "rat_swa_tiny"][0]
    fixture, arch, _ = _load_fixture(path)
    with pytest.raises(OfficialCheckpointError, match=message):
        convert_official_checkpoint(fixture["checkpoint"], arch["num_head"], arch["chunk_size"], "rat-swa", window)


def test_head_count_is_inferred_from_the_weights_and_the_group_count(rat_fixture):
    fixture, arch, _ = rat_fixture
    model = convert_official_checkpoint(fixture["checkpoint"], chunk_size=arch["chunk_size"], layer_pattern="rat")
    assert (model.config.num_attention_heads, model.config.num_qk_groups) == (arch["num_head"], arch["ngroups"])
    # a model trained with ngroups=4 would have 8 heads of size 4 in the same weights: the options must say so
    model = convert_official_checkpoint(fixture["checkpoint"], chunk_size=arch["chunk_size"], layer_pattern="rat", num_qk_groups=4)
    assert (model.config.num_attention_heads, model.config.num_qk_groups) == (8, 4)


def test_attention_layers_need_the_head_count(tmp_path):
    path = [p for p in fixture_paths() if p.stem == "rat_swa_tiny"][0]
    fixture, arch, _ = _load_fixture(path)
    state = {k: v for k, v in fixture["checkpoint"]["task"].items()}
    # keep only the sliding-window layers (odd indices), renumbered: an attention-only model
    odd = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("backbone.layers."):
            index = int(parts[2])
            if index % 2 == 0:
                continue
            parts[2] = str(index // 2)
        odd[".".join(parts)] = value
    with pytest.raises(OfficialCheckpointError, match="Give --num-heads: attention layers do not reveal their head count"):
        convert_official_checkpoint({"task": odd}, layer_pattern="attention")
    model = convert_official_checkpoint({"task": odd}, num_heads=arch["num_head"], layer_pattern="attention")
    assert model.config.layer_types == ["full_attention", "full_attention"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_weights_that_are_not_finite_are_refused(value, rat_fixture, tmp_path):
    fixture, arch, _ = rat_fixture
    state = _state(fixture)
    state["backbone.layers.1.seq_layer.gate_bias"] = state["backbone.layers.1.seq_layer.gate_bias"].clone()
    state["backbone.layers.1.seq_layer.gate_bias"][5] = value
    with pytest.raises(OfficialCheckpointError, match="'backbone.layers.1.seq_layer.gate_bias' holds NaN or infinite values"):
        convert_official_checkpoint({"task": state}, arch["num_head"], arch["chunk_size"], "rat", output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- the training config


def _training_config(arch, pattern, **changes):
    """The resolved hydra config the official trainer saves (`config` of its checkpoints), for a fixture."""
    rat = {"_name_": "rat", "d_model": arch["d_model"], "d_head": arch["d_head"], "num_head": arch["num_head"],
           "k_channel": arch["d_head"], "ngroups": arch["ngroups"], "chunk_size": arch["chunk_size"]}
    local = {"_name_": "local_attention", "d_model": arch["d_model"], "d_head": arch["d_head"], "num_head": arch["num_head"],
             "k_channel": arch["d_head"], "window_size": arch["window"]}
    backbone = {"_name_": "sequence", "num_layers": arch["num_layers"], "d_model": arch["d_model"], "seq_cell": rat,
                "hidden_cell": {"_name_": "ffn", "d_ffn": arch["ffn_mult"] * arch["d_model"], "act_fn": "gelu"}}
    if pattern == "rat-swa":
        backbone.update(_name_="sequence_interleave", interleave_step=2, seq_cell=local, seq_cell1=rat)
    config = {"model": {"backbone": backbone, "embedding": {"pe": {"base": 10000}}},
              "data": {"seq_len": 4096, "vocab_size": arch["vocab"]}, "task": {"tie_embedding": True}, "trainer": {"dtype": "bfloat16"}}
    for path, value in changes.items():
        *parents, leaf = path.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _save_official(path, fixture, training_config, monkeypatch):
    """Save as the official trainer does: the config is an `easydict.EasyDict` (a dict subclass), with optimizer state."""
    easydict = types.ModuleType("easydict")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__, easydict.EasyDict = "easydict", "EasyDict", EasyDict
    monkeypatch.setitem(sys.modules, "easydict", easydict)

    def wrap(node):
        return EasyDict({key: wrap(value) for key, value in node.items()}) if isinstance(node, dict) else node

    torch.save({"task": fixture["checkpoint"]["task"], "config": wrap(training_config), "step": 9,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95)}]},
                "lr_scheduler": {"last_epoch": 9}, "resume_kwargs": {"resume_step": 9}}, path)
    monkeypatch.delitem(sys.modules, "easydict")  # the converter must read it without easydict


@pytest.mark.parametrize("path", fixture_paths(), ids=lambda p: p.stem)
def test_the_training_config_of_a_checkpoint_gives_the_architecture(path, tmp_path, monkeypatch, capsys):
    fixture, arch, pattern = _load_fixture(path)
    checkpoint = tmp_path / "official.pth"
    _save_official(checkpoint, fixture, _training_config(arch, pattern), monkeypatch)
    code = main([str(checkpoint), "--output", str(tmp_path / "converted")])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert f"(training config: {', '.join(dict.fromkeys(_converted_types(pattern)))})" in output.out
    assert f"heads: {arch['num_head']} of size {arch['d_head']} (training config); key/query groups: {arch['ngroups']} (training config" in output.out
    model = RatForCausalLM.from_pretrained(tmp_path / "converted")
    assert model.config.rnn_forget_gate_init_length == 4096  # the training length
    if pattern == "rat-swa":
        assert model.config.sliding_window == arch["window"] + 1
    with torch.no_grad():
        assert (model(fixture["input_ids"], use_cache=False).logits - fixture["logits"]).abs().max().item() <= 1e-3


def _converted_types(pattern):
    return ["rat", "sliding_attention"] if pattern == "rat-swa" else ["rat"]


@pytest.mark.parametrize(
    "changes, options, message",
    [
        ({}, ["--chunk-size", "8"], r"--chunk-size 8 disagrees with the checkpoint's training config \(4\)"),
        ({}, ["--num-heads", "2", "--num-qk-groups", "1"], "--num-heads 2 disagrees with the checkpoint's training config"),
        ({}, ["--layer-pattern", "rnn"], "--layer-pattern .* disagrees with the checkpoint's training config"),
        ({"model.backbone.d_model": 128}, [], "The training config states hidden_size 128, the weights 64"),
        ({"data.vocab_size": 32000}, [], "The training config states vocab_size 32000, the weights 101"),
        ({"model.backbone.seq_cell._name_": "mamba"}, [], r"The training config has layers \['mamba'\]"),
        ({"model.backbone._name_": "mixture"}, [], "Unknown official backbone 'mixture'"),
        ({"model.backbone.seq_cell.k_channel": 8}, [], "k_channel differs from d_head"),
        ({"model": {}}, [], "does not have the official layout"),
    ],
)
def test_options_must_agree_with_the_training_config(changes, options, message, rat_fixture, tmp_path, monkeypatch, capsys):
    fixture, arch, pattern = rat_fixture
    checkpoint = tmp_path / "official.pth"
    _save_official(checkpoint, fixture, _training_config(arch, pattern, **changes), monkeypatch)
    code = main([str(checkpoint), "--output", str(tmp_path / "converted"), *options])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1, error
    assert re.search(message, error), error
    assert not (tmp_path / "converted").exists()


# ---------------------------------------------------------------------------------------------------- the CLI


def _cli_error(arguments, capsys):
    code = main(arguments)
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("error: ") and len(error.strip().splitlines()) == 1, f"one error line expected, got:\n{error}"
    return error


def test_cli_errors_are_one_line(rat_fixture, tmp_path, capsys):
    fixture, arch, pattern = rat_fixture
    checkpoint = tmp_path / "official.pth"
    torch.save(fixture["checkpoint"], checkpoint)
    arguments = _cli_arguments(checkpoint, arch, pattern, tmp_path / "out")
    assert "--num-heads must be a positive integer, got 0" in _cli_error([*arguments, "--num-heads", "0"], capsys)
    assert "--window is for sliding-window layers" in _cli_error([*arguments, "--window", "-5"], capsys)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    assert f"--output {a_file} is a file" in _cli_error([*arguments, "--output", str(a_file)], capsys)
    assert f"{a_file} is a file, not a folder" in _cli_error([*arguments, "--output", str(a_file / "converted")], capsys)
    # a place nobody may write to, root included (/sys on Linux; a read-only system volume elsewhere)
    assert "Cannot write the converted model to --output /sys/rat-converted" in _cli_error([*arguments, "--output", "/sys/rat-converted"], capsys)
    full = tmp_path / "full"
    full.mkdir()
    (full / "model.safetensors").write_text("earlier")
    assert "exists and is not empty" in _cli_error([*arguments, "--output", str(full)], capsys)
    assert (full / "model.safetensors").read_text() == "earlier"
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".converting-*"))


def test_cli_window_minus_five_is_explained(tmp_path, capsys):
    path = [p for p in fixture_paths() if p.stem == "rat_swa_tiny"][0]
    fixture, arch, pattern = _load_fixture(path)
    checkpoint = tmp_path / "official.pth"
    torch.save(fixture["checkpoint"], checkpoint)
    arguments = _cli_arguments(checkpoint, arch, pattern, tmp_path / "out")
    error = _cli_error([*arguments, "--window", "-5"], capsys)
    assert "--window must be an integer >= 0 (the official window_size W: a query sees W + 1 tokens), got -5" in error


def test_a_layer_pattern_that_does_not_match_the_weights_is_named():
    path = [p for p in fixture_paths() if p.stem == "rat_swa_tiny"][0]
    fixture, arch, _ = _load_fixture(path)
    with pytest.raises(OfficialCheckpointError, match=r"layers \[1, 3\]: 192 rows; layers \[0, 2\]: 256 rows.*check --layer-pattern"):
        convert_official_checkpoint(fixture["checkpoint"], chunk_size=arch["chunk_size"], layer_pattern="rat")
