"""Every stop is collective: a non-finite step seen by one process stops them all at that step, and
whatever the main process raises inside `on_main` is raised on every process, so none hangs.

The two-process tests run this file under torchrun as a launcher (see `__main__` at the bottom): it
patches a fault into one process, then runs `qlora train` as the CLI does, and records its exit code.
"""

from __future__ import annotations

import errno
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qlora.config.disk
from qlora.config.errors import ExitCode, QLoraError, run_cli
from qlora.train import main as train_main
from qlora.training import distributed
from qlora.training.guards import guarded_run
from qlora.training.lock import LOCK_NAME
from qlora.training.nonfinite import stop_on_nonfinite_callback

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes" / "demo.yaml"
SHORT = [
    "training.max_steps=8",
    "training.save_steps=4",
    "training.logging_steps=4",
    "training.batch_size=4",
    "lora.dropout=0",
    "eval.metric=none",
    "data.eval_size=8",
]
TIMEOUT_S = 120  # each run takes 10-20 s on two cores; a process left waiting in a collective would wait 30 min


# --- fast: the pure parts ---------------------------------------------------------------------------


class Unpicklable(Exception):
    def __init__(self, message):
        super().__init__(message)
        self.handle = lambda: None  # a lambda cannot be pickled: only the type and the message travel


class TwoArguments(Exception):
    def __init__(self, code, detail):
        super().__init__(f"{code}: {detail}")


def round_trip(exc: BaseException) -> BaseException:
    """What another process raises for `exc`, through the same pickling a broadcast does."""
    return distributed.relayed(pickle.loads(pickle.dumps(distributed.relayable(exc))))


def test_a_relayed_error_keeps_its_type_and_message():
    user = round_trip(QLoraError("output_dir: x already holds results"))
    assert type(user) is QLoraError and str(user) == "output_dir: x already holds results"
    denied = round_trip(PermissionError(errno.EACCES, "Permission denied", "/out/adapter"))
    assert type(denied) is PermissionError and (denied.errno, denied.filename) == (errno.EACCES, "/out/adapter")
    assert round_trip(SystemExit(4)).code == 4  # SIGTERM on the main process: the same exit everywhere
    rebuilt = round_trip(Unpicklable("half written"))
    assert type(rebuilt) is Unpicklable and str(rebuilt) == "half written"


def test_an_error_that_cannot_be_rebuilt_becomes_a_runtime_error_naming_it():
    class Local(Exception):  # not importable by name on another process
        pass

    for exc, name in [(Local("gone"), "Local"), (TwoArguments(7, "bad"), "TwoArguments")]:
        copy = round_trip(exc)
        assert type(copy) is RuntimeError and name in str(copy) and str(exc) in str(copy)


class FakeState:
    """accelerate's PartialState as `on_main` uses it, for one process of two."""

    def __init__(self, main: bool):
        self.is_main_process = main
        self.device = torch.device("cpu")


def two_processes(monkeypatch, main: bool, sent=None):
    """Make `distributed` believe it is one of two processes; `sent`: what the main process broadcasts."""
    left = []
    monkeypatch.setattr(distributed, "joined", lambda: FakeState(main))
    monkeypatch.setattr(distributed, "finish", lambda: left.append(True))

    def broadcast(box, from_process=0):
        if not main:
            box[0] = sent
        return box

    monkeypatch.setattr(distributed, "broadcast_object_list", broadcast)
    return left


def test_on_main_raises_what_the_main_process_raised_on_every_process(monkeypatch):
    denied = PermissionError(errno.EACCES, "Permission denied", "/out/adapter")

    def fail():
        raise denied

    left = two_processes(monkeypatch, main=True)
    with pytest.raises(PermissionError) as info:
        distributed.on_main(fail)
    assert info.value is denied and left == [True]  # the original, traceback and all; the group is left

    left = two_processes(monkeypatch, main=False, sent=("error", distributed.relayable(denied)))
    with pytest.raises(PermissionError) as info:
        distributed.on_main(lambda: pytest.fail("only the main process runs fn"))
    assert info.value.filename == "/out/adapter" and left == [True]

    two_processes(monkeypatch, main=False, sent=("ok", Path("/out/checkpoint-4")))
    assert distributed.on_main(lambda: None) == Path("/out/checkpoint-4")


