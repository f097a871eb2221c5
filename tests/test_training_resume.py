"""Resuming training: `Trainer.train(resume_from_checkpoint=...)` on rat, rnn and hybrid models continues exactly
where the run stopped; checkpoints interrupted while being written are never taken for complete; the example
scripts resume from the latest complete checkpoint by default, also after Ctrl-C during a save."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from conftest import ROOT, tiny_model
from modeling_rat.training import (
    CheckpointGuard,
    is_complete_checkpoint,
    latest_complete_checkpoint,
    resolve_resume_checkpoint,
    train_resumably,
)
from modeling_rat.training.checkpoints import signals_held


@pytest.fixture(autouse=True)
def ctrl_c_raises():
    """
    Ctrl-C as in a terminal. A test run started in the background by a shell (`pytest &`, nohup) inherits SIGINT
    ignored, and Python then keeps it ignored: the Ctrl-C tests would see no interruption at all.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _default_ctrl_c():  # in the child of `run_pretraining`, before Python starts (see `ctrl_c_raises`)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


LAYER_PATTERNS = {"rat": ("rat", "rat"), "rnn": ("rnn", "rnn"), "hybrid": ("rat", "sliding_attention")}
MAX_STEPS, SAVE_STEPS = 6, 3


def token_blocks(count=48, length=16, seed=3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 61, (count, length), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


class StopAtStep(TrainerCallback):
    """Ends training after `step` (as an interruption would), the schedule still planned for MAX_STEPS."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def make_trainer(output_dir, layer_types, model_seed=0, callbacks=()):
    arguments = TrainingArguments(
        output_dir=str(output_dir), max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1, eval_strategy="steps", eval_steps=2,
        save_steps=SAVE_STEPS, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    return Trainer(model=tiny_model(layer_types, seed=model_seed).train(), args=arguments,
                   train_dataset=token_blocks(), eval_dataset=token_blocks(8, seed=4),
                   data_collator=default_data_collator, callbacks=list(callbacks))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The uninterrupted run of each layer pattern (trained once per module)."""
    runs = {}

    def run(pattern):
        if pattern not in runs:
            runs[pattern] = make_trainer(tmp_path_factory.mktemp(pattern), LAYER_PATTERNS[pattern])
            runs[pattern].train()
        return runs[pattern]

    return run


def losses(trainer):
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def assert_same_weights(model, other):
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(other.state_dict()[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("pattern", [pytest.param("rat", marks=pytest.mark.slow),
                                     pytest.param("rnn", marks=pytest.mark.slow), "hybrid"])
def test_resumed_run_logs_the_losses_of_the_uninterrupted_run(tmp_path, pattern, uninterrupted):
    layer_types = LAYER_PATTERNS[pattern]
    uninterrupted = uninterrupted(pattern)

    stopped = make_trainer(tmp_path / "run", layer_types, callbacks=[StopAtStep(SAVE_STEPS)])
    train_resumably(stopped)
    assert stopped.state.global_step == SAVE_STEPS
    checkpoint = latest_complete_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{SAVE_STEPS}"
    # The Trainer re-reads config.json with transformers' generic config class: the layer types must pass it.
    assert json.loads((checkpoint / "config.json").read_text())["rat_layer_types"] == list(layer_types)

    resumed = make_trainer(tmp_path / "run", layer_types, model_seed=1)  # other initial weights: all come from disk
    train_resumably(resumed, resolve_resume_checkpoint("latest", tmp_path / "run"))
    assert losses(resumed) == losses(uninterrupted)
    assert len(losses(resumed)) == MAX_STEPS
    evaluations = [(e["step"], e["eval_loss"]) for e in resumed.state.log_history if "eval_loss" in e]
    assert evaluations == [(e["step"], e["eval_loss"]) for e in uninterrupted.state.log_history if "eval_loss" in e]
    assert_same_weights(uninterrupted.model, resumed.model)


def test_rerunning_a_finished_run_trains_no_further_step(tmp_path, uninterrupted):
    """Resuming from a checkpoint that holds every planned step loads it and trains nothing (the Trainer itself
    would run one step more, and write one checkpoint more, on every rerun)."""
    finished = uninterrupted("hybrid")
    rerun = make_trainer(finished.args.output_dir, LAYER_PATTERNS["hybrid"], model_seed=1)
    result = train_resumably(rerun, resolve_resume_checkpoint("latest", finished.args.output_dir))
    assert result.global_step == MAX_STEPS and result.training_loss is None
    assert rerun.state.global_step == MAX_STEPS
    assert_same_weights(finished.model, rerun.model)
    assert latest_complete_checkpoint(finished.args.output_dir).name == f"checkpoint-{MAX_STEPS}"


def write_checkpoint(folder, step, complete=True):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_latest_complete_checkpoint_skips_incomplete_folders(tmp_path, caplog):
    write_checkpoint(tmp_path / "checkpoint-3", 3)
    write_checkpoint(tmp_path / "checkpoint-12", 12)
    write_checkpoint(tmp_path / "checkpoint-15", 15, complete=False)  # stopped while saving: no Trainer state
    (tmp_path / "checkpoint-18").mkdir()  # stopped right after creating the folder
    write_checkpoint(tmp_path / "checkpoint-21", 20)  # a state of another step: an older folder half overwritten
    (tmp_path / "checkpoint-9.tmp").mkdir()
    with caplog.at_level("WARNING"):
        assert latest_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-12", "by step, not by name"
    for step in (15, 18, 21):
        assert f"checkpoint-{step}: incomplete" in caplog.text
    assert latest_complete_checkpoint(tmp_path / "missing") is None
    assert not is_complete_checkpoint(tmp_path / "checkpoint-18")


def test_resume_option(tmp_path):
    write_checkpoint(tmp_path / "checkpoint-4", 4)
    write_checkpoint(tmp_path / "checkpoint-8", 8, complete=False)
    assert resolve_resume_checkpoint("latest", tmp_path) == str(tmp_path / "checkpoint-4")
    assert resolve_resume_checkpoint("latest", tmp_path / "empty") is None
    assert resolve_resume_checkpoint("none", tmp_path) is None
    assert resolve_resume_checkpoint(str(tmp_path / "checkpoint-4"), "elsewhere") == str(tmp_path / "checkpoint-4")
    with pytest.raises(ValueError, match="checkpoint-8 is not a complete Trainer checkpoint"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-8"), tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        resolve_resume_checkpoint(str(tmp_path / "checkpoint-99"), tmp_path)


def test_a_folder_about_to_be_overwritten_stops_counting_as_complete(tmp_path):
    """A fresh run saving over an older checkpoint-N first removes its Trainer state, so that a save interrupted
    half-way never mixes old and new files under a valid state."""
    folder = write_checkpoint(tmp_path / "checkpoint-3", 3)
    arguments = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    state, control = type("State", (), {"global_step": 3})(), type("Control", (), {"should_save": True})()
    guard = CheckpointGuard()
    guard.on_step_end(arguments, state, control)
    try:
        assert not is_complete_checkpoint(folder)
        assert (folder / "config.json").is_file(), "only the Trainer state is removed"
    finally:
        guard.on_save(arguments, state, control)


def test_ctrl_c_while_a_checkpoint_is_written_stops_after_it_is_complete(tmp_path, uninterrupted):
    """SIGINT arriving while the Trainer writes a checkpoint is held until the checkpoint is complete; training then
    stops, the interruption names the checkpoint, and resuming from it gives the uninterrupted run's losses."""
    layer_types = LAYER_PATTERNS["hybrid"]
    uninterrupted = uninterrupted("hybrid")

    trainer = make_trainer(tmp_path / "run", layer_types)
    save_model = trainer.save_model

    def save_model_interrupted(*args, **kwargs):  # Ctrl-C right after the Trainer starts writing the checkpoint
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here: it must hold the signal, not raise
        return save_model(*args, **kwargs)

    trainer.save_model = save_model_interrupted
    with pytest.raises(KeyboardInterrupt, match="the latest complete checkpoint is .*checkpoint-3: run the same"):
        train_resumably(trainer)
    assert trainer.state.global_step == SAVE_STEPS
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "the handler is restored"
    checkpoint = latest_complete_checkpoint(tmp_path / "run")
    assert checkpoint.name == "checkpoint-3"
    files = {path.name for path in checkpoint.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= files

    resumed = make_trainer(tmp_path / "run", layer_types, model_seed=1)
    train_resumably(resumed, str(checkpoint))
    assert losses(resumed) == losses(uninterrupted)
    assert_same_weights(uninterrupted.model, resumed.model)


def test_a_second_ctrl_c_stops_at_once(monkeypatch):
    """A second Ctrl-C stops at once, but not the same one arriving twice (a launcher forwarding it)."""
    from modeling_rat.training.checkpoints import _SignalHold

    monkeypatch.setattr(_SignalHold, "REPEAT_SECONDS", 0.2)
    with pytest.raises(KeyboardInterrupt):
        with signals_held("a file"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # held
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # within 0.2 s of the first: the same interruption, still held
            completed_while_held = True
            time.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # delivered here
            pytest.fail("the second Ctrl-C must stop at once")
    assert completed_while_held
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


TINY_PRETRAINING = ["--model", "rat-swa", "--size", "tiny", "--hidden-size", "32", "--num-layers", "2",
                    "--num-heads", "4", "--chunk-size", "4", "--block-size", "32", "--vocab-size", "300",
                    "--batch-size", "2", "--max-eval-blocks", "4", "--max-train-chars", "40000",
                    "--tokenizer-train-chars", "40000", "--max-steps", "8", "--save-steps", "2", "--eval-steps", "4",
                    "--logging-steps", "1", "--disable-tqdm"]


def run_pretraining(output_dir, *extra, interrupt_at_checkpoint=None):
    """examples/pretrain.py in its own process; optionally send SIGINT as soon as the given checkpoint folder
    appears (while the Trainer writes it)."""
    environment = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, str(ROOT / "examples" / "pretrain.py"), *TINY_PRETRAINING, "--output-dir",
               str(output_dir), *extra]
    process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=_default_ctrl_c)
    if interrupt_at_checkpoint is not None:
        folder = output_dir / interrupt_at_checkpoint
        while process.poll() is None and not folder.exists():
            time.sleep(0.001)
        process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=600)
    return process.returncode, stdout, stderr


@pytest.mark.slow
def test_pretrain_script_interrupted_while_saving_resumes_exactly(tmp_path):
    status, _, stderr = run_pretraining(tmp_path / "run", interrupt_at_checkpoint="checkpoint-4")
    assert status == 130, stderr[-3000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: interrupted; the latest complete checkpoint is "), stderr[-3000:]
    folders = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert folders and all(is_complete_checkpoint(folder) for folder in folders), folders
    assert not (tmp_path / "run" / "pretrain_results.json").exists()

    status, _, stderr = run_pretraining(tmp_path / "run")  # the same command again: resumes
    assert status == 0, stderr[-3000:]
    assert "Resuming from" in stderr
    status, _, stderr = run_pretraining(tmp_path / "full", "--resume-from-checkpoint", "none")
    assert status == 0, stderr[-3000:]
    resumed = json.loads((tmp_path / "run" / "pretrain_results.json").read_text())
    uninterrupted = json.loads((tmp_path / "full" / "pretrain_results.json").read_text())
    assert resumed["resumed_from"] and uninterrupted["resumed_from"] is None
    assert resumed["eval_loss"] == uninterrupted["eval_loss"]
    assert resumed["eval_history"] == uninterrupted["eval_history"]


@pytest.mark.slow
def test_saved_run_folders_load_their_tokenizer_without_remote_code(tmp_path):
    """AutoTokenizer on a saved run folder, without trust_remote_code and without this package imported: the
    generic config class reads config.json (layer types included) and the tokenizer loads."""
    model = tiny_model(LAYER_PATTERNS["hybrid"])
    from modeling_rat.training import train_byte_level_bpe

    tokenizer = train_byte_level_bpe(["some text to train on"] * 4, vocab_size=300)
    model.save_pretrained(tmp_path / "run")
    tokenizer.save_pretrained(tmp_path / "run")
    script = (
        "import sys\n"
        "from transformers import AutoTokenizer\n"
        f"tokenizer = AutoTokenizer.from_pretrained({str(tmp_path / 'run')!r})\n"
        "assert 'modeling_rat' not in sys.modules\n"
        "print('TOKENS', len(tokenizer), tokenizer.chat_template is not None)\n"
    )
    environment = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=environment, capture_output=True,
                            text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"TOKENS {len(tokenizer)} True" in result.stdout
    assert "Traceback" not in result.stderr
