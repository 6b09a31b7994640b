"""Which checkpoints a resume may trust, and the output folder's rules.

transformers' Trainer writes `checkpoint-N/` file by file in place, so a process killed mid-save
leaves a folder that looks like a checkpoint but is not one. We write a `COMPLETE` marker (itself
atomically) only after Trainer has finished saving; a resume trusts only marked checkpoints.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from qlora.errors import QLoraError

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RESULT_ENTRIES = ("adapter", "metrics.json", "checkpoints", "recipe.yaml")


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Marked checkpoints, oldest first by step."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and (child / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint a resume can trust, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def mark_complete(checkpoint: Path) -> None:
    """Declare a fully written checkpoint trustworthy."""
    from qlora.io import atomic_write_text

    atomic_write_text(Path(checkpoint) / COMPLETE_MARKER, "ok\n")


def has_results(output_dir: Path) -> bool:
    """Whether `output_dir` already holds a run's results (which a new run must not clobber)."""
    return any((Path(output_dir) / name).exists() for name in RESULT_ENTRIES)


def started_without_finishing(output_dir: Path) -> bool:
    """A run began here (its recipe is saved) but never wrote its metrics."""
    return (Path(output_dir) / "recipe.yaml").exists() and not (Path(output_dir) / "metrics.json").exists()


def prepare_output_dir(output_dir: Path, overwrite: bool, resume: bool) -> Path | None:
    """Check the output folder against --overwrite/--resume; return the checkpoint to resume from."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise QLoraError(f"output_dir: {output_dir} exists and is not a folder")
    if resume and overwrite:
        raise QLoraError("--resume and --overwrite contradict each other; choose one")
    if resume:
        checkpoint = latest_complete_checkpoint(output_dir)
        if checkpoint is not None:
            return checkpoint
        if not started_without_finishing(output_dir):
            raise QLoraError(f"--resume: no complete checkpoint under {checkpoints_dir(output_dir)}")
        # Killed before its first checkpoint was complete: nothing is lost by starting again, and
        # refusing would only make the user find out which folder to delete.
        print(f"warning: --resume: no complete checkpoint under {checkpoints_dir(output_dir)} yet; "
              "starting again from step 0", file=sys.stderr)
        shutil.rmtree(checkpoints_dir(output_dir), ignore_errors=True)
        return None
    if has_results(output_dir):
        if not overwrite:
            raise QLoraError(
                f"output_dir: {output_dir} already holds results; pass --overwrite to replace them or --resume to continue"
            )
        for name in RESULT_ENTRIES:  # only what a run writes: never the user's other files
            target = output_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise QLoraError(f"output_dir: cannot create {output_dir}: {exc.strerror}") from None
    return None
