"""hub_upload.py and modeling_rat/hub/: staging, isolated validation, model card, the upload call and its errors. No
network: the Hub API functions are replaced on `modeling_rat.hub.upload` (where they are imported) by fakes that
record their arguments."""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import httpx2
import pytest
import torch
import yaml
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import hub_upload
from conftest import ROOT, fixture_paths, random_ids, tiny_model
from modeling_rat import RatForCausalLM
from modeling_rat.hub import HubUploadError
from modeling_rat.hub import upload as hub_api
from modeling_rat.hub.model_card import describe_layer_pattern, paper_model_name, results_section, usage_snippet
from modeling_rat.hub.staging import PICKLE_SUFFIXES, load_tokenizer
from modeling_rat.hub.upload import STALE_WEIGHT_PATTERNS, upload_staged_folder
from test_remote_code import PACKAGE_DIR, expected_bundle


CARD_METADATA_KEYS = {"library_name", "pipeline_tag", "license", "tags"}


# ------------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any Hub call that a test did not replace fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected Hub call with {args} {kwargs}")

    for name in ("create_repo", "create_branch", "repo_info", "upload_folder"):
        monkeypatch.setattr(hub_api, name, refuse)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_api, "get_token", lambda: None)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "the", "capital", "of", "france", "is", "paris", "hello", "world", "rat"]
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A tiny model trained for a few optimizer steps on random data, saved with a tokenizer and training leftovers."""
    directory = tmp_path_factory.mktemp("trained")
    model = tiny_model(["rat", "sliding_attention"], initializer_range=0.02)
    initial = model.model.layers[0].mixer.q_proj.weight.detach().clone()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = random_ids(4, 16, seed=5)
    losses = []
    for _ in range(4):
        loss = model(data, labels=data, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] and not torch.equal(initial, model.model.layers[0].mixer.q_proj.weight)
    model.config.use_cache = False  # what training with gradient checkpointing leaves in config.json
    model.save_pretrained(directory)
    # a tokenizer loaded from a local folder and saved again, as training scripts do (it records `is_local`)
    _tiny_tokenizer().save_pretrained(directory / "tokenizer")
    AutoTokenizer.from_pretrained(directory / "tokenizer").save_pretrained(directory)
    shutil.rmtree(directory / "tokenizer")
    assert json.loads((directory / "tokenizer_config.json").read_text()).get("local_files_only") is True
    torch.save(optimizer.state_dict(), directory / "optimizer.pt")  # what a Trainer checkpoint holds besides the model
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    return directory


def _official_fixture(tmp_path, stem="rat_swa_tiny"):
    paths = [p for p in fixture_paths() if p.stem == stem]
    if not paths:
        pytest.fail(f"fixture {stem} missing (see tests/conftest.py FIXTURES)")
    fixture = torch.load(paths[0], weights_only=True)
    checkpoint = tmp_path / "official.pth"
    torch.save(fixture["checkpoint"], checkpoint)
    return fixture, checkpoint


def _official_arguments(fixture, checkpoint):
    arch = fixture["arch"]
    return [str(checkpoint), "--chunk-size", str(arch["chunk_size"]), "--layer-pattern", "rat-swa", "--window", str(arch["window"])]


def _card(folder):
    text = (Path(folder) / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    metadata = yaml.safe_load(text.split("---\n")[1])
    return metadata, text


def _listed_files(output: str) -> dict[str, str]:
    """name -> size as printed by hub_upload."""
    listed = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] in ("B", "KB", "MB", "GB") and parts[2] != "total":
            listed[parts[2]] = f"{parts[0]} {parts[1]}"
    return listed


# ------------------------------------------------------------------------------------------------------ the CLI


def test_help_documents_every_option():
    parser = hub_upload.build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings or action.dest} has no help"
    completed = subprocess.run([sys.executable, "hub_upload.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    for action in parser._actions:
        for option in action.option_strings:
            assert option in completed.stdout, option
    for option in ("--dry-run", "--staging-dir", "--max-shard-size", "--tokenizer", "--metrics", "--private", "--revision",
                   "--commit-message", "--token", "--num-heads", "--chunk-size", "--layer-pattern", "--window"):
        assert option in completed.stdout


def test_setup_declares_the_modules_the_template_and_the_console_script():
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert 'py_modules=["hub_upload"]' in setup
    assert '"modeling_rat.hub"' in setup and '"model_card_template.md"' in setup
    assert "rat-hub-upload=hub_upload:main" in setup


# ---------------------------------------------------------------------------------------------------- dry runs


@pytest.mark.slow
def test_dry_run_stages_a_converted_official_checkpoint(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    fixture, checkpoint = _official_fixture(tmp_path)
    staging = tmp_path / "staging"
    code = hub_upload.main(_official_arguments(fixture, checkpoint) + ["--repo-id", "someone/rat-swa-tiny", "--dry-run", "--staging-dir", str(staging)])
    output = capsys.readouterr()
    assert code == 0, output.err
    expected = {"README.md", "config.json", "generation_config.json", "model.safetensors"} | expected_bundle()
    assert {p.name for p in staging.iterdir()} == expected
    listed = _listed_files(output.out)
    assert set(listed) == expected, output.out
    assert listed["config.json"].endswith("B")
    assert "Dry run: validation passed, nothing was uploaded" in output.out

    config = json.loads((staging / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rat.RatForCausalLM"
    assert config["sliding_window"] == fixture["arch"]["window"] + 1
    for name in expected_bundle():
        assert (staging / name).read_bytes() == (PACKAGE_DIR / name).read_bytes()
    assert "heads: 4 of size 16 (inferred); key/query groups: 2 (the official default" in caplog.text  # the geometry

    metadata, card = _card(staging)
    assert CARD_METADATA_KEYS <= set(metadata)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert metadata["license"] == "apache-2.0" and "rat" in metadata["tags"] and "rat-swa" in metadata["tags"]
    assert 'repo_id = "someone/rat-swa-tiny"' in card and "trust_remote_code=True" in card
    assert "| Chunk size | 4 |" in card
    assert "author  = {Wei, Xiuying and Yadav, Anunay and Pascanu, Razvan and Gulcehre, Caglar}" in card
    assert 'prompt = "Your text here."' not in card, "no tokenizer: the snippet shows token ids"
    assert f"| Sliding window | {fixture['arch']['window'] + 1} tokens" in card
    model = RatForCausalLM.from_pretrained(staging)
    assert f"({model.num_parameters():,})" in card
    assert "(`rat`, `sliding_attention`) × 2 (4 layers)" in card
    # the staged weights are the official model's: they reproduce its logits (tolerance as in test_convert_official)
    with torch.no_grad():
        logits = model(fixture["input_ids"], use_cache=False).logits
    assert (logits - fixture["logits"]).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_dry_run_stages_a_trained_model_with_tokenizer_shards_and_metrics(trained_checkpoint, tmp_path, capsys):
    metrics = tmp_path / "results.json"
    samples = [{"reference": f"adds {i} | numbers", "prediction": f"line one\nline {i}"} for i in range(7)]
    metrics.write_text(json.dumps({
        "train": {"loss": 3.25, "steps": 4}, "eval": {"perplexity": 25.8125}, "note": "tiny | test",
        "model": str(trained_checkpoint), "merged_dir": "staging", "samples": samples,
        "prompt_format": "{document}\nSummary:",
    }))
    staging = tmp_path / "staging"
    code = hub_upload.main([
        str(trained_checkpoint), "--repo-id", "someone/rat-trained", "--dry-run", "--staging-dir", str(staging),
        "--max-shard-size", "40KB", "--metrics", str(metrics), "--base-model", "someone/rat-base",
        "--datasets", "someone/data-a", "someone/data-b", "--license", "mit", "--tags", "tiny",
        "--model-name", "RAT trained", "--dtype", "bfloat16",
    ])
    output = capsys.readouterr()
    assert code == 0, output.err
    names = {p.name for p in staging.iterdir()}
    shards = sorted(name for name in names if name.endswith(".safetensors"))
    assert len(shards) >= 2 and "model.safetensors.index.json" in names, names
    assert all((staging / shard).stat().st_size <= 40_000 * 1.5 for shard in shards)  # one tensor may exceed it a bit
    assert {"tokenizer.json", "tokenizer_config.json"} <= names
    assert not names & {"optimizer.pt", "trainer_state.json"}, "training leftovers must not be staged"
    assert not [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    assert set(_listed_files(output.out)) == names

    metadata, card = _card(staging)
    assert metadata["license"] == "mit"
    assert metadata["base_model"] == "someone/rat-base"
    assert metadata["datasets"] == ["someone/data-a", "someone/data-b"]
    assert {"rat", "tiny"} <= set(metadata["tags"])
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == "# RAT trained"
    assert "## Training and evaluation results" in card
    assert "| train.loss | 3.25 |" in card and "| train.steps | 4 |" in card and "| eval.perplexity | 25.81 |" in card
    assert "| note | tiny \\| test |" in card
    assert "AutoTokenizer.from_pretrained(repo_id, trust_remote_code=True)" in card
    assert "| Weights | safetensors, bfloat16 |" in card
    # no local path, samples as a table of their own (one line per cell, five rows), the SFT prompt format in the snippet
    assert str(trained_checkpoint) not in card and "merged_dir" not in card and str(tmp_path) not in card
    assert "| reference | prediction |" in card and "| adds 0 \\| numbers | line one line 0 |" in card
    assert "adds 4" in card and "adds 5" not in card and "(5 of 7 shown.)" in card
    assert 'prompt = "{document}\\nSummary:".format(document="Your document here.")' in card
    assert "| prompt_format |" not in card
    # training leftovers are not staged
    assert json.loads((staging / "config.json").read_text())["use_cache"] is True
    tokenizer_config = json.loads((staging / "tokenizer_config.json").read_text())
    assert not {"is_local", "local_files_only"} & set(tokenizer_config)

    # the published model is the trained one, in bfloat16, with the tokenizer's special tokens filled in
    source = RatForCausalLM.from_pretrained(trained_checkpoint)
    staged = RatForCausalLM.from_pretrained(staging)
    assert staged.dtype == torch.bfloat16
    for (name, expected), (_, actual) in zip(source.state_dict().items(), staged.state_dict().items()):
        assert torch.equal(actual, expected.to(torch.bfloat16)), name
    assert staged.config.eos_token_id == 2 and staged.config.bos_token_id == 1
    assert json.loads((staging / "generation_config.json").read_text())["eos_token_id"] == 2


@pytest.mark.slow
def test_dry_run_with_relative_paths(trained_checkpoint, tmp_path, monkeypatch, capsys):
    """Relative source and staging paths work: the isolated check runs elsewhere and must get absolute paths."""
    shutil.copytree(trained_checkpoint, tmp_path / "checkpoint")
    monkeypatch.chdir(tmp_path)
    code = hub_upload.main(["checkpoint", "--repo-id", "someone/rat", "--dry-run", "--staging-dir", "runs/staged"])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert (tmp_path / "runs" / "staged" / "model.safetensors").is_file()


@pytest.mark.slow
def test_dry_run_without_staging_dir_leaves_nothing_behind(trained_checkpoint, tmp_path, monkeypatch, capsys):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code = hub_upload.main([str(trained_checkpoint), "--repo-id", "someone/rat", "--dry-run"])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert "use --staging-dir to keep the staged folder" in output.out
    assert "model.safetensors" in _listed_files(output.out)
    assert list(scratch.iterdir()) == []


# ------------------------------------------------------------------------------------------------------ upload


class FakeHub:
    """Records the Hub calls hub_upload makes; `upload_folder` also records the folder's files at call time."""

    def __init__(self, private=True):
        self.calls = []
        self.private = private

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return SimpleNamespace(repo_id=repo_id)

    def repo_info(self, repo_id, **kwargs):
        self.calls.append(("repo_info", repo_id, kwargs))
        return SimpleNamespace(private=self.private)

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
        self.calls.append(("upload_folder", kwargs["repo_id"], dict(kwargs, files=files)))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123")

    def install(self, monkeypatch):
        for name in ("create_repo", "repo_info", "create_branch", "upload_folder"):
            monkeypatch.setattr(hub_api, name, getattr(self, name))

    def named(self, name):
        return [call for call in self.calls if call[0] == name]


