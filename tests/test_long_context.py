"""examples/long_context.py: the passkey and MQAR data, the grid, resuming, bad input, and the --quick run."""

import json
import socket
import subprocess

import pytest
import torch

import long_context
from long_context import MARKER, Recipe, Run


RECIPE = Recipe(pairs=4, passkey_tokens=3, num_keys=16, num_values=16, num_filler=16)
PASSKEY_TOKENS = RECIPE.passkey_tokens


def test_passkey_batch_hides_the_passkey_once_and_asks_for_it_at_the_end():
    generator = torch.Generator().manual_seed(0)
    ids, labels, depth = long_context.passkey_batch(generator, 64, 40, RECIPE)
    assert ids.shape == (64, 40) and labels.shape == (64, long_context.answer_span("passkey", RECIPE))
    is_value = (ids >= RECIPE.value_offset) & (ids < RECIPE.filler_offset)
    for row, label, row_depth in zip(ids, labels, depth):
        markers = (row == MARKER).nonzero().flatten().tolist()
        assert len(markers) == 2 and markers[1] == 40 - PASSKEY_TOKENS - 1
        needle = row[markers[0] + 1: markers[0] + 1 + PASSKEY_TOKENS]
        assert torch.equal(needle, row[-PASSKEY_TOKENS:])
        assert torch.equal(label[:PASSKEY_TOKENS], needle) and label[-1] == -100
        assert row_depth == pytest.approx(markers[0] / (40 - 2 * PASSKEY_TOKENS - 2))
    assert is_value.sum(dim=1).eq(2 * PASSKEY_TOKENS).all(), "value symbols appear only in the needle and the answer"
    assert depth.min() < 0.2 and depth.max() > 0.8, "needles at every depth"


def test_mqar_batch_asks_every_key_once_after_the_filler_without_repeating_values():
    generator = torch.Generator().manual_seed(0)
    ids, labels, _ = long_context.mqar_batch(generator, 32, 48, RECIPE)
    pairs = RECIPE.pairs
    assert ids.shape == (32, 48) and labels.shape == (32, long_context.answer_span("mqar", RECIPE)) == (32, pairs)
    for row, label in zip(ids, labels):
        keys, values = row[0: 2 * pairs: 2], row[1: 2 * pairs: 2]
        assert len(set(keys.tolist())) == pairs
        assert ((keys >= RECIPE.key_offset) & (keys < RECIPE.value_offset)).all()
        assert (row[2 * pairs: -pairs] >= RECIPE.filler_offset).all()
        asked = row[-pairs:]
        assert sorted(asked.tolist()) == sorted(keys.tolist())
        expected = {k: v for k, v in zip(keys.tolist(), values.tolist())}
        assert label.tolist() == [expected[k] for k in asked.tolist()]


def test_every_model_sees_the_same_data_and_the_held_out_set_is_separate():
    first = long_context.mqar_batch(long_context.data_generator("mqar", 48, 0), 4, 48, RECIPE)[0]
    again = long_context.mqar_batch(long_context.data_generator("mqar", 48, 0), 4, 48, RECIPE)[0]
    other_seed = long_context.mqar_batch(long_context.data_generator("mqar", 48, 1), 4, 48, RECIPE)[0]
    held_out = long_context.mqar_batch(long_context.data_generator("mqar", 48, long_context.EVAL_SEED), 4, 48, RECIPE)[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other_seed) and not torch.equal(first, held_out)


def test_grid_runs_the_longest_length_then_the_shortest_then_more_seeds_then_the_rest():
    runs = long_context.build_grid(["mqar"], ["attention", "rat"], [4, 16], [128, 256, 512], seeds=3)
    assert [(r.seq_len, r.seed) for r in runs[:3]] == [(512, 0)] * 3
    assert [(r.seq_len, r.seed) for r in runs[3:6]] == [(128, 0)] * 3
    assert [(r.seq_len, r.seed) for r in runs[6:12]] == [(512, s) for s in (1, 2) for _ in range(3)]
    assert {(r.seq_len, r.seed) for r in runs[12:]} == {(256, 0)}
    assert len(runs) == len(set(runs)) == 3 * 5
    assert {(r.model, r.chunk_size) for r in runs} == {("attention", None), ("rat", 4), ("rat", 16)}
    hybrid = long_context.model_variants(["rat-swa", "rnn"], [1, 64])
    assert hybrid == [("rat-swa", long_context.PAPER_CHUNK_SIZE), ("rnn", None)]


def test_run_configs_follow_the_recipe():
    config = long_context.build_config(Run("mqar", "rat-swa", 16, 256, 0), RECIPE)
    assert config.layer_types == ["rat", "sliding_attention"]
    assert config.sliding_window == RECIPE.sliding_window and config.chunk_size == 16
    assert config.vocab_size == RECIPE.vocab_size and config.rnn_forget_gate_init_length == 256
    assert long_context.build_config(Run("mqar", "rat", 1, 256, 0), RECIPE).chunk_size == 1


