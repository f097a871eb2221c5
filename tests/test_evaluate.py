"""examples/evaluate.py: perplexity by position beyond the training length, and the data of the offline lm-eval tasks."""

import json

import pytest
import torch

import evaluate
from conftest import ROOT, tiny_model


TASKS_DATA = ROOT / "examples" / "eval_tasks" / "data"
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocabulary = {word: index for index, word in enumerate(["<pad>", "</s>"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny rat and a tiny attention model trained at 16 tokens, each saved with a word-level tokenizer."""
    root = tmp_path_factory.mktemp("extrapolation")
    folders = []
    for name, layers in (("rat", ("rat", "rat")), ("attention", ("full_attention", "full_attention"))):
        model = tiny_model(layers, vocab_size=len(WORDS) + 2, rnn_forget_gate_init_length=16)
        folder = root / name
        model.save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("held-out")
    rows = [{"content": " ".join(WORDS[(7 * i + 3 * j) % len(WORDS)] for j in range(30))} for i in range(20)]
    (folder / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_position_bands_start_with_the_training_length_and_double():
    assert evaluate.position_bands(4096, 256) == [(1, 256), (256, 512), (512, 1024), (1024, 2048), (2048, 4096)]
    assert evaluate.position_bands(100, 256) == [(1, 100)]
    assert evaluate.position_bands(48, 16) == [(1, 16), (16, 32), (32, 48)]


def test_the_curve_averages_the_loss_over_log_spaced_bins():
    curve = evaluate.log_spaced_means(torch.arange(1, 4096, dtype=torch.float64))
    assert curve["positions"][:4] == [1, 2, 3, 4] and curve["loss"][:4] == [1, 2, 3, 4], "one position per bin at first"
    widths = torch.tensor(curve["positions"][-9:]).log2().diff()
    assert torch.allclose(widths, torch.full_like(widths, 1 / 8), atol=0.02), "eight bins per octave"
    assert curve["loss"][-1] == pytest.approx(curve["positions"][-1], rel=0.01), "a bin's mean position"


def test_loss_by_position_is_the_mean_next_token_loss_of_each_position():
    model = tiny_model(("rat", "full_attention"))
    sequences = torch.randint(1, 61, (3, 20), generator=torch.Generator().manual_seed(0))
    losses = evaluate.loss_by_position(model, sequences, batch_size=2)
    assert losses.shape == (19,)
    with torch.no_grad():
        log_probs = model(sequences[1:2]).logits.log_softmax(-1)[0]
    row_loss = -log_probs[torch.arange(19), sequences[1, 1:]]
    others = torch.stack([evaluate.loss_by_position(model, sequences[i: i + 1], 1) for i in (0, 2)])
    torch.testing.assert_close(losses, (others.sum(0) + row_loss.double()) / 3, rtol=0, atol=1e-5)


def test_extrapolation_writes_the_table_the_curve_and_the_plot(checkpoints, text_folder, tmp_path):
    output = tmp_path / "out"
    results = evaluate.main(["extrapolation", "--models", *map(str, checkpoints), "--dataset", str(text_folder),
                             "--text-column", "content", "--max-length", "48", "--num-sequences", "4",
                             "--batch-size", "2", "--output", str(output)])
    assert [r["name"] for r in results] == ["rat", "attention"]
    for result in results:
        assert result["train_length"] == 16
        assert [band["positions"] for band in result["bands"]] == [[1, 16], [16, 32], [32, 48]]
        for band in result["bands"]:
            assert band["perplexity"] == pytest.approx(torch.tensor(band["loss"]).exp().item())
        positions, curve = result["curve"]["positions"], result["curve"]["loss"]
        assert positions == sorted(positions) and positions[0] == 1 and positions[-1] < 48 and len(curve) == len(positions)
        assert min(curve) <= result["bands"][0]["loss"] <= max(curve)
    stored = json.loads((output / "extrapolation.json").read_text())
    assert stored["settings"]["max_length"] == 48 and len(stored["models"]) == 2
    table = (output / "extrapolation.md").read_text()
    assert "| rat | 16 |" in table and "| 32-48 |" in table
    assert (output / "extrapolation.png").stat().st_size > 10_000


@pytest.mark.parametrize("argv, message", [
    (["--models", "no-such-folder"], "Not a model folder (no config.json): no-such-folder"),
    (["--max-length", "1"], "--max-length must be at least 2"),
    (["--num-sequences", "1000"], "fewer than --num-sequences 1000"),
    (["--text-column", "text"], "has no column 'text'"),
])
def test_bad_input_is_one_error_line(argv, message, checkpoints, text_folder, tmp_path, capsys):
    base = {"--models": [str(checkpoints[0])], "--dataset": [str(text_folder)], "--text-column": ["content"],
            "--max-length": ["48"], "--output": [str(tmp_path)]}
    base.update({argv[0]: argv[1:]})
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["extrapolation"] + [item for option, values in base.items() for item in (option, *values)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_committed_lm_eval_task_data_is_well_formed():
    choices = [json.loads(line) for line in (TASKS_DATA / "docstring_choice.jsonl").read_text().splitlines()]
    summaries = [json.loads(line) for line in (TASKS_DATA / "docstring_summary.jsonl").read_text().splitlines()]
    assert len(choices) == len(summaries) >= 100
    for choice, summary in zip(choices, summaries):
        assert choice["code"] == summary["code"] and "def " in choice["code"]
        assert len(set(choice["choices"])) == 4 and choice["choices"][choice["label"]] == summary["summary"]
    labels = [choice["label"] for choice in choices]
    assert all(labels.count(index) > len(labels) / 8 for index in range(4)), "the answer is not always in one place"


@pytest.mark.slow
def test_build_tasks_rebuilds_the_data_from_the_standard_library(tmp_path):
    counts = evaluate.main(["build-tasks", "--output", str(tmp_path), "--num-examples", "200"])
    assert counts == {"docstring_choice": 200, "docstring_summary": 200}
    for name in counts:
        assert (tmp_path / f"{name}.jsonl").read_text() == (TASKS_DATA / f"{name}.jsonl").read_text(), \
            "the committed data is what build-tasks makes (deterministic)"
