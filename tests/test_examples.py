"""The example jobs with tiny settings: pretraining, LoRA SFT with ROUGE, the demo, the paper comparison, and
several processes through `accelerate launch` (CPU, gloo)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ROOT, tiny_config
from modeling_rat import RatForCausalLM
from modeling_rat.training import DEFAULT_CHAT_TEMPLATE, is_complete_checkpoint, latest_complete_checkpoint


import compare_paper_models  # noqa: E402
import demo  # noqa: E402
import pretrain  # noqa: E402
import sft_summarization  # noqa: E402


WORDS = ("the a model reads text and writes short summaries of long documents about cats dogs trains ships "
         "rivers cities music books code tests data").split()

TINY_MODEL = ["--size", "tiny", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "4", "--chunk-size", "4",
              "--block-size", "32", "--vocab-size", "300", "--batch-size", "2", "--max-eval-blocks", "4",
              "--logging-steps", "1", "--disable-tqdm"]


def sentence(index, length=12):
    return " ".join(WORDS[(index * 7 + k * 3) % len(WORDS)] for k in range(length))


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def text_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm-data")
    write_jsonl(folder / "train.jsonl", [{"content": sentence(i, 40)} for i in range(60)])
    write_jsonl(folder / "validation.jsonl", [{"content": sentence(i + 100, 40)} for i in range(10)])
    return folder


@pytest.fixture(scope="module")
def summarization_dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("summarization-data")
    for split, offset, count in (("train", 0, 32), ("validation", 100, 6), ("test", 200, 6)):
        write_jsonl(folder / f"{split}.jsonl",
                    [{"dialogue": sentence(offset + i, 30), "summary": sentence(offset + i, 4)} for i in range(count)])
    return folder


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, text_dataset):
    output = tmp_path_factory.mktemp("pretrained") / "rat-swa"
    metrics = pretrain.main(["--model", "rat-swa", "--dataset", str(text_dataset), "--text-column", "content",
                             "--max-steps", "3", "--output-dir", str(output)] + TINY_MODEL)
    return output, metrics


def test_pretrain_on_a_dataset_saves_a_remote_code_checkpoint(pretrained):
    output, metrics = pretrained
    assert metrics["model"] == "rat-swa" and metrics["layer_types"] == ["rat", "sliding_attention"]
    assert torch.isfinite(torch.tensor(metrics["eval_loss"])) and metrics["eval_perplexity"] > 1
    assert metrics["train_tokens"] == 3 * 2 * 32
    files = {path.name for path in output.iterdir()}
    assert {"config.json", "configuration_rat.py", "modeling_rat.py", "model.safetensors", "tokenizer.json",
            "pretrain_results.json"} <= files
    config = json.loads((output / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rat.RatForCausalLM"
    assert config["sliding_window"] == 8, "default window: block size / 4"
    assert config["rnn_forget_gate_init_length"] == 32 and "max_position_embeddings" not in config
    tokenizer = AutoTokenizer.from_pretrained(output)
    assert config["vocab_size"] == len(tokenizer) and config["pad_token_id"] == tokenizer.pad_token_id
    # The trained tokenizer ships the ChatML template; generation stops at the end of a text or of a chat turn.
    assert tokenizer.chat_template == DEFAULT_CHAT_TEMPLATE
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    checkpoints = sorted(output.glob("checkpoint-*"))
    assert [path.name for path in checkpoints] == ["checkpoint-2", "checkpoint-3"], "saved at each validation, 2 kept"
    assert all(is_complete_checkpoint(path) for path in checkpoints)
    assert metrics["resumed_from"] is None
    model = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True)
    ids = tokenizer("the model reads text", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert json.loads((output / "pretrain_results.json").read_text())["eval_loss"] == metrics["eval_loss"]


def test_pretrain_default_corpus_is_the_standard_library(tmp_path):
    metrics = pretrain.main(["--model", "rnn", "--max-steps", "2", "--max-train-chars", "60000",
                             "--tokenizer-train-chars", "60000", "--output-dir", str(tmp_path / "out")] + TINY_MODEL)
    assert "Python standard library" in metrics["corpus"]
    assert metrics["layer_types"] == ["rnn", "rnn"]
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()


def test_pretrain_explicit_sizes(tmp_path, text_dataset):
    args = pretrain.build_parser().parse_args(["--model", "attention", "--size", "small", "--hidden-size", "48",
                                                "--num-layers", "3", "--num-heads", "6"])
    from modeling_rat.training import train_byte_level_bpe

    config = pretrain.build_config(args, train_byte_level_bpe(["a b c"] * 3, vocab_size=300))
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (48, 3, 6)
    assert config.intermediate_size == 4 * 48 and config.layer_types == ["full_attention"] * 3
    with pytest.raises(SystemExit):
        pretrain.build_parser().parse_args(["--model", "transformer"])


def test_sft_on_a_hub_style_dataset(tmp_path, pretrained, summarization_dataset):
    model_dir, _ = pretrained
    results = sft_summarization.main([
        "--model", str(model_dir), "--dataset", str(summarization_dataset), "--document-column", "dialogue",
        "--max-steps", "2", "--batch-size", "2", "--max-length", "32", "--max-summary-tokens", "8",
        "--eval-examples", "4", "--max-new-tokens", "6", "--output-dir", str(tmp_path / "sft"), "--disable-tqdm",
        "--logging-steps", "1",
    ])
    for key in ("rouge_before", "rouge_after"):
        assert set(results[key]) == {"rouge1", "rouge2", "rougeL"}
        assert all(0 <= value <= 100 for value in results[key].values())
    assert results["test_examples"] == 4 and results["train_examples"] == 32
    assert torch.isfinite(torch.tensor(results["eval_loss"]))
    adapter, merged = tmp_path / "sft" / "adapter", tmp_path / "sft" / "merged"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "output_gate_proj",
                                                      "forget_gate_proj", "up_proj", "down_proj"}
    assert {"modeling_rat.py", "configuration_rat.py", "config.json", "tokenizer.json"} <= {p.name for p in merged.iterdir()}

    # The merged model equals base + adapter.
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)
    adapted = PeftModel.from_pretrained(base, adapter).eval()
    merged_model = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True).eval()
    ids = AutoTokenizer.from_pretrained(merged)("the model reads text and writes", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = adapted(ids).logits
        torch.testing.assert_close(merged_model(ids).logits, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    saved = json.loads((tmp_path / "sft" / "sft_results.json").read_text())
    assert saved["rouge_after"] == results["rouge_after"]


@pytest.mark.slow
def test_sft_rerun_resumes_its_finished_adapter(tmp_path, pretrained, summarization_dataset):
    """The same SFT command twice: the second run finds the LoRA checkpoint holding every step, loads the adapter
    without training again, and writes the same merged model."""
    model_dir, _ = pretrained
    argv = ["--model", str(model_dir), "--dataset", str(summarization_dataset), "--document-column", "dialogue",
            "--max-steps", "2", "--batch-size", "2", "--max-length", "32", "--max-summary-tokens", "8",
            "--eval-examples", "2", "--max-new-tokens", "2", "--output-dir", str(tmp_path / "sft"), "--disable-tqdm"]
    first = sft_summarization.main(argv)
    merged = AutoModelForCausalLM.from_pretrained(first["merged_dir"], trust_remote_code=True).state_dict()
    second = sft_summarization.main(argv)
    assert first["resumed_from"] is None and second["resumed_from"].endswith("checkpoint-2")
    assert second["train_loss"] is None and second["eval_loss"] == first["eval_loss"]
    again = AutoModelForCausalLM.from_pretrained(second["merged_dir"], trust_remote_code=True).state_dict()
    for name, tensor in merged.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=0, msg=name)
    assert sorted(path.name for path in (tmp_path / "sft" / "trainer").glob("checkpoint-*")) == ["checkpoint-1",
                                                                                                  "checkpoint-2"]


@pytest.mark.slow
def test_sft_default_task_without_packing(tmp_path, pretrained):
    model_dir, _ = pretrained
    results = sft_summarization.main([
        "--model", str(model_dir), "--max-steps", "1", "--batch-size", "2", "--max-length", "32",
        "--max-summary-tokens", "8", "--max-train-examples", "16", "--max-validation-examples", "4",
        "--eval-examples", "3", "--max-new-tokens", "4", "--no-packing", "--output-dir", str(tmp_path / "sft"),
        "--disable-tqdm",
    ])
    assert results["dataset"] == "stdlib code summarization" and results["test_examples"] == 3


def test_demo_pipeline_reports_a_missing_hub_upload(tmp_path, monkeypatch):
    """The demo's orchestration, with its stages stubbed (they are tested above): it reports a missing
    hub_upload.py clearly and calls an existing one with the agreed interface."""
    merged = tmp_path / "merged"
    merged.mkdir()
    monkeypatch.setattr(pretrain, "main", lambda argv: {
        "parameters": 10, "layer_types": ["rat"], "steps": 1, "train_tokens": 8, "eval_loss": 1.0,
        "eval_perplexity": 2.7})
    monkeypatch.setattr(sft_summarization, "main", lambda argv: {
        "train_examples": 4, "test_examples": 2, "eval_loss": 1.0, "merged_dir": str(merged),
        "adapter_dir": str(tmp_path / "adapter"), "rouge_before": {"rouge1": 1, "rouge2": 0, "rougeL": 1},
        "rouge_after": {"rouge1": 9, "rouge2": 2, "rougeL": 8}})
    summary = demo.main(["--output-dir", str(tmp_path / "demo"), "--hub-upload", str(tmp_path / "missing.py")])
    assert summary["hub"]["status"] == "missing" and "hub_upload.py not found" in summary["hub"]["message"]

    recorder = tmp_path / "hub_upload.py"
    recorder.write_text(
        "import json, sys, pathlib\n"
        "args = sys.argv[1:]\n"
        "staging = pathlib.Path(args[args.index('--staging-dir') + 1]); staging.mkdir(parents=True)\n"
        "(staging / 'argv.json').write_text(json.dumps(args))\n"
    )
    summary = demo.main(["--output-dir", str(tmp_path / "demo2"), "--hub-upload", str(recorder)])
    assert summary["hub"]["status"] == "staged"
    argv = json.loads((tmp_path / "demo2" / "hub-staging" / "argv.json").read_text())
    assert argv == [str(merged), "--repo-id", "local/rat-demo", "--dry-run", "--staging-dir",
                    str(tmp_path / "demo2" / "hub-staging")]


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path):
    """The real demo (tiny budgets): pretraining, SFT with ROUGE, Hub staging or a clear note that it is missing."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--quick", "--output-dir", str(tmp_path / "demo")],
        cwd=ROOT, capture_output=True, text=True, timeout=1200, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "RAT demo summary" in result.stdout and "ROUGE-1/2/L" in result.stdout
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    if (ROOT / "hub_upload.py").is_file():
        assert summary["hub"]["status"] == "staged", summary["hub"]
        staged = set(summary["hub"]["files"])
        assert {"config.json", "modeling_rat.py", "model.safetensors", "tokenizer.json"} <= staged
    else:
        assert summary["hub"]["status"] == "missing"
        assert "hub_upload.py not found" in result.stdout + result.stderr


