"""Measured CUDA context and allocator slack replace the profiler's named assumptions when present."""

import json
import os
import subprocess
import sys
from pathlib import Path

from qlora.memory.overheads import measured_overheads, named_assumptions

ROOT = Path(__file__).resolve().parents[2]


def write(root: Path, gpu: str, context: int, slack: float) -> None:
    (root / f"cuda-{gpu}").mkdir(parents=True)
    (root / f"cuda-{gpu}" / "overheads.json").write_text(
        json.dumps({"cuda_context_bytes": context, "allocator_slack": slack})
    )


def test_defaults_without_measurements_and_the_largest_measured_values_with_them(tmp_path):
    assert named_assumptions(512 * 2**20, 0.05, tmp_path) == (512 * 2**20, 0.05)
    write(tmp_path, "nvidia-h200", 600 * 2**20, 0.02)
    write(tmp_path, "tesla-t4", 400 * 2**20, 0.031)
    (tmp_path / "cuda-broken").mkdir()
    (tmp_path / "cuda-broken" / "overheads.json").write_text("{not json")
    (tmp_path / "cpu-small-llama").mkdir()  # CPU measurements never count
    assert len(measured_overheads(tmp_path)) == 2
    assert named_assumptions(512 * 2**20, 0.05, tmp_path) == (
        600 * 2**20,
        0.031,
    )  # a plan must hold on every measured GPU


def test_the_profiler_uses_them(tmp_path):
    write(tmp_path, "nvidia-h200", 700 * 2**20, 0.03)
    code = (
        "import json; from qlora.memory.estimate import estimate; from qlora.memory.settings import Settings; "
        "print(json.dumps(estimate('smollm2-135m', 'qlora', Settings()).details['overhead']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "QLORA_MEASURED_DIR": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    overhead = json.loads(done.stdout)
    assert overhead["CUDA context"] == 700 * 2**20 and "allocator slack (3%)" in overhead


def test_the_measured_h200_context_is_package_data():
    """What the profiler reads by default ships in the wheel (qlora/memory/measured/), not in memory_reports/."""
    from qlora.memory import overheads

    (h200,) = [f for f in measured_overheads() if "cuda-nvidia-h200" in f["source"]]
    assert h200["cuda_context_bytes"] == 800_653_312 and "allocator_slack" not in h200
    assert "qlora/memory/measured" in h200["source"].replace(os.sep, "/")
    assert overheads.CUDA_CONTEXT_BYTES == 800_653_312 or os.environ.get("QLORA_MEASURED_DIR")
