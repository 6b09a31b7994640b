"""Which checkpoints a resume may trust, and the output folder's rules.

transformers' Trainer writes `checkpoint-N/` file by file in place, so a process killed mid-save
leaves a folder that looks like a checkpoint but is not one. We write a `COMPLETE` marker (itself
atomically) only after Trainer has finished saving; a resume trusts only marked checkpoints.

The marker records the size and sha256 of every file in the checkpoint, so a checkpoint damaged
after it was finished (a truncated copy, a flipped byte, a full disk during a later rewrite) is
caught before transformers would fail on it with a traceback: `--resume` warns once per damaged
checkpoint, removes it and falls back to the previous intact one. Rotation (`save_total_limit`)
is done here, after the newer checkpoint is marked, so an intact checkpoint exists at every moment
(transformers rotates before our marker is written, which with a limit of 1 leaves none).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from qlora.config.errors import QLoraError
from qlora.config.io import atomic_write_json

log = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
RESULT_ENTRIES = ("adapter", "metrics.json", "checkpoints", "recipe.yaml", "log.jsonl", "training.png", "tensorboard")


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_of(checkpoint: Path) -> int:
    """N of a `checkpoint-N` folder."""
    return int(CHECKPOINT_RE.match(Path(checkpoint).name).group(1))


def _checkpoint_folders(output_dir: Path, marked: bool) -> list[tuple[int, Path]]:
    """(step, folder) of the checkpoints with (or without) their marker, oldest first."""
    root = checkpoints_dir(output_dir)
    if not root.is_dir():
        return []
    return sorted(
        (step_of(child), child)
        for child in root.iterdir()
        if CHECKPOINT_RE.match(child.name) and (child / COMPLETE_MARKER).exists() == marked
    )


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """Marked checkpoints, oldest first by step."""
    return [path for _, path in _checkpoint_folders(output_dir, marked=True)]


def unmarked_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of checkpoint folders that never got their marker (half-written), oldest first."""
    return _checkpoint_folders(output_dir, marked=False)


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint a resume can trust, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1] if found else None


def file_digests(checkpoint: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} for every file of a checkpoint except the marker."""
    checkpoint = Path(checkpoint)
    digests = {}
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        digests[path.relative_to(checkpoint).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha.hexdigest()}
    return digests


def mark_complete(checkpoint: Path) -> None:
    """Declare a fully written checkpoint trustworthy, recording what each of its files must hash to."""
    atomic_write_json(Path(checkpoint) / COMPLETE_MARKER, {"files": file_digests(checkpoint)})


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a marked checkpoint's files (None when they match the marker).

    Markers written before checksums were recorded ('ok') have nothing to check and are trusted.
    """
    checkpoint = Path(checkpoint)
    try:
        recorded = json.loads((checkpoint / COMPLETE_MARKER).read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        text = (checkpoint / COMPLETE_MARKER).read_bytes() if (checkpoint / COMPLETE_MARKER).is_file() else b""
        return None if text.strip() == b"ok" else f"{COMPLETE_MARKER}: unreadable marker"
    actual = file_digests(checkpoint)
    for name, want in recorded.items():
        got = actual.get(name)
        if got is None:
            return f"{name}: missing"
        if got["bytes"] != want.get("bytes"):
            return f"{name}: {got['bytes']} bytes, {want.get('bytes')} recorded (truncated or replaced)"
        if got["sha256"] != want.get("sha256"):
            return f"{name}: checksum differs from the one recorded (corrupted)"
    return None


def latest_intact_checkpoint(output_dir: Path) -> Path | None:
    """The newest marked checkpoint whose files match their checksums, or None when none is marked.

    Damaged ones newer than it get one warning each and are removed (the resume writes those steps
    again); when every marked checkpoint is damaged the resume is refused with one line.
    """
    marked = complete_checkpoints(output_dir)
    damaged = []
    for checkpoint in reversed(marked):
        problem = damage(checkpoint)
        if problem is None:
            for bad, why in damaged:
                log.warning(
                    f"warning: --resume: {bad.name} is damaged ({why}); removed it, resuming from {checkpoint.name}"
                )
                shutil.rmtree(bad, ignore_errors=True)
            return checkpoint
        damaged.append((checkpoint, problem))
    if damaged:
        details = "; ".join(f"{c.name}: {why}" for c, why in damaged)
        raise QLoraError(
            f"--resume: no intact checkpoint under {checkpoints_dir(output_dir)} ({details}); "
            "pass --overwrite to start again"
        )
    return None


def rotate(checkpoint_root: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints; delete older ones and older half-written ones."""
    if not keep or keep < 1:
        return
    root = Path(checkpoint_root)
    marked = complete_checkpoints(root.parent)
    if len(marked) <= keep:
        older_than = marked[0] if marked else None
    else:
        for old in marked[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        older_than = marked[-keep]
    if older_than is None:
        return
    oldest_kept = step_of(older_than)
    for step, child in unmarked_checkpoints(root.parent):
        if step < oldest_kept:
            shutil.rmtree(child, ignore_errors=True)


def remove_unfinished(output_dir: Path) -> list[Path]:
    """Delete checkpoint folders newer than the last complete one that never got their marker."""
    marked = complete_checkpoints(output_dir)
    newest = step_of(marked[-1]) if marked else -1
    removed = [child for step, child in unmarked_checkpoints(output_dir) if step > newest]
    for child in removed:
        shutil.rmtree(child, ignore_errors=True)
    return removed


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
        checkpoint = latest_intact_checkpoint(output_dir)
        if checkpoint is not None:
            remove_unfinished(output_dir)  # half-written newer folders: the resume writes those steps afresh
            return checkpoint
        if not started_without_finishing(output_dir):
            raise QLoraError(f"--resume: no complete checkpoint under {checkpoints_dir(output_dir)}")
        # Killed before its first checkpoint was complete: nothing is lost by starting again, and
        # refusing would only make the user find out which folder to delete.
        log.warning(
            f"warning: --resume: no complete checkpoint under {checkpoints_dir(output_dir)} yet; "
            "starting again from step 0"
        )
        shutil.rmtree(checkpoints_dir(output_dir), ignore_errors=True)
        return None
    if has_results(output_dir):
        if not overwrite:
            raise QLoraError(
                f"output_dir: {output_dir} already holds results; pass --overwrite to replace them or --resume to "
                "continue"
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