def test_results_folder_resumes_and_shares_runs_between_processes(tmp_path):
    folder = long_context.ResultsFolder(tmp_path, RECIPE)
    run, other = Run("mqar", "rnn", None, 64, 0), Run("mqar", "attention", None, 64, 0)
    assert folder.claim(run)
    assert not folder.claim(run), "a living process holds it"
    folder.save(run, {"task": "mqar", "model": "rnn", "chunk_size": None, "seq_len": 64, "seed": 0, "accuracy": 1.0})
    folder.release(run)
    assert folder.is_done(run) and not folder.claim(run)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder.runs_dir / f"{other.name}.claim").write_text(f"{socket.gethostname()} {dead.pid}")
    assert folder.claim(other), "the claim of a process that has died is taken over"
    records = folder.write_summary()
    assert [r["model"] for r in records] == ["rnn"]
    assert json.loads((tmp_path / "results.json").read_text())["recipe"]["pairs"] == RECIPE.pairs
    with pytest.raises(ValueError, match="another recipe .*pairs"):
        long_context.ResultsFolder(tmp_path, Recipe(pairs=5, num_keys=16, num_values=16, num_filler=16))


@pytest.mark.parametrize("argv, message", [
    (["--models", "attention", "--chunk-sizes", "4"], "add rat to --models"),
    (["--lengths", "8"], "mqar needs sequences of at least 12 tokens"),
    (["--chunk-sizes", "0"], "--chunk-sizes must be >= 1"),
    (["--steps", "0"], "--steps must be positive"),
    (["--seeds", "0"], "--seeds must be >= 1"),
    (["--pairs", "80"], "needs at least as many key symbols"),
    (["--num-heads", "3"], "attention at 1024 tokens"),
    (["--measure-costs", "--min-run-time", "0"], "--min-run-time must be positive"),
])
def test_bad_input_is_one_error_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        long_context.main(["--output", str(tmp_path)] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_quick_run_trains_the_grid_plots_it_and_a_rerun_skips_it(tmp_path, capsys):
    records = long_context.main(["--quick", "--output", str(tmp_path), "--no-progress"])
    quick = long_context.QUICK_GRID
    variants = len(quick["models"]) - 1 + len(quick["chunk_sizes"])
    expected_runs = 2 * variants * (len(quick["lengths"]) - 1 + quick["seeds"])
    assert len(records) == expected_runs
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["recipe"] == json.loads((tmp_path / "recipe.json").read_text())
    recipe = long_context.QUICK_RECIPE
    for record in results["runs"]:
        assert {"task", "model", "chunk_size", "seq_len", "seed", "accuracy", "train_step_seconds", "cache_bytes"} <= set(record)
        assert 0 <= record["accuracy"] <= 1 and record["train_step_seconds"] > 0
        width, layers, length = recipe.hidden_size, recipe.num_layers, record["seq_len"]
        if record["model"] == "attention":  # keys and values of every token, fp32
            assert record["cache_bytes"] == layers * 2 * length * width * 4
        elif record["model"] == "rat":  # chunk summaries (1/L of that) plus the running state
            assert record["cache_bytes"] == layers * (2 * (length // record["chunk_size"]) * width * 4 + 2 * width * 4)
        else:  # rnn: the value state alone
            assert record["model"] == "rnn" and record["cache_bytes"] == layers * width * 4
    for plot in ("accuracy_vs_length.png", "chunk_size.png", "passkey_depth.png"):
        assert (tmp_path / plot).stat().st_size > 10_000
    assert not list((tmp_path / "runs").glob("*.claim"))
    table = (tmp_path / "results.md").read_text()
    assert "Accuracy at 64 tokens" in table and "| rat L=4 |" in table and ", 2 seeds)" in table  # cells: mean (min-max, seeds)

    capsys.readouterr()
    again = long_context.main(["--quick", "--output", str(tmp_path), "--no-progress"])
    assert f"{expected_runs} already finished" in capsys.readouterr().err
    assert again == records

    # Step times measured side by side replace the runs' own (taken while other runs shared the machine).
    long_context.main(["--quick", "--output", str(tmp_path), "--no-progress", "--measure-costs", "--min-run-time", "0.05"])
    costs = json.loads((tmp_path / "costs.json").read_text())
    measured = {(c["label"], c["seq_len"]): c["train_step_seconds"] for c in costs["costs"]}
    assert set(measured) == {(r["label"], r["seq_len"]) for r in records}
    assert all(seconds > 0 for seconds in measured.values()) and costs["torch_threads"] >= 1
    table = (tmp_path / "results.md").read_text()
    assert "measured side by side in one process" in table
    assert "| rat L=4 |" in table and f" | {measured[('rat L=4', 64)]:.3f} | " in table
