"""Every qlora command runs with PyTorch's expandable segments unless the user configured the allocator, and
importing the package sets nothing (a notebook or program that imports qlora keeps its own environment)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from qlora.config.environment import allocator_variable

NAMES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
SHOW = f"import os; print(*(os.environ.get(name) for name in {NAMES!r}))"
# A training process as `qlora train` starts it: its main() runs (and stops at the missing recipe), then the
# environment is what the rest of the process would see.
TRAIN = "from qlora.config.errors import run_cli; import qlora.train; run_cli(qlora.train.main, ['missing.yaml']); "


def run(code: str, env_changes: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in NAMES}
    done = subprocess.run(
        [sys.executable, "-c", code + SHOW], env={**env, **env_changes}, capture_output=True, text=True, check=True
    )
    return dict(zip(NAMES, done.stdout.split()))


def test_importing_qlora_sets_no_allocator_variable():
    imported = "import qlora, qlora.cli, qlora.config.recipe, qlora.train, qlora.profile; "
    assert run(imported, {}) == {"PYTORCH_ALLOC_CONF": "None", "PYTORCH_CUDA_ALLOC_CONF": "None"}


def test_a_train_process_turns_on_expandable_segments():
    assert run(TRAIN, {})[allocator_variable()] == "expandable_segments:True"


@pytest.mark.parametrize("name", NAMES)
def test_a_users_allocator_setting_is_left_alone(name):
    values = run(TRAIN, {name: "max_split_size_mb:128"})
    assert values[name] == "max_split_size_mb:128"
    assert list(values.values()).count("None") == 1  # nothing added beside it