@pytest.mark.slow
def test_compare_paper_models_writes_table_and_plot(tmp_path):
    results = compare_paper_models.main([
        "--models", "rat", "attention-swa", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "4",
        "--chunk-size", "4", "--block-size", "32", "--vocab-size", "300", "--max-steps", "2", "--batch-size", "2",
        "--eval-steps", "1", "--max-train-chars", "40000", "--max-eval-blocks", "2",
        "--results-dir", str(tmp_path / "results"), "--work-dir", str(tmp_path / "work"),
    ])
    assert [r["model"] for r in results] == ["rat", "attention-swa"]
    assert results[0]["train_tokens"] == results[1]["train_tokens"]
    table = (tmp_path / "results" / "paper_comparison.md").read_text()
    assert "| rat | rat |" in table and "| attention-swa | full_attention/sliding_attention |" in table
    png = (tmp_path / "results" / "paper_comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_compare_table_marks_resumed_runs(tmp_path):
    """A run continued from an earlier invocation's checkpoint has no meaningful wall time: the table says so."""
    args = compare_paper_models.build_parser().parse_args([])
    run = {"model": "rat", "layer_types": ["rat"], "parameters": 10, "non_embedding_parameters": 5, "eval_loss": 4.0,
           "eval_perplexity": 54.6, "train_seconds": 12.3, "train_tokens": 100, "corpus": "c",
           "eval_history": [{"step": 1, "eval_loss": 4.0}]}
    resumed = dict(run, model="rnn", layer_types=["rnn"], train_seconds=0.2, resumed_from="work/rnn/checkpoint-4")
    compare_paper_models.write_results([dict(run, resumed_from=None), resumed], args, tmp_path)
    table = (tmp_path / "paper_comparison.md").read_text()
    assert "| 4.0000 | 54.6 | 12 |" in table and "| 4.0000 | 54.6 | resumed |" in table


# On CPU, `--multi_gpu` selects accelerate's multi-process (torchrun) launcher; the scripts pass `use_cpu=True` to the
# Trainer on machines without an accelerator, so the processes join one gloo process group (`--cpu` would start a
# single process).
ACCELERATE_CPU = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]