@pytest.mark.slow
def test_upload_is_one_commit_of_the_validated_folder(trained_checkpoint, tmp_path, monkeypatch, capsys):
    hub = FakeHub(private=True)
    hub.install(monkeypatch)
    monkeypatch.setenv("HF_TOKEN", "hf_from_environment")
    monkeypatch.setattr(hub_api, "get_token", lambda: "hf_from_environment")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code = hub_upload.main([
        str(trained_checkpoint), "--repo-id", "someone/rat-upload", "--private", "--revision", "v1",
        "--commit-message", "Publish the tiny RAT",
    ])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert [call[0] for call in hub.calls] == ["create_repo", "repo_info", "create_branch", "upload_folder"]
    _, repo_id, create = hub.calls[0]
    assert repo_id == "someone/rat-upload"
    assert create["private"] is True and create["exist_ok"] is True and create["token"] == "hf_from_environment"
    _, _, branch = hub.named("create_branch")[0]
    assert branch["branch"] == "v1" and branch["exist_ok"] is True
    (_, repo_id, upload), = hub.named("upload_folder")
    assert repo_id == "someone/rat-upload"
    assert upload["commit_message"] == "Publish the tiny RAT"
    assert upload["revision"] == "v1" and upload["token"] == "hf_from_environment"
    assert upload["delete_patterns"] == STALE_WEIGHT_PATTERNS
    expected = {"README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                "tokenizer_config.json"} | expected_bundle()
    assert set(upload["files"]) == expected
    assert set(_listed_files(output.out)) == expected
    assert "https://huggingface.co/someone/rat-upload/commit/abc123" in output.out
    assert list(scratch.iterdir()) == [], "the temporary staging folder is removed"


@pytest.mark.slow
def test_token_flag_wins_and_main_needs_no_branch(trained_checkpoint, tmp_path, monkeypatch, capsys):
    hub = FakeHub()
    hub.install(monkeypatch)
    monkeypatch.setattr(hub_api, "get_token", lambda: "hf_saved_login")
    code = hub_upload.main([str(trained_checkpoint), "--repo-id", "someone/rat", "--token", "hf_flag"])
    assert code == 0, capsys.readouterr().err
    assert [call[0] for call in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][2]["token"] == "hf_flag" and hub.calls[0][2]["private"] is None
    upload = hub.calls[1][2]
    assert upload["token"] == "hf_flag" and upload["revision"] is None and upload["commit_message"] == "Upload RAT model"


@pytest.mark.slow
def test_failed_validation_refuses_to_upload(trained_checkpoint, tmp_path, monkeypatch, capsys):
    """A staged folder that computes something else than the source model (here: a changed config) is refused."""
    hub = FakeHub()
    hub.install(monkeypatch)
    staging = tmp_path / "staging"
    stage = hub_upload.stage_checkpoint

    def stage_then_tamper(*args, **kwargs):
        folder = stage(*args, **kwargs)
        config = json.loads((folder / "config.json").read_text())
        config["rope_theta"] = 50.0
        (folder / "config.json").write_text(json.dumps(config))
        return folder

    monkeypatch.setattr(hub_upload, "stage_checkpoint", stage_then_tamper)
    code = hub_upload.main([str(trained_checkpoint), "--repo-id", "someone/rat", "--token", "hf_x", "--staging-dir", str(staging)])
    error = capsys.readouterr().err
    assert code == 2
    assert "Validation failed, nothing was uploaded" in error and "logits that differ" in error
    assert hub.calls == []


@pytest.mark.slow
def test_folder_that_does_not_load_remotely_is_refused(trained_checkpoint, tmp_path, monkeypatch, capsys):
    hub = FakeHub()
    hub.install(monkeypatch)
    stage = hub_upload.stage_checkpoint

    def stage_then_break(*args, **kwargs):
        folder = stage(*args, **kwargs)
        (folder / "rat_ops.py").write_text("raise ImportError('rat_ops is broken')\n")
        return folder

    monkeypatch.setattr(hub_upload, "stage_checkpoint", stage_then_break)
    code = hub_upload.main([str(trained_checkpoint), "--repo-id", "someone/rat", "--token", "hf_x"])
    error = capsys.readouterr().err
    assert code == 2
    assert "does not load with `trust_remote_code=True`" in error and "rat_ops is broken" in error
    assert hub.calls == []


# ------------------------------------------------------------------------------------------------ input errors


def _run_main(arguments, capsys):
    code = hub_upload.main(arguments)
    error = capsys.readouterr().err
    if code != 0:
        error_lines = [line for line in error.splitlines() if line.startswith("error: ")]
        assert len(error_lines) == 1, f"one error line expected:\n{error}"
    return code, error


def test_no_token_is_refused_before_any_work(tmp_path, capsys):
    code, error = _run_main([str(tmp_path / "does-not-matter"), "--repo-id", "someone/rat"], capsys)
    assert code == 2
    assert "No Hugging Face token" in error and "hf auth login" in error and "HF_TOKEN" in error


@pytest.mark.parametrize("repo_id", ["rat-without-owner", "a/b/c", "someone/bad..name"])
def test_invalid_repo_ids_are_refused(repo_id, tmp_path, capsys):
    code, error = _run_main([str(tmp_path), "--repo-id", repo_id, "--dry-run"], capsys)
    assert code == 2 and "--repo-id" in error


def test_source_errors(tmp_path, capsys, trained_checkpoint):
    code, error = _run_main([str(tmp_path / "missing"), "--repo-id", "a/b", "--dry-run"], capsys)
    assert code == 2 and "does not exist" in error
    empty = tmp_path / "empty"
    empty.mkdir()
    code, error = _run_main([str(empty), "--repo-id", "a/b", "--dry-run"], capsys)
    assert code == 2 and "no config.json" in error
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, error = _run_main([str(other), "--repo-id", "a/b", "--dry-run"], capsys)
    assert code == 2 and "'llama' model, not a RAT model" in error
    for text in ("{not json", "[1, 2]"):
        (other / "config.json").write_text(text)
        code, error = _run_main([str(other), "--repo-id", "a/b", "--dry-run"], capsys)
        assert code == 2 and f"Cannot read {other / 'config.json'} as a JSON object" in error
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    code, error = _run_main([str(adapter), "--repo-id", "a/b", "--dry-run"], capsys)
    assert code == 2 and "PEFT adapter" in error and "merge_and_unload" in error
    code, error = _run_main([str(trained_checkpoint), "--repo-id", "a/b", "--dry-run", "--num-heads", "4"], capsys)
    assert code == 2 and "--num-heads" in error and "checkpoint folder" in error
    fixture, checkpoint = _official_fixture(tmp_path)
    code, error = _run_main([str(checkpoint), "--repo-id", "a/b", "--dry-run"], capsys)
    assert code == 2 and "Give --layer-pattern" in error
    code, error = _run_main([*_official_arguments(fixture, checkpoint), "--repo-id", "a/b", "--dry-run", "--num-heads", "0"], capsys)
    assert code == 2 and "--num-heads must be a positive integer, got 0" in error
    official = tmp_path / "not-official.pth"
    torch.save({"task": {"x": torch.zeros(1)}}, official)
    code, error = _run_main([str(official), "--repo-id", "a/b", "--dry-run", "--num-heads", "4", "--chunk-size", "4",
                             "--layer-pattern", "rat"], capsys)
    assert code == 2 and "Cannot convert" in error and "not an official RAT checkpoint" in error


def test_incomplete_or_broken_weights_are_refused(tmp_path, capsys):
    model = tiny_model(["rat", "rat"])
    model.save_pretrained(tmp_path / "partial")
    weights = load_file(tmp_path / "partial" / "model.safetensors")
    del weights["model.layers.1.mixer.q_proj.weight"]
    save_file(weights, tmp_path / "partial" / "model.safetensors", metadata={"format": "pt"})
    code, error = _run_main([str(tmp_path / "partial"), "--repo-id", "a/b", "--dry-run"], capsys)
    assert code == 2 and "does not hold a complete RAT model" in error and "model.layers.1.mixer.q_proj.weight" in error

    with torch.no_grad():
        model.model.layers[0].mixer.forget_gate_bias[3] = float("nan")
    model.save_pretrained(tmp_path / "nan")
    code, error = _run_main([str(tmp_path / "nan"), "--repo-id", "a/b", "--dry-run"], capsys)
    assert code == 2 and "model.layers.0.mixer.forget_gate_bias holds NaN" in error


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_unreadable_weights_are_refused_with_the_file_named(damage, trained_checkpoint, tmp_path, capsys):
    source = tmp_path / "checkpoint"
    shutil.copytree(trained_checkpoint, source)
    data = (source / "model.safetensors").read_bytes()
    (source / "model.safetensors").write_bytes(data[: len(data) // 3] if damage == "truncated" else bytes(range(256)) * 40)
    code, error = _run_main([str(source), "--repo-id", "a/b", "--dry-run"], capsys)
    assert code == 2 and f"Cannot load {source}" in error and f"{source / 'model.safetensors'} cannot be read" in error


def test_staging_dir_must_be_an_empty_writable_folder(trained_checkpoint, tmp_path, capsys):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "old-model.safetensors").write_text("stale")
    code, error = _run_main([str(trained_checkpoint), "--repo-id", "a/b", "--dry-run", "--staging-dir", str(staging)], capsys)
    assert code == 2 and "is not empty" in error
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, error = _run_main([str(trained_checkpoint), "--repo-id", "a/b", "--dry-run", "--staging-dir", str(a_file)], capsys)
    assert code == 2 and f"--staging-dir {a_file} is a file" in error
    code, error = _run_main([str(trained_checkpoint), "--repo-id", "a/b", "--dry-run", "--staging-dir", str(a_file / "staged")], capsys)
    assert code == 2 and f"--staging-dir {a_file / 'staged'} cannot be created: {a_file} is a file, not a folder" in error
    # a place nobody may write to, root included (/sys on Linux; a read-only system volume elsewhere)
    code, error = _run_main([str(trained_checkpoint), "--repo-id", "a/b", "--dry-run", "--staging-dir", "/sys/rat-staging"], capsys)
    assert code == 2 and "Cannot create --staging-dir /sys/rat-staging" in error


@pytest.mark.parametrize(
    "options, message",
    [
        (["--base-model", "CHECKPOINT"], "is not a valid Hub repository id"),
        (["--base-model", "checkpoint"], "--base-model 'checkpoint' is a local path; the model card needs its Hub id"),
        (["--datasets", "someone/data", "checkpoint"], "--datasets 'checkpoint' is a local path"),
        (["--validation-timeout", "0"], "--validation-timeout must be a positive number of seconds"),
        (["--prompt-format", "no field"], "must hold exactly one input field in braces"),
        (["--prompt-format", "{a} and {b}"], "must hold exactly one input field in braces"),
        (["--prompt-format", "{document"], "is not a format string"),
        (["--tokenizer", "./no/such/tokenizer"], "--tokenizer ./no/such/tokenizer does not exist"),
    ],
)
def test_bad_options_are_refused_before_any_work(options, message, trained_checkpoint, tmp_path, monkeypatch, capsys):
    shutil.copytree(trained_checkpoint, tmp_path / "checkpoint")
    monkeypatch.chdir(tmp_path)
    options = [str(tmp_path / "checkpoint") if option == "CHECKPOINT" else option for option in options]
    code, error = _run_main(["checkpoint", "--repo-id", "a/b", "--dry-run", *options], capsys)
    assert code == 2 and message in error, error
    assert list(tmp_path.iterdir()) == [tmp_path / "checkpoint"], "nothing is staged"


def test_a_prompt_format_in_the_metrics_is_checked(trained_checkpoint, tmp_path, capsys):
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"prompt_format": 3}))
    code, error = _run_main([str(trained_checkpoint), "--repo-id", "a/b", "--dry-run", "--metrics", str(metrics)], capsys)
    assert code == 2 and f"prompt_format in --metrics {metrics} must be a string, got 3" in error


