"""One run per output folder: a lock file taken before the run writes anything, released on every exit.

`output_dir/.qlora.lock` is created with O_CREAT|O_EXCL (atomic on POSIX, also on NFS v3+) and holds
the owner's PID and host. A second run into the same folder is refused with one line naming the
owner. A lock whose PID is dead on this host (a SIGKILL, a power cut) is stale: the next run takes it
over with a warning. Written by hand because `filelock`'s flock locks cannot name their owner, and
its soft locks cannot tell a stale lock from a live one.

Under torchrun only the main process (RANK / LOCAL_RANK 0, or no launcher) takes the lock: the
other processes write nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from pathlib import Path

from qlora.config.errors import QLoraError
from qlora.training.distributed import is_main_process

log = logging.getLogger(__name__)

LOCK_NAME = ".qlora.lock"


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True


class RunLock:
    """The output folder's lock; `acquire()` when the run is about to write, released on `__exit__`."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.held = False
        self.created_dir = False

    def acquire(self) -> None:
        if self.held or not is_main_process():
            return
        self.created_dir = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise QLoraError(f"output_dir: cannot create {self.path.parent}: {exc.strerror}") from None
        owner = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):  # a second try after removing a stale lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as exc:
                raise QLoraError(f"output_dir: cannot create {self.path}: {exc.strerror}") from None
            with os.fdopen(fd, "w") as handle:
                json.dump(owner, handle)
            self.held = True
            return
        raise QLoraError(f"output_dir: {self.path.parent} is locked by another run (lock file {self.path})")

    def _take_over_if_stale(self) -> None:
        """Remove a lock left by a dead process on this host; refuse while its owner lives."""
        try:
            owner = json.loads(self.path.read_text())
            pid, host = int(owner["pid"]), str(owner["host"])
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError, KeyError, TypeError):
            pid, host = None, None
        if pid is not None and host == socket.gethostname() and not pid_alive(pid):
            log.warning(
                f"warning: output_dir: taking over the stale lock of process {pid} (no longer running): {self.path}"
            )
            self.path.unlink(missing_ok=True)
            return
        who = f"process {pid} on {host}" if pid is not None else "an unreadable lock file"
        raise QLoraError(
            f"output_dir: {self.path.parent} is in use by another run ({who}); wait for it to finish or choose "
            f"another output_dir (if no run is using it, delete {self.path})"
        )

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            if self.created_dir:  # a run refused before writing leaves no empty folder behind
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