def run_two_processes(script, arguments, tmp_path):
    environment = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                       MASTER_PORT=str(29500 + os.getpid() % 1000))
    result = subprocess.run(
        [sys.executable, *ACCELERATE_CPU, str(ROOT / "examples" / script), *arguments],
        cwd=tmp_path, capture_output=True, text=True, timeout=900, env=environment,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path, text_dataset, summarization_dataset):
    run_two_processes("pretrain.py", [
        "--model", "rat", "--dataset", str(text_dataset), "--text-column", "content", "--max-steps", "3",
        "--output-dir", str(tmp_path / "pre")] + TINY_MODEL, tmp_path)
    metrics = json.loads((tmp_path / "pre" / "pretrain_results.json").read_text())
    assert metrics["processes"] == 2
    assert metrics["train_tokens"] == 3 * 2 * 2 * 32, "two processes: twice the tokens per step"
    assert (tmp_path / "pre" / "model.safetensors").is_file()

    run_two_processes("sft_summarization.py", [
        "--model", str(tmp_path / "pre"), "--dataset", str(summarization_dataset), "--document-column", "dialogue",
        "--max-steps", "2", "--batch-size", "2", "--max-length", "32", "--max-summary-tokens", "8",
        "--eval-examples", "2", "--max-new-tokens", "4", "--output-dir", str(tmp_path / "sft"), "--disable-tqdm",
    ], tmp_path)
    results = json.loads((tmp_path / "sft" / "sft_results.json").read_text())
    assert "rouge_after" in results and results["processes"] == 2
    assert (tmp_path / "sft" / "merged" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["fsdp.yaml", "deepspeed_zero2.yaml", "multi_process_cpu.yaml"])
