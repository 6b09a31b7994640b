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
  good checkpoint kept | 6 disk full while writing, the last complete checkpoint and any finished adapter
  kept | 143 SIGTERM before any checkpoint existed (nothing to resume).
"""

from __future__ import annotations

import errno
import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from qlora.config.errors import ExitCode, QLoraError
from qlora.training.checkpoints import checkpoints_dir, latest_complete_checkpoint, remove_unfinished, rotate
from qlora.training.distributed import finish
from qlora.training.lock import RunLock
from qlora.training.nonfinite import ADVICE, StopOnNonFinite, stop_on_nonfinite_callback
from qlora.training.preemption import StopOnSigterm, resume_hint, sigterm_handling, stop_on_sigterm_callback

log = logging.getLogger(__name__)

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Writers that are not Python's own (safetensors' Rust, torch.save's C++) report a full disk in text.
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) is a full disk or an exhausted quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, Exception) and any(text in str(exc) for text in DISK_FULL_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def remove_debris(output_dir: Path) -> list[Path]:
    """Half-written files a failed write leaves: staging folders/files and unmarked new checkpoints."""
    removed = remove_unfinished(output_dir)
    for folder in (Path(output_dir), checkpoints_dir(output_dir)):
        for child in folder.glob(".*.tmp") if folder.is_dir() else []:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
            removed.append(child)
    return removed


def _where(exc: BaseException) -> str:
    return f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""


def disk_full_exit(exc: BaseException, output_dir: Path) -> SystemExit:
    """One line saying what happened and what is kept; the exit to raise."""
    remove_debris(output_dir)
    where = _where(exc)
    checkpoint = latest_complete_checkpoint(output_dir)
    adapter = (Path(output_dir) / "adapter").is_dir()
    if checkpoint is not None:
        kept = (
            f"the last complete checkpoint ({checkpoint.name}){' and the finished adapter' if adapter else ''} kept; "
            "free space, then continue with --resume"
        )
    else:
        kept = "the finished adapter kept; " if adapter else "no checkpoint was written yet; "
        kept += "free space, then run again"
    log.error(f"error: disk full while writing{where}; partial files removed, {kept}")
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
            if lock.held and is_disk_full(exc):
                raise disk_full_exit(exc, output_dir) from None
            if isinstance(exc, OSError):
                if is_disk_full(exc):  # not the process that writes (or nothing written yet): nothing to clean up here
                    log.error(f"error: disk full while writing{_where(exc)}; free space, then run again")
                    raise SystemExit(ExitCode.DISK_FULL) from None
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
        log.error(
            f"error: non-finite loss (NaN/inf) at step {nonfinite.stopped_at}: training stopped, {kept}; {ADVICE}"
        )
        raise SystemExit(ExitCode.NONFINITE)
    if sigterm is not None and sigterm.stopped_at is not None:
        finish()
        kept, code = resume_hint(output_dir)
        log.warning(f"stopped by SIGTERM at step {sigterm.stopped_at}: {kept}")
        raise SystemExit(code)