@pytest.mark.slow
def test_text_given_on_the_command_line_is_never_run(trained_checkpoint, tmp_path, capsys, caplog):
    """A description holding a ```python block is published as written; validation runs only the tool's own snippet."""
    caplog.set_level("INFO")
    marker = tmp_path / "ran"
    description = f"Try this:\n\n```python\nopen({str(marker)!r}, 'w').write('user code ran')\n```"
    staging = tmp_path / "staging"
    code = hub_upload.main([str(trained_checkpoint), "--repo-id", "someone/rat", "--dry-run", "--staging-dir", str(staging),
                            "--description", description, "--model-name", "```python"])
    output = capsys.readouterr()
    assert code == 0, output.err
    assert not marker.exists(), "text given on the command line was executed"
    _, card = _card(staging)
    assert description in card
    assert "The model card's usage snippet ran against the staged folder" in caplog.text
    code, error = _run_main([str(trained_checkpoint), "--repo-id", "a/b", "--dry-run", "--max-shard-size", "lots"], capsys)
    assert code == 2 and "--max-shard-size 'lots'" in error
    metrics = tmp_path / "metrics.json"
    metrics.write_text("[1, 2]")
    code, error = _run_main([str(trained_checkpoint), "--repo-id", "a/b", "--dry-run", "--metrics", str(metrics)], capsys)
    assert code == 2 and "JSON object" in error
    metrics.write_text("{not json")
    code, error = _run_main([str(trained_checkpoint), "--repo-id", "a/b", "--dry-run", "--metrics", str(metrics)], capsys)
    assert code == 2 and "Cannot read --metrics" in error


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    model = tiny_model(["rat"], vocab_size=8)
    _tiny_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(HubUploadError, match="has 13 tokens but the model embeds only 8"):
        load_tokenizer(tmp_path, model)