def test_accelerate_configs_load(name):
    """The multi-GPU configs cannot run on a CPU-only machine; check that accelerate reads them and that the FSDP
    wrap class is the model's block."""
    from accelerate.commands.config.config_args import load_config_from_file

    from modeling_rat import RatForCausalLM

    config = load_config_from_file(str(ROOT / "examples" / "configs" / name))
    assert config.num_machines == 1 and config.num_processes >= 2
    if name == "fsdp.yaml":
        assert config.distributed_type == "FSDP"
        wrap = config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"]
        assert wrap in RatForCausalLM._no_split_modules
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    if name == "deepspeed_zero2.yaml":
        assert config.distributed_type == "DEEPSPEED" and config.deepspeed_config["zero_stage"] == 2


@pytest.mark.slow
def test_sft_without_model_pretrains_a_base_first(tmp_path):
    results = sft_summarization.main([
        "--base-steps", "1", "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--max-summary-tokens", "8",
        "--max-train-examples", "8", "--max-validation-examples", "2", "--eval-examples", "2", "--max-new-tokens", "2",
        "--output-dir", str(tmp_path / "sft"), "--disable-tqdm",
    ])
    base = tmp_path / "sft" / "base-model"
    assert results["model"] == str(base)
    assert json.loads((base / "pretrain_results.json").read_text())["steps"] == 1
    assert (tmp_path / "sft" / "merged" / "model.safetensors").is_file()


