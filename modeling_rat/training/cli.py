"""Command-line entry points: bad input and interruptions end in one `error:` line and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path


EXIT_ERROR, EXIT_INTERRUPTED = 1, 130


def run_command(main, argv=None):
    """
    Run `main(argv)`. A ValueError or OSError (what bad input, missing files and unreachable names raise) prints
    `error: <message>` on one line and exits with status 1; Ctrl-C prints `error: interrupted` (with what the
    interruption carries, e.g. where to resume) and exits with 130. Other exceptions keep their traceback: they are
    bugs, not input.
    """
    try:
        return main(argv)
    except KeyboardInterrupt as interrupt:
        _fail("interrupted" + (f"; {interrupt}" if str(interrupt) else ""), EXIT_INTERRUPTED)
    except (ValueError, OSError) as error:
        _fail(str(error) or type(error).__name__, EXIT_ERROR)


def _fail(message: str, status: int):
    print("error: " + " ".join(message.split()), file=sys.stderr, flush=True)
    sys.exit(status)


def configure_job(*logger_names: str) -> None:
    """
    Set up the process for a training job: log lines with a time stamp, INFO from the loggers `logger_names` and
    this package, WARNING from everything else (libraries that log each call at INFO, such as rouge-score's "Using
    default tokenizer", stay quiet); tokenizers without their own threads (the jobs tokenize before data loaders
    fork).
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in (*logger_names, "modeling_rat"):
        logging.getLogger(name).setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def int_at_least(minimum: int):
    """An argparse `type`: an integer >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def float_in(low: float, high: float = math.inf, low_inclusive: bool = True, high_inclusive: bool = True):
    """An argparse `type`: a finite number in the range from `low` to `high`."""
    interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = value >= low if low_inclusive else value > low
        below = value <= high if high_inclusive else value < high
        if not (math.isfinite(value) and above and below):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


def prepare_output_dir(path, option: str = "--output-dir"):
    """Create the output folder (and its parents), or say why it cannot be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path} is a file; name a folder.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"Cannot create {option} {path}: {error.strerror or error}.") from None
    return path
