"""The `qlora` logger: every library message goes through it, and the entry points configure it.

Library modules log to `logging.getLogger(__name__)` (a child of `qlora`) with the exact line a user should
read, prefix included (`warning: …`, `training.kernels: auto: …`). `configure_logging(verbosity)` (the CLI's `-v` /
`-q`) prints them on stderr as they are: -q keeps warnings and errors, the default adds what a run decided
(info), -v adds debug detail. Under torchrun only the main process speaks, except errors, which every
process reports (one rank's failure must not be silent).
"""

from __future__ import annotations

import logging
import os
import sys

LOGGER = "qlora"
LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


class StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (a test's capture, a notebook's cell output)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the property ignores it
        pass


def main_process_or_error(record: logging.LogRecord) -> bool:
    """Under torchrun / accelerate (RANK set) only rank 0's messages, and every rank's errors."""
    return record.levelno >= logging.ERROR or int(os.environ.get("RANK", "0")) == 0


def configure_logging(verbosity: int = 0) -> logging.Logger:
    """Print qlora's messages on stderr, one line each as written, at the level `verbosity` picks (-1: quiet,
    0: default, 1: verbose). Idempotent: a second call only changes the level."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(LEVELS[max(-1, min(1, verbosity))])
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(main_process_or_error)
        logger.addHandler(handler)
    logger.propagate = False  # printed once, here, not again by a root handler an application installed
    return logger


def add_verbosity_flags(parser) -> None:
    """`-v` / `-q` on a command's argparse parser (read back with `verbosity(args)`)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="also print debug detail")
    group.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")


def verbosity(args) -> int:
    return 1 if getattr(args, "verbose", False) else -1 if getattr(args, "quiet", False) else 0