def test_pretraining_blocks_supervise_eos_even_when_it_pads():
    """A Hub tokenizer without a padding token pads with EOS (`ensure_pad_token`): the EOS separators between
    documents must still be predicted (labels are the inputs, nothing masked)."""
    from transformers import default_data_collator

    from modeling_rat.training import ensure_pad_token, train_byte_level_bpe

    tokenizer = train_byte_level_bpe([sentence(i) for i in range(20)], vocab_size=300)
    tokenizer.pad_token = None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    blocks = pretrain.tokenize_into_blocks([sentence(i, 5) for i in range(12)], tokenizer, block_size=16)
    batch = default_data_collator([blocks[i] for i in range(len(blocks))])
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert int((batch["labels"] == tokenizer.eos_token_id).sum()) >= 6


# ========================================================================================== bad input on the CLI


def cli_error(main, argv, capsys, status=1):
    """Run an example's entry point as its command line does; return its one `error:` line."""
    from modeling_rat.training.cli import run_command

    with pytest.raises(SystemExit) as exit_info:
        run_command(main, argv)
    assert exit_info.value.code == status
    error = capsys.readouterr().err
    assert "Traceback" not in error
    lines = [line for line in error.splitlines() if "error:" in line]
    assert len(lines) == 1, error[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """Files and folders a user might pass by mistake."""
    folder = tmp_path_factory.mktemp("bad-inputs")
    (folder / "empty.jsonl").write_text("")
    (folder / "header-only.csv").write_text("text\n")
    (folder / "broken.jsonl").write_text('{"text": "fine"}\n{not json\n')
    (folder / "notes.docx").write_text("not a data file")
    for name, content in (("empty-folder", ""), ("csv-folder", "text\n")):
        (folder / name).mkdir()
        (folder / name / ("train.csv" if name == "csv-folder" else "train.jsonl")).write_text(content)
    RatForCausalLM(tiny_config(vocab_size=300)).save_pretrained(folder / "model-without-tokenizer")
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder / "llama")
    return folder


PRETRAIN_BAD_INPUTS = {
    "empty .jsonl file": (["--dataset", "{bad}/empty.jsonl"], "empty.jsonl: a data file is empty"),
    "folder with an empty .jsonl": (["--dataset", "{bad}/empty-folder"], "empty-folder: a data file is empty"),
    "header-only CSV file": (["--dataset", "{bad}/header-only.csv"], "a CSV with only a header"),
    "folder with a header-only CSV": (["--dataset", "{bad}/csv-folder"], "a CSV with only a header"),
    "unreadable JSON lines": (["--dataset", "{bad}/broken.jsonl"], "cannot read its data"),
    "unknown data file type": (["--dataset", "{bad}/notes.docx"], "unknown data file type '.docx'"),
    "missing local dataset": (["--dataset", "./no-such-data"], "--dataset ./no-such-data: no such file or folder"),
    "missing local tokenizer": (["--tokenizer", "{bad}/no-such-tokenizer"], "no-such-tokenizer: no such file"),
    "folder without a tokenizer": (["--tokenizer", "{bad}/model-without-tokenizer"], "holds no tokenizer"),
    "output folder is a file": (["--output-dir", "{bad}/empty.jsonl"], "--output-dir {bad}/empty.jsonl is a file"),
    "incomplete checkpoint": (["--resume-from-checkpoint", "{bad}/empty-folder"], "is not a complete Trainer"),
}