def test_a_result_that_cannot_be_sent_is_a_failure_everywhere(monkeypatch):
    two_processes(monkeypatch, main=True)
    with pytest.raises(Exception, match="pickle"):
        distributed.on_main(lambda: lambda: None)


def test_one_process_seeing_a_nonfinite_step_stops_every_process(monkeypatch):
    """This process sees a finite loss and finite gradients; another one does not: this one stops too."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    monkeypatch.setattr(distributed, "joined", lambda: FakeState(main=True))
    monkeypatch.setattr(distributed, "reduce", lambda tensor, reduction: torch.ones_like(tensor))  # the other's "bad"
    model, callback = torch.nn.Linear(2, 1), stop_on_nonfinite_callback(0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    control = callback.on_pre_optimizer_step(
        TrainingArguments(output_dir="unused", report_to="none"),
        TrainerState(),
        TrainerControl(),
        model=model,
        optimizer=None,
    )
    assert control.should_training_stop and callback.stopped_at == 1
    assert all(p.grad is None for p in model.parameters())  # no update on this process either

    monkeypatch.setattr(distributed, "reduce", lambda tensor, reduction: tensor.clone())
    assert distributed.any_process(False) is False and distributed.any_process(True) is True


def test_one_process_decides_alone():
    assert distributed.joined() is None  # no process group in the test process
    assert distributed.any_process(True) is True and distributed.any_process(False) is False
    assert distributed.on_main(lambda: 3) == 3 and distributed.gather(3) == [3]


def test_a_file_system_error_is_one_line(tmp_path):
    with pytest.raises(QLoraError, match=r"^/out/adapter: Permission denied$"), guarded_run(tmp_path / "run"):
        raise PermissionError(errno.EACCES, "Permission denied", "/out/adapter")


def test_a_full_disk_before_anything_was_written_is_one_line_and_exit_6(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(qlora.config.disk, "free_bytes", lambda path: 4096)
    # The lock is never taken: as on a process that is not the main one.
    with pytest.raises(SystemExit) as info, guarded_run(tmp_path / "run"):
        raise OSError(errno.ENOSPC, "No space left on device", "/out/checkpoints/checkpoint-4")
    assert info.value.code == ExitCode.DISK_FULL
    assert capsys.readouterr().err == (
        "error: disk full while writing checkpoint-4 (/out/checkpoints/checkpoint-4): 4.00 KiB free; "
        "no checkpoint was written yet; free space, then run again\n"
    )


# --- slow: two processes over gloo ----------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(tmp_path: Path, out: Path, fault: str, *extra: str) -> tuple[dict[int, int], dict[int, str]]:
    """Two processes of this file's launcher with `fault`; (exit code, stderr) per rank."""
    logs, exits = tmp_path / "logs", tmp_path / "exits"
    exits.mkdir()
    sets = [arg for s in (*SHORT, f"output_dir={out}") for arg in ("--set", s)]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "--log-dir",
        str(logs),
        "--redirects",
        "3",
        __file__,
        str(DEMO),
        *sets,
        *extra,
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=_env(QLORA_TEST_FAULT=fault, QLORA_TEST_EXITS=str(exits)),
    )
    try:
        process.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # torchrun and both workers: nothing is left waiting
        process.wait()
        pytest.fail(f"the two processes did not end within {TIMEOUT_S} s (one waits for the other)")
    codes = {int(p.name.removeprefix("rank-")): int(p.read_text()) for p in exits.iterdir()}
    errs = {int(p.parent.name): p.read_text() for p in logs.rglob("stderr.log")}
    return codes, errs


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.slow
def test_a_nan_on_one_process_stops_both_at_that_step_with_exit_5(tmp_path):
    out = tmp_path / "run"
    codes, errs = launch(tmp_path, out, "nan-on-rank-1-at-step-6")
    assert codes == {0: ExitCode.NONFINITE, 1: ExitCode.NONFINITE}, errs
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4"]
    assert (out / "checkpoints" / "checkpoint-4" / "COMPLETE").exists()
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists() and not (out / LOCK_NAME).exists()
    for rank in (0, 1):
        lines = error_lines(errs[rank])
        assert len(lines) == 1 and "Traceback" not in errs[rank] and "terminate called" not in errs[rank], errs[rank][
            -3000:
        ]
        assert lines[0].startswith(
            "error: non-finite loss (NaN/inf) at step 6: training stopped, "
            "the last good checkpoint (checkpoint-4) is kept"
        )


