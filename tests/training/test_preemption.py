"""Real training processes of the demo recipe: SIGTERM mid-run ends with a checkpoint and exit 4, a damaged
newest checkpoint is skipped with one warning, and both resumes land on the uninterrupted run's adapter."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_nonfinite import short_recipe

from qlora.config.errors import ExitCode
from qlora.training.checkpoints import damage
from qlora.training.lock import LOCK_NAME

DEMO = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
MAX_STEPS = 12
SHORT = [
    f"training.max_steps={MAX_STEPS}",
    "training.batch_size=4",
    "training.save_steps=4",
    "training.logging_steps=4",
    "data.eval_size=8",
    "eval.metric=none",
]


def command(out: Path, *extra: str) -> list[str]:
    sets = [arg for item in [*SHORT, f"output_dir={out}"] for arg in ("--set", item)]
    return [sys.executable, "-m", "qlora.train", str(DEMO), *sets, *extra]


def environment() -> dict:
    repo = str(Path(__file__).resolve().parents[2])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(out, *extra), capture_output=True, text=True, timeout=300, env=environment())


def assert_same_adapter(got_dir: Path, expected_dir: Path) -> None:
    got = load_file(got_dir / "adapter" / "adapter_model.safetensors")
    expected = load_file(expected_dir / "adapter" / "adapter_model.safetensors")
    assert got.keys() == expected.keys()
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    print(f"max |diff| vs the uninterrupted run: {worst:.3g}")
    assert worst <= 1e-5, worst


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "uninterrupted"
    result = run(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
def test_sigterm_mid_run_saves_the_step_reached_exits_4_and_resumes_to_the_same_adapter(uninterrupted, tmp_path):
    out = tmp_path / "preempted"
    log = (tmp_path / "log.txt").open("w")
    process = subprocess.Popen(command(out), stdout=log, stderr=subprocess.STDOUT, env=environment())
    deadline = time.monotonic() + 240
    while not (out / "checkpoints" / "checkpoint-4" / "COMPLETE").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGTERM)  # what Slurm / Kubernetes / a spot instance sends first
    process.wait(timeout=120)
    log.close()
    output = (tmp_path / "log.txt").read_text()
    assert process.returncode == ExitCode.PREEMPTED, output[-3000:]
    line = next(l for l in output.splitlines() if "stopped by SIGTERM at step" in l)
    step = int(line.split("stopped by SIGTERM at step ")[1].split(":")[0])
    assert 4 < step < MAX_STEPS, line  # mid-run, after the periodic checkpoint-4
    print(f"SIGTERM stopped the run at step {step} of {MAX_STEPS}")
    assert line.endswith(f"stopped by SIGTERM at step {step}: checkpoint-{step} is complete; continue with --resume")
    assert damage(out / "checkpoints" / f"checkpoint-{step}") is None
    assert (out / "checkpoints" / f"checkpoint-{step}" / "COMPLETE").exists()
    assert not (out / "adapter").exists() and not (out / LOCK_NAME).exists()
    assert "Traceback" not in output

    resumed = run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_adapter(out, uninterrupted)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):  # inside the tensor data, past the header
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("spoil", [truncate, flip_bytes], ids=["truncated", "flipped"])
def test_damaged_newest_checkpoint_falls_back_with_one_warning(uninterrupted, tmp_path, spoil):
    out = tmp_path / "damaged"
    shutil.copytree(uninterrupted, out)
    (out / "metrics.json").unlink()  # as if killed after its last checkpoint, before the adapter was written
    shutil.rmtree(out / "adapter")
    spoil(out / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "adapter_model.safetensors")

    resumed = run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    warnings = [l for l in resumed.stderr.splitlines() if "warning: --resume:" in l]
    assert len(warnings) == 1, resumed.stderr[-3000:]
    assert f"checkpoint-{MAX_STEPS} is damaged (adapter_model.safetensors: " in warnings[0]
    assert warnings[0].endswith(f"resuming from checkpoint-{MAX_STEPS - 4}")
    assert_same_adapter(out, uninterrupted)

    if spoil is flip_bytes:  # now spoil every checkpoint: the resume refuses with one line
        for checkpoint in (out / "checkpoints").glob("checkpoint-*"):
            spoil(checkpoint / "adapter_model.safetensors")
        refused = run(out, "--resume")
        assert refused.returncode == ExitCode.USAGE
        lines = refused.stderr.strip().splitlines()
        assert [l for l in lines if l.startswith("error:")] == lines[-1:], refused.stderr[-3000:]  # one line, the last
        assert lines[-1].startswith("error: --resume: no intact checkpoint under ")
        assert "Traceback" not in refused.stderr
        assert "checksum differs from the one recorded (corrupted)" in refused.stderr


def test_sigterm_in_process_saves_the_step_reached_and_exits_4(tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys):
    """The fast twin of the test above, in-process: SIGTERM during step 3 -> checkpoint-3, exit 4, lock released."""
    import os
    import signal

    import transformers

    from qlora.training.run import train

    original = transformers.Trainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.model.training and self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the step still finishes
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "compute_loss", compute_loss)
    out = tmp_path / "term"
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        train(short_recipe(tiny_llama, alpaca_file, out))
    assert info.value.code == ExitCode.PREEMPTED
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert damage(out / "checkpoints" / "checkpoint-3") is None
    assert not (out / LOCK_NAME).exists() and not (out / "adapter").exists()
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the run's only
    assert "stopped by SIGTERM at step 3: checkpoint-3 is complete; continue with --resume" in capsys.readouterr().err


def test_sigterm_before_training_stops_at_once_with_143(tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys):
    import os
    import signal

    import qlora.training.run

    def terminated_during_baseline(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(qlora.training.run, "baseline", terminated_during_baseline)
    out = tmp_path / "early"
    with pytest.raises(SystemExit) as info:
        qlora.training.run.train(short_recipe(tiny_llama, alpaca_file, out))
    assert info.value.code == ExitCode.TERMINATED
    assert not (out / LOCK_NAME).exists()
    assert "stopped by SIGTERM: no checkpoint was written yet; nothing to resume" in capsys.readouterr().err
