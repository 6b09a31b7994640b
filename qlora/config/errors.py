"""The one user-facing error type, and the CLI wrapper that turns it into `error: ...` + exit 2.

A user mistake (bad recipe, missing file, wrong option) must cost seconds, not a stack trace:
library code raises `QLoraError` with a message naming the key/file/value and what would be valid;
only the CLI entry points decide how to print it.
"""

from __future__ import annotations

import difflib
import sys
from collections.abc import Callable, Iterable, Sequence

from qlora.config.disk import is_disk_full, print_error_line, report

USAGE_EXIT_CODE = 2


class QLoraError(Exception):
    """A mistake in the user's input: printed as one line, exit code 2."""


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
        return USAGE_EXIT_CODE
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        return report(exc)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(code or 0)
