"""Crash-safe file writes: write to a temporary name in the same folder, then rename.

A process killed at any moment (SIGKILL, preemption, OOM killer) leaves either the old file or
the new one, never half of one, because `os.replace` is atomic on POSIX file systems.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qlora.config.disk import writing


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one atomic step (a full disk: `DiskFull`, the old file kept)."""
    path = Path(path)
    data = text.encode("utf-8")
    with writing(path.name, path, len(data)):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def publish_dir(staging: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing an older one at `final`.

    Readers never see a partial folder: the old one is renamed aside first, the new one renamed in,
    then the old one deleted. A crash in between leaves a `.old` folder, which nothing trusts.
    """
    staging, final = Path(staging), Path(final)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)


def staging_dir_for(final: Path) -> Path:
    """A fresh temporary folder beside `final` (same file system, so the final rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


@contextmanager
def staged_dir(final: Path):
    """Yield a staging folder for `final`; publish it on success, delete it on any failure.

    A full disk or a kill mid-write thus leaves the previous `final` (if any) as it was and no
    staging debris.
    """
    staging = staging_dir_for(final)
    try:
        yield staging
        publish_dir(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