@pytest.mark.parametrize("case", list(PRETRAIN_BAD_INPUTS))
def test_pretrain_bad_input_is_one_error_line(case, bad_inputs, text_dataset, tmp_path, capsys):
    arguments, message = PRETRAIN_BAD_INPUTS[case]
    argv = ["--dataset", str(text_dataset), "--text-column", "content", "--max-steps", "1",
            "--output-dir", str(tmp_path / "out")] + TINY_MODEL + [a.format(bad=bad_inputs) for a in arguments]
    line = cli_error(pretrain.main, argv, capsys)
    assert line.startswith("error: ") and message.format(bad=bad_inputs) in line, line


@pytest.mark.parametrize("option", ["--sliding-window", "--eval-steps", "--save-steps", "--batch-size",
                                    "--gradient-accumulation-steps", "--tokenizer-train-chars", "--save-total-limit"])
def test_pretrain_refuses_zero_where_a_count_is_needed(option, capsys):
    """0 used to fall back to the default silently (window, eval and save steps), train a tokenizer on no text, or
    divide by zero."""
    with pytest.raises(SystemExit) as exit_info:
        pretrain.build_parser().parse_args([option, "0"])
    assert exit_info.value.code == 2
    assert f"argument {option}: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--validation-fraction", "0"), ("--validation-fraction", "1.5"),
                                           ("--learning-rate", "-1"), ("--warmup-ratio", "nan"),
                                           ("--block-size", "1")])
def test_pretrain_refuses_numbers_out_of_range(option, value, capsys):
    with pytest.raises(SystemExit):
        pretrain.build_parser().parse_args([option, value])
    assert f"argument {option}: must be" in capsys.readouterr().err


def test_pretrain_refuses_to_resume_another_architecture(pretrained, tmp_path, text_dataset, capsys):
    output, _ = pretrained
    checkpoint = latest_complete_checkpoint(output)
    argv = ["--model", "rat-swa", "--dataset", str(text_dataset), "--text-column", "content", "--max-steps", "4",
            "--output-dir", str(tmp_path / "out"), "--resume-from-checkpoint", str(checkpoint)] + TINY_MODEL
    line = cli_error(pretrain.main, argv + ["--hidden-size", "64"], capsys)
    assert "Cannot resume from" in line and "hidden_size 32 (this command: 64)" in line
    assert "--resume-from-checkpoint none" in line


SFT_BAD_INPUTS = {
    "missing local model": (["--model", "{bad}/no-such-model"], "--model {bad}/no-such-model: no such file or folder"),
    "model folder without tokenizer": (["--model", "{bad}/model-without-tokenizer"],
                                       "model-without-tokenizer holds no tokenizer"),
    "a Llama checkpoint": (["--model", "{bad}/llama"], "is a 'llama' model; this command trains RAT models"),
    "a file as model": (["--model", "{bad}/empty.jsonl"], "is a file; a folder is needed"),
    "folder without config": (["--model", "{bad}/empty-folder"], "holds no model (no config.json)"),
    "missing local tokenizer": (["--model", "{bad}/model-without-tokenizer", "--tokenizer", "./no-such-tokenizer"],
                                "--tokenizer ./no-such-tokenizer: no such file or folder"),
}


@pytest.mark.parametrize("case", list(SFT_BAD_INPUTS))
def test_sft_bad_input_is_one_error_line(case, bad_inputs, tmp_path, capsys):
    arguments, message = SFT_BAD_INPUTS[case]
    argv = ["--max-steps", "1", "--output-dir", str(tmp_path / "sft")] + [a.format(bad=bad_inputs) for a in arguments]
    line = cli_error(sft_summarization.main, argv, capsys)
    assert line.startswith("error: ") and message.format(bad=bad_inputs) in line, line


@pytest.mark.parametrize("adapter, message", [
    ({"base_model_name_or_path": "another/model", "r": 16, "lora_alpha": 32}, "--model another/model (this command:"),
    (None, "it holds no LoRA adapter"),
], ids=["another base model", "not an adapter checkpoint"])
def test_sft_refuses_to_resume_an_adapter_of_another_run(adapter, message, pretrained, tmp_path, capsys):
    """The adapter would load onto other weights without a word (same shapes), or fail inside PEFT."""
    model_dir, _ = pretrained
    checkpoint = tmp_path / "sft" / "trainer" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 2}))
    if adapter is not None:
        (checkpoint / "adapter_config.json").write_text(json.dumps(adapter))
    line = cli_error(sft_summarization.main, ["--model", str(model_dir), "--lora-r", "8", "--max-steps", "4",
                                              "--output-dir", str(tmp_path / "sft")], capsys)
    assert f"Cannot resume from {checkpoint}" in line and message in line, line
    if adapter is not None:
        assert "--lora-r 16 (this command: 8)" in line and "--lora-alpha" not in line


