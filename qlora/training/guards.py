"""What surrounds one training run so that nothing is lost and no traceback reaches the user.

`guarded_run(output_dir)` holds the output folder's lock (taken by `lock.acquire()` just before the
run writes its first file), handles SIGTERM (qlora.training.preemption) and turns a full disk, or any
other file-system error (permissions, a read-only disk), into one line. Under a launcher every process
prints its own line: an error the main process met in `qlora.training.distributed.on_main` is raised on
every process, so each ends with the same line. `run_callbacks(recipe)` are the Trainer callbacks that
go with it, and `exit_if_stopped(trainer)` ends a run that a callback stopped early with its documented
exit code, every process at the same step (the callbacks' decisions are reduced across processes).

Exit codes of `qlora train` (also in the README's Reliability section):
  0 done | 2 user mistake, or a file the run cannot read or write (`error: ...`) | 3 out of GPU memory |
  4 stopped by SIGTERM, a complete checkpoint kept (continue with --resume) | 5 non-finite loss, the last
  good checkpoint kept | 6 disk full (or quota) while writing, the last complete checkpoint and any finished
  adapter kept, or too little free space to start (qlora.config.disk, qlora.training.disk) | 143 SIGTERM
  before any checkpoint existed (nothing to resume).
"""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from qlora.config.disk import (
    NotEnoughSpace,
    as_disk_full,
    is_disk_full,
    print_error_line,
)
from qlora.config.errors import ExitCode, QLoraError
from qlora.training.checkpoints import checkpoints_dir, latest_complete_checkpoint, remove_unfinished, rotate
from qlora.training.distributed import finish
from qlora.training.lock import RunLock
from qlora.training.nonfinite import ADVICE, StopOnNonFinite, stop_on_nonfinite_callback
from qlora.training.preemption import StopOnSigterm, resume_hint, sigterm_handling, stop_on_sigterm_callback

log = logging.getLogger(__name__)


def remove_debris(output_dir: Path) -> list[Path]:
    """Half-written files a failed write leaves: staging folders/files and unmarked new checkpoints."""
    removed = remove_unfinished(output_dir)
    for folder in (Path(output_dir), checkpoints_dir(output_dir)):
        for child in folder.glob(".*.tmp") if folder.is_dir() else []:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def intact(output_dir: Path) -> str:
    """What a run stopped by a full disk keeps, and how to go on."""
    checkpoint = latest_complete_checkpoint(output_dir)
    adapter = " and the finished adapter is kept" if (Path(output_dir) / "adapter").is_dir() else ""
    if checkpoint is not None:
        return f"the last complete checkpoint is {checkpoint.name}{adapter}; free space, then continue with --resume"
    if adapter:
        return "the finished adapter is kept; free space, then run again"
    return "no checkpoint was written yet; free space, then run again"


def disk_full_exit(exc: BaseException, output_dir: Path, cleanup: bool = True) -> SystemExit:
    """One line (on its own line) saying what was being written, the space it needed and what is free, and
    what is kept; the exit to raise. `cleanup`: this process writes, so it removes the half-written files."""
    full = as_disk_full(exc)
    if isinstance(full, NotEnoughSpace):  # refused before anything was written: its advice says what to do
        print_error_line(full.line())
        return SystemExit(ExitCode.DISK_FULL)
    if cleanup:  # the writers remove their own temporary files; a half-written checkpoint is left to us
        remove_debris(output_dir)
    full.measure_free()  # with the partial files gone: what a retry will find
    full.kept = ("partial files removed; " if cleanup else "") + intact(output_dir)
    print_error_line(full.line())
    return SystemExit(ExitCode.DISK_FULL)


@contextmanager
def guarded_run(output_dir: Path):
    """Lock + SIGTERM handling + a full disk or another file-system error as one line, around one run;
    yields the (not yet taken) lock."""
    output_dir = Path(output_dir)
    with RunLock(output_dir) as lock, sigterm_handling(output_dir):
        try:
            yield lock
        except Exception as exc:
            if is_disk_full(exc):  # only the process that holds the lock writes, so only it cleans up
                raise disk_full_exit(exc, output_dir, cleanup=lock.held) from None
            if isinstance(exc, OSError):
                raise QLoraError(os_error_line(exc)) from exc
            raise


def os_error_line(exc: OSError) -> str:
    """A file-system error as `error:` text: the file, then what went wrong ('out/adapter: Permission denied')."""
    if exc.strerror and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


class RotateCheckpoints(TrainerCallback):
    """`training.save_total_limit`, applied only after the newest checkpoint is marked complete."""

    def __init__(self, keep: int | None):
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            rotate(Path(args.output_dir), self.keep)


def rotate_checkpoints_callback(keep: int | None) -> RotateCheckpoints:
    return RotateCheckpoints(keep)


def run_callbacks(recipe) -> list:
    """The callbacks that go with `guarded_run` (after the COMPLETE marker's, in this order)."""
    return [
        rotate_checkpoints_callback(recipe.training.save_total_limit),
        stop_on_sigterm_callback(),
        stop_on_nonfinite_callback(recipe.training.max_nonfinite_steps),  # last: it vetoes the save
    ]


def exit_if_stopped(trainer, output_dir: Path) -> None:
    """After `trainer.train()`: a run stopped by SIGTERM or a non-finite loss ends here, with its code.

    Both stops are decided by all processes together (the callbacks reduce their flags), so every
    process gets here at the same step and they leave the process group together before exiting.
    """
    callbacks = trainer.callback_handler.callbacks
    nonfinite = next((cb for cb in callbacks if isinstance(cb, StopOnNonFinite)), None)
    sigterm = next((cb for cb in callbacks if isinstance(cb, StopOnSigterm)), None)
    if nonfinite is not None and nonfinite.stopped_at is not None:
        finish()
        last = latest_complete_checkpoint(output_dir)
        kept = f"the last good checkpoint ({last.name}) is kept" if last else "no checkpoint was written before it"
        print_error_line(  # on its own line, not after the progress bar
            f"error: non-finite loss (NaN/inf) at step {nonfinite.stopped_at}: training stopped, {kept}; {ADVICE}"
        )
        raise SystemExit(ExitCode.NONFINITE)
    if sigterm is not None and sigterm.stopped_at is not None:
        finish()
        kept, code = resume_hint(output_dir)
        log.warning(f"stopped by SIGTERM at step {sigterm.stopped_at}: {kept}")
        raise SystemExit(code)
