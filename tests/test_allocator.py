"""Every qlora process runs with PyTorch's expandable segments, unless the user configured the allocator."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qlora import allocator_variable

PRINT = (
    "import qlora.train, os; print(os.environ.get('PYTORCH_ALLOC_CONF'), os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))"
)


def run(env_changes: dict[str, str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")}
    return subprocess.run(
        [sys.executable, "-c", PRINT], env={**env, **env_changes}, capture_output=True, text=True, check=True
    ).stdout.split()


def test_a_train_process_turns_on_expandable_segments():
    values = dict(zip(("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"), run({})))
    assert values[allocator_variable()] == "expandable_segments:True"


@pytest.mark.parametrize("name", ["PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"])
def test_a_users_allocator_setting_is_left_alone(name):
    values = dict(zip(("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"), run({name: "max_split_size_mb:128"})))
    assert values[name] == "max_split_size_mb:128"
    assert list(values.values()).count("None") == 1  # nothing added beside it
