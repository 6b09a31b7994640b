"""The speed benchmark's wiring on a CPU (`--dry-run`: tiny config, every side in its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dry_run_times_every_side_in_its_own_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "speed.json").read_text())
    rows = {(r["side"], r["seq_len"]): r for r in result["rows"]}
    assert sorted(rows) == sorted(
        (side, seq) for side in ("plain", "lean", "fit-24GB", "lean-torch") for seq in (32, 64)
    )
    for row in rows.values():
        assert row["step_time_s"] > 0 and row["tokens_per_s"] > 0 and len(row["step_times_s"]) >= 3 and row["top_ops"]
        assert row["flops_per_token"] > 0
    assert rows[("lean", 64)]["gradient_checkpointing_layers"] == 2  # every layer of the tiny model
    assert rows[("fit-24GB", 64)]["gradient_checkpointing_layers"] == 0  # a tiny model fits 24 GB without any
    assert set(result["ratios"]["64"]) == {"lean_step_time", "fit-24GB_step_time", "lean-torch_step_time"}
    assert "| fit-24GB | 64 |" in (tmp_path / "speed.md").read_text()