@pytest.mark.slow
def test_an_oserror_on_the_main_process_in_on_main_ends_both_with_one_error_line(tmp_path):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)  # results of an earlier run that --overwrite fails to remove
    (out / "metrics.json").write_text("{}")
    codes, errs = launch(tmp_path, out, "oserror-on-main", "--overwrite")
    assert codes == {0: 2, 1: 2}, errs
    for rank in (0, 1):
        assert error_lines(errs[rank]) == [f"error: {out / 'adapter'}: Permission denied"], errs[rank][-3000:]
        assert "Traceback" not in errs[rank] and "terminate called" not in errs[rank]
    assert not (out / LOCK_NAME).exists() and (out / "metrics.json").exists()


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_on_the_main_process_stops_both_with_one_line_and_exit_6(tmp_path):
    """torch.save of checkpoint-8's optimizer states (the main process alone writes them) meets a full disk:
    both processes stop after that save, each with one line, and checkpoint-4 stays the one to resume from."""
    out = tmp_path / "run"
    codes, errs = launch(tmp_path, out, "disk-full-on-main-at-checkpoint-8")
    assert codes == {0: ExitCode.DISK_FULL, 1: ExitCode.DISK_FULL}, errs
    checkpoint = out / "checkpoints" / "checkpoint-8"
    for rank in (0, 1):
        lines = error_lines(errs[rank])
        assert len(lines) == 1 and "Traceback" not in errs[rank] and "terminate called" not in errs[rank], errs[rank][
            -3000:
        ]
        print(f"rank {rank}: {lines[0]}")
        assert lines[0].startswith(f"error: disk full while writing checkpoint-8 ({checkpoint}): needs about ")
        removed = "partial files removed; " if rank == 0 else ""  # the main process writes, and cleans up
        assert lines[0].endswith(
            f"; {removed}the last complete checkpoint is checkpoint-4; free space, then continue with --resume"
        )
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (out / LOCK_NAME).exists()


# --- the launcher ---------------------------------------------------------------------------------


def nan_on(rank: int, step: int) -> None:
    """The loss of optimizer step `step` is NaN on process `rank` alone. Only its value: the gradients stay
    finite, so no other process can see it in the averaged gradients; only the reduced decision tells them."""
    import transformers

    original = transformers.Trainer.train

    def train(self, *args, **kwargs):
        def spoil(module, inputs, output):
            if module.training and self.state.global_step + 1 == step and self.args.process_index == rank:
                output["loss"] = output["loss"] + output["loss"].detach() * float("nan")
            return output

        # After the hook that computes the chunked loss (installed at build), before qlora's LossWatch
        # (on_train_begin).
        handle = self.model.register_forward_hook(spoil)
        try:
            return original(self, *args, **kwargs)
        finally:
            handle.remove()

    transformers.Trainer.train = train


def oserror_on_main() -> None:
    """Removing the old adapter for --overwrite fails on the main process (as a permission error would)."""
    import shutil

    original = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name == "adapter" and os.environ.get("RANK") == "0":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return original(path, *args, **kwargs)

    shutil.rmtree = rmtree


def disk_full_on_main(step: int) -> None:
    """torch.save of checkpoint-`step`'s optimizer states fails on the main process as torch's C++ writer does."""
    import transformers.trainer

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(f"checkpoint-{step}/optimizer.pt") and os.environ.get("RANK") == "0":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return original(obj, f, *args, **kwargs)

    transformers.trainer.torch.save = save


if __name__ == "__main__":
    fault = os.environ["QLORA_TEST_FAULT"]
    if fault.startswith("nan-on-rank-"):
        rank, step = fault.removeprefix("nan-on-rank-").split("-at-step-")
        nan_on(int(rank), int(step))
    elif fault == "oserror-on-main":
        oserror_on_main()
    elif fault.startswith("disk-full-on-main-at-checkpoint-"):
        disk_full_on_main(int(fault.rsplit("-", 1)[1]))
    try:
        code = run_cli(train_main)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    (Path(os.environ["QLORA_TEST_EXITS"]) / f"rank-{os.environ['RANK']}").write_text(str(code))
    sys.exit(code)
