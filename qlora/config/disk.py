"""A full disk or quota, recognised in one place, reported as one line, with its own exit code.

Every writer reports a full disk differently: Python's own files raise `OSError` with ENOSPC or EDQUOT,
safetensors' Rust writer a `SafetensorError` ("No space left on device (os error 28)"), torch.save's C++
zip writer a `RuntimeError` ("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", its
`fwrite` came up short). `is_disk_full` knows them all; `writing(what, where, needed)` wraps one write and
turns any of them into `DiskFull`, which knows what was being written, where, how much it needed and how
much is free (`shutil.disk_usage`). The entry points print it as one `error:` line and exit with
`ExitCode.DISK_FULL` (qlora.config.errors), which also ends a run refused before it starts because the space
it will need is not free (`check_free_space`).
"""

from __future__ import annotations

import errno
import shutil
import sys
from collections.abc import Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Writers that are not Python's own (safetensors' Rust, torch.save's C++) report a full disk in text.
DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28", "os error 122")
# torch.save's zip writer (caffe2's inline_container.cc) only checks how far its short `fwrite` got.
TORCH_WRITER_TEXT = ("unexpected pos", "PytorchStreamWriter failed writing")
SKIP_HINT = "pass --skip-space-check if this file system reports its free space wrongly (e.g. a network mount)"


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) is a full disk or an exhausted quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return True
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        text = str(exc) if isinstance(exc, Exception) else ""
        if any(t in text for t in DISK_FULL_TEXT):
            return True
        if (
            isinstance(exc, RuntimeError)
            and "inline_container.cc" in text
            and any(t in text for t in TORCH_WRITER_TEXT)
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on the file system that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return int(shutil.disk_usage(folder).free)
            except OSError:
                return None
    return None


def size(n: int | None) -> str:
    """Bytes for people: '1.25 GiB', '340.2 KiB', '512 bytes'."""
    if n is None:
        return "an unknown amount"
    for unit, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= unit:
            return f"{n / unit:.2f} {name}"
    return f"{n} bytes"


def needed_and_free(needed: int | None, free: int | None) -> str:
    """'needs about 1.20 GiB, 350.00 MiB free'."""
    return f"needs about {size(needed)}, {size(free)} free" if needed is not None else f"{size(free)} free"


class DiskFull(Exception):
    """A write that found the disk (or the quota) full. `kept`: what is intact and what to do, filled in by
    whoever knows (the run's guard, a command); `line()` is what the user reads."""

    def __init__(self, what: str, where=None, needed: int | None = None, free: int | None = None, kept: str = ""):
        self.what, self.where, self.needed, self.kept = what, str(where) if where else None, needed, kept
        self.free = free
        if free is None:
            self.measure_free()
        super().__init__(self.describe())

    def measure_free(self) -> None:
        """Read the free space again (after partial files were removed: what a retry will find)."""
        self.free = free_bytes(Path(self.where)) if self.where else None

    def __reduce__(self):  # survives pickling (sent to the other processes of a launcher) unchanged
        return type(self), (self.what, self.where, self.needed, self.free, self.kept)

    def describe(self) -> str:
        where = f" ({self.where})" if self.where else ""
        sizes = f": {needed_and_free(self.needed, self.free)}" if (self.needed, self.free) != (None, None) else ""
        return f"disk full while writing {self.what}{where}{sizes}"

    def line(self) -> str:
        return f"error: {self.describe()}; {self.kept or 'free space, then run it again'}"


def as_disk_full(exc: BaseException, what: str | None = None, where=None, needed: int | None = None) -> DiskFull:
    """`exc` (recognised by `is_disk_full`) as a `DiskFull`, naming what it can."""
    if isinstance(exc, DiskFull):
        return exc
    filename = getattr(exc, "filename", None)
    where = where or filename
    return DiskFull(what or (Path(filename).name if filename else "a file"), where, needed)


@contextmanager
def writing(what: str, where: Path | str, needed: int | None = None):
    """Around one write: a full disk becomes `DiskFull(what, where, needed)` (the free space read then)."""
    try:
        yield
    except DiskFull:
        raise
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise DiskFull(what, where, needed) from exc


class NotEnoughSpace(DiskFull):
    """Too little free space for what a command is about to write: refused before it starts (`kept`: advice)."""

    def describe(self) -> str:
        return f"not enough disk space for {self.what} in {self.where}: {needed_and_free(self.needed, self.free)}"

    def line(self) -> str:
        return f"error: {self.describe()}; {self.kept or 'free space'}, or {SKIP_HINT}"


def check_free_space(what: str, where: Path, needed: int, skip: bool = False, advice: str = "") -> int | None:
    """Refuse (`NotEnoughSpace`) when the file system of `where` has less than `needed` bytes free; returns
    the free bytes. `skip` (--skip-space-check): file systems that report wrongly are taken at their word."""
    free = free_bytes(where)
    if not skip and free is not None and free < needed:
        raise NotEnoughSpace(what, where, needed, free, advice)
    return free


def end_progress_lines() -> None:
    """Close the progress bars still drawn (a run stopped mid-bar), so that the next line starts a line.

    tqdm draws with carriage returns and no newline: text printed while a bar is live lands at the end of
    the bar's line. tqdm is looked up, not imported: a process that never drew a bar has none to end."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    for bar in list(getattr(std.tqdm, "_instances", ())):
        with suppress(Exception):  # a bar of a torn-down stream: nothing to end
            bar.close()
    sys.stderr.flush()


def print_error_line(line: str) -> None:
    """One `error:` line on its own line of stderr."""
    end_progress_lines()
    print(line, file=sys.stderr)


def report(exc: BaseException) -> None:
    """Print a full disk (`DiskFull` or any error `is_disk_full` knows) as its one line (exit with
    `ExitCode.DISK_FULL`)."""
    print_error_line(as_disk_full(exc).line())


def describe_items(items: Sequence[tuple[str, int]]) -> str:
    """'4 checkpoints of 1.10 GiB each, the adapter 250.00 MiB' from `(label, bytes)` pairs."""
    return ", ".join(f"{label} {size(n)}" for label, n in items)
