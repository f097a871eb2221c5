"""Command-line entry points: bad input and interruptions end in one `error:` line and a non-zero exit."""

from __future__ import annotations

import logging
import sys


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


def configure_logging(*names: str) -> None:
    """Log lines with a time stamp: INFO from the loggers `names` and this package, WARNING from everything else
    (libraries that log each call at INFO, such as rouge-score's "Using default tokenizer", stay quiet)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in (*names, "modeling_rat"):
        logging.getLogger(name).setLevel(logging.INFO)
