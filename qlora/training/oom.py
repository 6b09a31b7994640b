"""One out-of-memory handler for every GPU phase (evaluations, training, merge, generate).

Running out of GPU memory is not a bug to show as a traceback: the user gets one `error:` block that
names the phase, what was kept, and what to change, and the process exits with `ExitCode.OOM` (3),
which `qlora sweep` reads as "this point did not fit".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch

from qlora.config.errors import ExitCode
from qlora.config.gpus import parse_gpu_memory
from qlora.memory.planner import plan_fit

log = logging.getLogger(__name__)


def fit_advice(recipe) -> list[str]:
    """What to change for a training run: the profiler's fit plan for this GPU, when it can tell."""
    lines = []
    try:
        if torch.cuda.is_available():
            gpu_bytes = torch.cuda.get_device_properties(0).total_memory
        else:
            gpu_bytes = parse_gpu_memory(recipe.target_gpu, "target_gpu") if recipe.target_gpu else None
        if gpu_bytes:
            lines.extend(plan_fit(recipe, gpu_bytes).advice())
    except Exception as exc:  # the advice is best effort: the OOM message itself must reach the user
        lines.append(f"(the profiler could not plan a fit: {exc})")
    lines.append("see `qlora profile --recipe RECIPE --gpu <memory>` for the full table")
    return lines


class OutOfMemoryExit:
    """`with OutOfMemoryExit("merge", advice=[...]):` turns torch.OutOfMemoryError into the message + exit 3.

    `advice` is a list of lines or a callable returning them (called only after an OOM, so a profiler
    plan costs nothing on the happy path). With `deferred=True` the error is swallowed and remembered;
    the caller finishes what it can (e.g. writes metrics) and then calls `exit_if_out_of_memory()`.
    """

    def __init__(
        self,
        phase: str,
        advice: Iterable[str] | Callable[[], Iterable[str]] = (),
        kept: str = "",
        deferred: bool = False,
    ):
        self.phase, self.advice, self.kept, self.deferred = phase, advice, kept, deferred
        self.happened = False

    def __enter__(self) -> OutOfMemoryExit:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            return False

        if not issubclass(exc_type, torch.OutOfMemoryError):
            return False
        self.happened = True
        release_cached_memory()
        if self.deferred:
            return True
        self.exit()
        return False  # not reached: exit() raises SystemExit

    def message(self) -> str:
        lines = [f"out of GPU memory during {self.phase}" + (f"; {self.kept}" if self.kept else "")]
        lines.extend(self.advice() if callable(self.advice) else self.advice)
        return "\n".join(lines)

    def exit(self) -> None:
        log.error(f"error: {self.message()}")
        raise SystemExit(ExitCode.OOM) from None

    def exit_if_out_of_memory(self) -> None:
        if self.happened:
            self.exit()


def release_cached_memory() -> None:
    """Give the allocator's cache back after an OOM, so whatever runs next (saving, metrics) has room."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
