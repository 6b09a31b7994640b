"""`make bench`'s wiring, on a tiny config (the real run is not part of the suite)."""

from __future__ import annotations

import json

import pytest
from conftest import load_benchmark


@pytest.mark.slow
def test_dry_run_trains_both_sides_and_writes_the_report(tmp_path):
    bench = load_benchmark("bench_memory")
    assert bench.main(["--dry-run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    plain, qlora = result["sides"]["plain"], result["sides"]["qlora"]
    assert len(plain["step_times_s"]) == len(qlora["step_times_s"]) == 2  # one timer entry per optimizer step
    assert result["ratios"]["peak"] == round(qlora["peak_bytes"] / plain["peak_bytes"], 4)
    assert qlora["peak_bytes"] < plain["peak_bytes"]  # even at a 512-token vocabulary the logits are not held
    assert qlora["train_loss"] == pytest.approx(plain["train_loss"], abs=0.05)  # the same model, data and loss value
    assert result["environment"]["torch"] and result["settings"]["vocab_size"] == 512
    markdown = (tmp_path / "bench.md").read_text()
    assert "| **qlora / plain** |" in markdown and "prepare_model_for_kbit_training" in markdown
