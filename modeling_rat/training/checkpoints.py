"""
Trainer checkpoints that are safe to resume from.

The `Trainer` writes `output_dir/checkpoint-N/` in place, file by file, and `trainer_state.json` last. A run stopped
while saving (Ctrl-C, a scheduler's SIGTERM, a crash) therefore leaves a folder that transformers' own
`get_last_checkpoint` would pick and fail on, or resume from half-written files. Here:

* a checkpoint is *complete* when its `trainer_state.json` is there and records step N; `latest_complete_checkpoint`
  skips incomplete folders and says why;
* `CheckpointGuard`, a `TrainerCallback`, holds Ctrl-C and SIGTERM while a checkpoint is written and delivers them
  once it is complete (a second Ctrl-C stops at once), and removes the old `trainer_state.json` of a folder the
  Trainer is about to overwrite, so that a half-overwritten folder never looks complete;
* `train_resumably` runs `trainer.train` with the guard, does not train past the planned steps when resuming a
  finished run, and, when interrupted, says which checkpoint a rerun resumes.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback, TrainerState
from transformers.trainer_utils import TrainOutput

from .cli import int_at_least


logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"  # the Trainer's last write to a checkpoint
RESUME_LATEST, RESUME_NONE = "latest", "none"


def add_checkpoint_arguments(group, default_save_steps: str, folder: str) -> None:
    """The command-line options of saving and resuming: `--save-steps`, `--save-total-limit`,
    `--resume-from-checkpoint` (checkpoints live in `folder`)."""
    group.add_argument("--save-steps", type=int_at_least(1),
                       help=f"save a checkpoint every N steps (default: {default_save_steps})")
    group.add_argument("--save-total-limit", type=int_at_least(1), default=2,
                       help="checkpoints kept (the oldest are deleted)")
    group.add_argument("--resume-from-checkpoint", default=RESUME_LATEST, metavar="latest|none|PATH",
                       help=f"'{RESUME_LATEST}' (default): resume from the latest complete checkpoint in {folder} if "
                            f"there is one; '{RESUME_NONE}': start fresh; or a checkpoint folder")


def is_complete_checkpoint(folder) -> bool:
    """True if `folder` holds a Trainer state that records the step in its name (`checkpoint-N`)."""
    try:
        global_step = json.loads((Path(folder) / TRAINER_STATE).read_text())["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    match = CHECKPOINT_NAME.match(Path(folder).name)
    return match is None or int(match.group(1)) == global_step


def latest_complete_checkpoint(output_dir) -> Path | None:
    """The complete `checkpoint-N` folder of `output_dir` with the largest N (None if there is none); logs the
    incomplete folders it skips."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = {}
    for folder in output_dir.iterdir():
        match = CHECKPOINT_NAME.match(folder.name)
        if match and folder.is_dir():
            steps[folder] = int(match.group(1))
    latest = None
    for folder in sorted(steps, key=steps.get):
        if is_complete_checkpoint(folder):
            latest = folder
        else:
            logger.warning(
                "Skipping %s: incomplete (no %s recording step %d, the Trainer's last write), so the run that wrote "
                "it stopped while saving. Training overwrites it when it reaches step %d again.",
                folder, TRAINER_STATE, steps[folder], steps[folder],
            )
    return latest


def resolve_resume_checkpoint(choice: str, output_dir) -> str | None:
    """
    What a `--resume-from-checkpoint` option asks for: `"latest"` is the latest complete checkpoint in `output_dir`
    (None if there is none: a fresh start), `"none"` a fresh start, anything else a checkpoint folder, which must be
    complete.
    """
    if choice == RESUME_NONE:
        return None
    if choice == RESUME_LATEST:
        latest = latest_complete_checkpoint(output_dir)
        return str(latest) if latest is not None else None
    folder = Path(choice)
    if not folder.is_dir():
        raise FileNotFoundError(f"--resume-from-checkpoint {choice}: no such folder.")
    if not is_complete_checkpoint(folder):
        raise ValueError(
            f"--resume-from-checkpoint {choice} is not a complete Trainer checkpoint (its {TRAINER_STATE} is missing "
            "or records another step: the run stopped while saving it). Resume from an earlier checkpoint, or use "
            f"'{RESUME_LATEST}' to take the latest complete one."
        )
    return str(folder)


