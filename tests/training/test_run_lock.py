"""One run per output folder: the lock is exclusive, names its owner, and a dead owner's lock is taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from qlora.config.errors import QLoraError
from qlora.training.distributed import is_main_process
from qlora.training.lock import LOCK_NAME, RunLock


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_lock_is_refused_naming_the_owner_and_released_on_exit(tmp_path):
    out = tmp_path / "out"
    with RunLock(out) as first:
        first.acquire()
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner == {"pid": os.getpid(), "host": socket.gethostname()}
        with pytest.raises(
            QLoraError, match=rf"output_dir: .*out is in use by another run \(process {os.getpid()} on "
        ):
            RunLock(out).acquire()
    assert not (out / LOCK_NAME).exists()


def test_lock_is_released_when_the_run_raises(tmp_path):
    with pytest.raises(RuntimeError), RunLock(tmp_path) as lock:
        lock.acquire()
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
    pid = dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    with RunLock(tmp_path) as lock:
        lock.acquire()
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (
        f"warning: output_dir: taking over the stale lock of process {pid} (no longer running)"
        in capsys.readouterr().err
    )


def test_lock_of_another_host_is_not_guessed_stale(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead_pid(), "host": "some-other-node"}))
    with pytest.raises(
        QLoraError, match=r"in use by another run \(process \d+ on some-other-node\).*delete .*\.qlora\.lock"
    ):
        RunLock(tmp_path).acquire()


def test_a_refused_run_leaves_no_folder_it_created(tmp_path):
    out = tmp_path / "new"
    with RunLock(out) as lock:
        lock.acquire()
        assert out.is_dir()
    assert not out.exists()


def launched(rank: int, local_rank: int, world: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(local_rank), "WORLD_SIZE": str(world)}  # what torchrun sets


@pytest.mark.parametrize(
    "env, main", [({}, True), (launched(0, 0, 2), True), (launched(1, 1, 2), False), (launched(2, 0, 4), False)]
)  # the second machine's first process
def test_only_the_main_process_takes_the_lock(tmp_path, monkeypatch, env, main):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_main_process() is main
    with RunLock(tmp_path) as lock:
        lock.acquire()
        assert (tmp_path / LOCK_NAME).exists() is main


def test_train_refuses_an_output_dir_locked_by_a_live_run(tiny_llama, alpaca_file, tmp_path):
    from qlora.config.recipe import recipe_from_mapping
    from qlora.training.run import train

    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        recipe = recipe_from_mapping(
            {"model": {"name_or_path": str(tiny_llama)}, "data": {"path": str(alpaca_file)}, "output_dir": str(out)}
        )
        with pytest.raises(QLoraError, match=rf"in use by another run \(process {sleeper.pid} on "):
            train(recipe)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written, the other run's lock untouched
