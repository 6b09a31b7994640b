"""SIGTERM (Slurm, Kubernetes, spot instances, notebook hosts) ends a run with a checkpoint, not a loss.

During training the handler only sets a flag; the `StopOnSigterm` callback sees it at the end of the
current optimizer step, asks the Trainer to save a checkpoint there and to stop, and the run exits
with `ExitCode.PREEMPTED` (4) and a line saying to continue with `--resume`. Outside training
(loading, the baseline evaluation, the final save) there is no step to finish, so the handler ends
the run at once through `SystemExit`, which releases the output folder's lock on the way out: exit 4
when a complete checkpoint exists to resume from, else 143 (the shell's code for SIGTERM).

Signals are process-wide, so the state is too (one run per process).
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from transformers import TrainerCallback

from qlora.config.errors import ExitCode
from qlora.training.checkpoints import latest_complete_checkpoint
from qlora.training.distributed import any_process


class _State:
    requested = False  # a SIGTERM arrived while training
    training = False  # between on_train_begin and on_train_end
    output_dir: Path | None = None


STATE = _State()


def resume_hint(output_dir: Path | None) -> tuple[str, int]:
    """(what is kept, exit code) for a run that stops now."""
    checkpoint = latest_complete_checkpoint(output_dir) if output_dir else None
    if checkpoint is None:
        return "no checkpoint was written yet; nothing to resume", ExitCode.TERMINATED
    return f"{checkpoint.name} is complete; continue with --resume", ExitCode.PREEMPTED


def _on_sigterm(signum, frame) -> None:
    # print, not the logger: a signal handler runs between any two bytecodes, and logging's handler lock may be
    # held by the code it interrupted (a deadlock).
    if STATE.training:
        if not STATE.requested:
            print("received SIGTERM: finishing this optimizer step, then saving a checkpoint", file=sys.stderr)
        STATE.requested = True
        return
    kept, code = resume_hint(STATE.output_dir)
    print(f"stopped by SIGTERM: {kept}", file=sys.stderr)
    raise SystemExit(code)


@contextmanager
def sigterm_handling(output_dir: Path):
    """Install the SIGTERM handler for one run (main thread only: Python's rule for signals)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STATE.requested, STATE.training, STATE.output_dir = False, False, Path(output_dir)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        STATE.requested, STATE.training, STATE.output_dir = False, False, None


def requested_anywhere() -> bool:
    """The flag, OR-ed over all processes when distributed (every rank must stop at the same step)."""
    return any_process(STATE.requested)


class StopOnSigterm(TrainerCallback):
    """After a SIGTERM, save at the end of this step and stop."""

    stopped_at: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        STATE.training = True

    def on_step_end(self, args, state, control, **kwargs):
        if requested_anywhere():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_train_end(self, args, state, control, **kwargs):
        STATE.training = False


def stop_on_sigterm_callback() -> StopOnSigterm:
    """The Trainer callback: after a SIGTERM, save at the end of this step and stop."""
    return StopOnSigterm()