class _SignalHold:
    """
    Holds SIGINT and SIGTERM (main thread only) until `release()`, then delivers the first one received. A second
    signal while held is delivered at once, unless it comes within `REPEAT_SECONDS` of the first: that is the same
    interruption reaching the process twice (Ctrl-C under `torchrun` or `accelerate launch` goes to every process of
    the terminal's group, and the launcher forwards it to its workers once more).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    REPEAT_SECONDS = 1.0

    def __init__(self):
        self._previous = {}
        self._pending = None
        self._first_received = 0.0
        self._what = ""

    def hold(self, what: str) -> None:
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        self._what = what
        for number in self.SIGNALS:
            if signal.getsignal(number) is signal.SIG_IGN:  # e.g. under nohup: the signal stays ignored
                continue
            previous = signal.signal(number, self._receive)
            self._previous[number] = previous if previous is not None else signal.SIG_DFL

    def release(self) -> None:
        pending = self._pending
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous, self._pending = {}, None
        if pending is not None:
            signal.raise_signal(pending)

    def _receive(self, number, frame) -> None:
        if self._pending is not None:
            if time.monotonic() - self._first_received < self.REPEAT_SECONDS:
                return
            self._pending = number
            self.release()
            return
        self._pending, self._first_received = number, time.monotonic()
        logger.warning("%s received while writing %s: stopping once it is complete (send it again to stop at once, "
                       "leaving it incomplete).", signal.Signals(number).name, self._what)


@contextmanager
def signals_held(what: str):
    """Hold Ctrl-C and SIGTERM while the block runs (e.g. writing the final model), deliver them after."""
    hold = _SignalHold()
    hold.hold(what)
    try:
        yield
    finally:
        hold.release()


class CheckpointGuard(TrainerCallback):
    """Makes every checkpoint the Trainer writes either complete or recognisably incomplete (see the module
    docstring). Add it with `trainer.add_callback(CheckpointGuard())`."""

    def __init__(self):
        self._hold = _SignalHold()

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if args.should_save:  # the main process writes the Trainer state
                (folder / TRAINER_STATE).unlink(missing_ok=True)
            self._hold.hold(str(folder))

    on_epoch_end = on_step_end

    def on_save(self, args, state, control, **kwargs):
        self._hold.release()

    def on_train_end(self, args, state, control, **kwargs):
        self._hold.release()


def train_resumably(trainer, resume_from_checkpoint: str | None = None):
    """
    `trainer.train(resume_from_checkpoint=...)` with a `CheckpointGuard`. A checkpoint that already holds all the
    planned steps is loaded without training (the Trainer would run one step more, and one more on every rerun); the
    returned `TrainOutput` then has `training_loss` None. If the run is interrupted, the `KeyboardInterrupt` it raises
    names the checkpoint a rerun resumes from.
    """
    if not any(isinstance(callback, CheckpointGuard) for callback in trainer.callback_handler.callbacks):
        trainer.add_callback(CheckpointGuard())
    if resume_from_checkpoint is not None:
        state = TrainerState.load_from_json(str(Path(resume_from_checkpoint) / TRAINER_STATE))
        planned = trainer.args.max_steps if trainer.args.max_steps > 0 else state.max_steps
        if state.global_step >= planned:
            logger.info("%s holds all %d planned steps: loading it, nothing left to train", resume_from_checkpoint,
                        planned)
            trainer._load_from_checkpoint(resume_from_checkpoint)  # the Trainer's own loader (weights or adapters)
            trainer.state = state
            return TrainOutput(global_step=state.global_step, training_loss=None, metrics={})
        logger.info("Resuming from %s (step %d of %d)", resume_from_checkpoint, state.global_step, planned)
    try:
        return trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    except KeyboardInterrupt:
        latest = latest_complete_checkpoint(trainer.args.output_dir)
        hint = (f"the latest complete checkpoint is {latest}: run the same command again to resume from it"
                if latest is not None else "no complete checkpoint yet: a rerun starts from the beginning")
        raise KeyboardInterrupt(hint) from None
