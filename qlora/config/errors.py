"""The one user-facing error type, every exit code, and the CLI wrapper that prints an error as `error: ...`.

A user mistake (bad recipe, missing file, wrong option) must cost seconds, not a stack trace:
library code raises `QLoraError` with a message naming the key/file/value and what would be valid;
only the CLI entry points decide how to print it.
"""

from __future__ import annotations

import difflib
import signal
import sys
from collections.abc import Callable, Iterable, Sequence
from enum import IntEnum

from qlora.config.disk import is_disk_full, print_error_line, report


class ExitCode(IntEnum):
    """Every exit status of a qlora command, with its meaning (the README's table is generated from these).

    Scripts and schedulers act on them: `qlora sweep` records a point's failure or stops the whole sweep by
    its point's code, and a job script can requeue on PREEMPTED.
    """

    meaning: str

    def __new__(cls, value: int, meaning: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.meaning = meaning
        return member

    OK = 0, "done (a sweep: every point finished)"
    FAILED = 1, "an unexpected error (a traceback), or a sweep with a failed point"
    USAGE = 2, "a user mistake: one `error: …` line naming the key, file or value and what would be valid"
    OOM = 3, "out of GPU memory: the last checkpoint kept, and what the profiler says fits"
    PREEMPTED = 4, "stopped by SIGTERM with a complete checkpoint: continue with `--resume`"
    NONFINITE = 5, "a NaN/inf loss stopped training: the last good checkpoint kept"
    DISK_FULL = (
        6,
        (
            "the disk filled up while writing (partial files removed, the last complete checkpoint kept), or too "
            "little free space to start"
        ),
    )
    MERGE_MISMATCH = 7, "`qlora merge`: the merged model's logits are not those of the base + adapter; nothing written"
    INTERRUPTED = 130, "Ctrl-C (SIGINT, 128 + 2)"
    TERMINATED = 128 + signal.SIGTERM, "stopped by SIGTERM before anything was worth saving (128 + 15)"


class QLoraError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2 (ExitCode.USAGE)."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most like `name`, for 'did you mean' hints (None when nothing is close)."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix, or a list of valid names when nothing is close."""
    candidates = sorted(candidates)
    best = closest(name, candidates)
    if best is not None:
        return f" (did you mean '{best}'?)"
    return f" (valid: {', '.join(candidates)})"


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI `main`, printing user mistakes as one `error:` line with exit code 2, and a full disk
    (qlora.config.disk) as one `error:` line with its sizes and exit code 6."""
    try:
        code = main(argv)
    except QLoraError as exc:
        print_error_line(f"error: {exc}")
        return ExitCode.USAGE
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        report(exc)
        return ExitCode.DISK_FULL
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    return int(code or 0)