# ------------------------------------------------------------------------------------------------ Hub errors


def _http_error(status, error_class=HfHubHTTPError, server_message=None):
    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return error_class(f"{status} Client Error", response=httpx2.Response(status, request=request), server_message=server_message)


def _failing(error):
    def fail(*args, **kwargs):
        raise error

    return fail


@pytest.mark.parametrize(
    "failing_call, error, expected",
    [
        ("create_repo", _http_error(403, server_message="You don't have the rights to create a model under the namespace \"other\""),
         ["may not write to other/rat (403)", "belongs to someone else", "You don't have the rights"]),
        ("upload_folder", _http_error(403), ["may not write to other/rat", "write access"]),
        ("create_repo", _http_error(401), ["rejected the token (401)", "hf auth login"]),
        ("upload_folder", _http_error(404, RepositoryNotFoundError), ["other/rat was not found", "--repo-id"]),
        ("upload_folder", _http_error(503), ["The Hub failed (503)", "nothing was committed"]),
        ("create_repo", OfflineModeIsEnabled("offline"), ["HF_HUB_OFFLINE is set", "--dry-run"]),
        ("upload_folder", httpx2.ConnectError("[Errno -3] name resolution failed"), ["Could not reach the Hugging Face Hub", "network"]),
        ("create_repo", ConnectionResetError("reset by peer"), ["Could not reach the Hugging Face Hub"]),
    ],
)
def test_hub_errors_become_messages_that_say_what_to_do(failing_call, error, expected, tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    hub = FakeHub()
    hub.install(monkeypatch)
    monkeypatch.setattr(hub_api, failing_call, _failing(error))
    with pytest.raises(HubUploadError) as raised:
        upload_staged_folder(tmp_path, "other/rat", token="hf_x")
    for text in expected:
        assert text in str(raised.value), str(raised.value)
    if failing_call == "create_repo":
        assert hub.named("upload_folder") == []


def test_private_upload_into_an_existing_public_repo_is_refused(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    hub = FakeHub(private=False)
    hub.install(monkeypatch)
    with pytest.raises(HubUploadError, match="already exists and is public"):
        upload_staged_folder(tmp_path, "someone/rat", token="hf_x", private=True)
    assert hub.named("upload_folder") == []


# ------------------------------------------------------------------------------------------------ model card


def test_layer_pattern_descriptions():
    assert describe_layer_pattern(["rat"] * 24) == "24 × `rat`"
    assert describe_layer_pattern(["rat", "sliding_attention"] * 12) == "(`rat`, `sliding_attention`) × 12 (24 layers)"
    assert describe_layer_pattern(["rat", "rnn", "full_attention"]) == "`rat`, `rnn`, `full_attention` (3 layers)"
    assert paper_model_name(["full_attention", "sliding_attention"] * 2) == "attention-swa"
    assert paper_model_name(["rat", "rnn"]) is None


def test_results_leave_out_local_paths_and_long_texts(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "data.json").write_text("{}")
    section = results_section({
        "loss": 2.5, "steps": 1200, "ok": True, "betas": [0.9, 0.95], "dataset": "stdlib code summarization",
        "output_dir": "/home/someone/runs/sft", "home": "~/runs", "relative": "runs", "beside_metrics": "data.json",
        "log": "line one\nline two", "long": "x" * 500, "objects": [{"a": [1]}], "mixed": [1, "a"],
    }, folders=[tmp_path])
    assert "| loss | 2.5 |" in section and "| steps | 1,200 |" in section and "| ok | True |" in section
    assert "| betas | 0.9, 0.95 |" in section and "| dataset | stdlib code summarization |" in section
    for left_out in ("/home/someone", "~/runs", "| relative |", "beside_metrics", "line one", "xxxx", "objects", "mixed"):
        assert left_out not in section, left_out
    assert results_section({"output_dir": "/tmp/x"}) == "", "no results section without results"


@pytest.mark.parametrize("has_tokenizer, prompt_format", [(True, None), (True, "{code}\nSummary:"), (False, None)])
def test_usage_snippets_are_python(has_tokenizer, prompt_format):
    snippet = usage_snippet('someone/"quoted"', has_tokenizer, 100, prompt_format)
    compile(snippet, "snippet", "exec")
    assert 'repo_id = "someone/\\"quoted\\""' in snippet
    if prompt_format:
        assert '.format(code="Your code here.")' in snippet


def test_escapes_typed_in_a_prompt_format_are_read():
    assert hub_upload._read_escapes(r"{document}\nSummary:\t\\n") == "{document}\nSummary:\t\\n"
