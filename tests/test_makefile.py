"""The install targets: with a GPU (`nvidia-smi` answers) they bring Liger Kernel's fused CUDA kernels; without, the
CPU torch.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def planned_installs(tmp_path: Path, gpu: bool) -> str:
    """The pip commands `make install test` would run (make -n runs none of them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if gpu:
        fake = bin_dir / "nvidia-smi"
        fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA Fake (UUID: GPU-0)'\n")
        fake.chmod(0o755)
    path = os.pathsep.join(
        [str(bin_dir), *(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "nvidia-smi").exists())]
    )
    done = subprocess.run(
        ["make", "-n", "install", "test", f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
        check=True,
    )
    return "\n".join(line for line in done.stdout.splitlines() if "pip install" in line)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_gpu_machine_installs_liger_kernel_and_keeps_its_cuda_torch(tmp_path):
    installs = planned_installs(tmp_path, gpu=True)
    assert "-e .'[kernels]'" in installs and "'.[dev,kernels]'" in installs
    assert "torch==2.13.0" not in installs  # the machine's CUDA build stays


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_a_cpu_machine_installs_the_cpu_torch_and_no_kernels(tmp_path):
    installs = planned_installs(tmp_path, gpu=False)
    assert "kernels" not in installs and "torch==2.13.0" in installs