def test_sft_takes_the_tokenizer_from_its_own_option(bad_inputs, pretrained, summarization_dataset, tmp_path):
    """A model folder without a tokenizer works when --tokenizer names one."""
    tokenizer_dir, _ = pretrained
    results = sft_summarization.main([
        "--model", str(bad_inputs / "model-without-tokenizer"), "--tokenizer", str(tokenizer_dir),
        "--dataset", str(summarization_dataset),
        "--document-column", "dialogue", "--max-steps", "1", "--batch-size", "2", "--max-length", "32",
        "--max-summary-tokens", "8", "--eval-examples", "2", "--max-new-tokens", "2",
        "--output-dir", str(tmp_path / "sft"), "--disable-tqdm",
    ])
    assert results["test_examples"] == 2


@pytest.mark.parametrize("argv, message", [(["--pretrain-steps", "0"], "must be >= 1"),
                                           (["--model", "transformer"], "invalid choice")])
def test_demo_refuses_bad_options(argv, message, capsys):
    """--pretrain-steps 0 used to run the default 400 steps."""
    with pytest.raises(SystemExit):
        demo.build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_cli_failure_is_one_line_and_nonzero_exit(tmp_path):
    """The real command line: an empty data file gives one `error:` line on stderr and exit status 1."""
    (tmp_path / "empty.jsonl").write_text("")
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pretrain.py"), "--dataset", str(tmp_path / "empty.jsonl"),
         "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"),
    )
    assert result.returncode == 1
    expected = f"error: --dataset {tmp_path / 'empty.jsonl'}: a data file is empty (no rows)."
    assert result.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in result.stderr


# ================================================================================================ FSDP2 on CPUs


@pytest.mark.slow
def test_fsdp2_configuration_trains_on_two_cpu_processes(tmp_path):
    """examples/configs/fsdp.yaml's plan (FSDP2, one unit per RatDecoderLayer, full state dict on save) on two CPU
    processes over gloo equals unsharded training on whole batches (tests/fsdp2_training.py)."""
    environment = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
                       MASTER_PORT=str(29500 + os.getpid() % 1000))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         environment["MASTER_PORT"], str(ROOT / "tests" / "fsdp2_training.py"), str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=environment,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads((tmp_path / "fsdp2_report.json").read_text())
    assert report["sharded_parameters"] > 0
    # fp32, but not bit-exact: two processes sum their half-batch gradients in another order than one process
    # does, and Adam divides by the gradients' running magnitude, which turns a last-bit difference of a tiny
    # gradient into a weight difference of up to about the learning rate (1e-3); measured: 7e-7.
    for sharded_loss, reference_loss in report["losses"]:
        assert abs(sharded_loss - reference_loss) < 1e-5, report["losses"]
    assert report["max_weight_difference"] < 1e-5
    assert report["logits_difference"] < 1e-4


def test_fsdp_on_cpu_processes_is_refused(monkeypatch):
    """accelerate applies FSDP and DeepSpeed to GPU processes only: on CPUs `accelerate launch --config_file
    examples/configs/fsdp.yaml` would silently train plain data parallel. The examples refuse that."""
    from types import SimpleNamespace

    from modeling_rat.training.launch import check_distribution

    check_distribution(SimpleNamespace(use_cpu=True))  # nothing asked: fine
    for variable, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        with monkeypatch.context() as patch:
            patch.setenv(variable, "true")
            with pytest.raises(ValueError, match=f"asks for {name}, but this machine has no GPU"):
                check_distribution(SimpleNamespace(use_cpu=True))
            check_distribution(SimpleNamespace(use_cpu=False))
