"""Every output format: the rich table, Markdown, JSON (schema, integer bytes) and the PNG."""

from __future__ import annotations

import json

import pytest

from qlora.memory import report
from qlora.memory.estimate import COMPONENTS, estimate
from qlora.memory.planner import plan
from qlora.memory.report import Result, Run
from qlora.memory.settings import Settings
from qlora.training.measure import Measurement

SETTINGS = Settings(seq_len=64, batch_size=2, rank=8)


@pytest.fixture
def runs(llama_config):
    """One model, three methods, a fit plan for a 1 GiB GPU, and a measured QLoRA step 1 % above the prediction."""
    model = str(llama_config)
    results = [Result(estimate(model, m, SETTINGS)) for m in ("full", "lora", "qlora")]
    qlora = results[2].estimate
    results[2].measured = Measurement("qlora", "cpu", int(qlora.allocated * 1.01), dict(qlora.bytes))
    fit_plan = plan(model, ("full", "lora", "qlora"), SETTINGS, 2**30)
    return [Run("tiny", model, SETTINGS, results, fit_plan, environment={"device": "CPU (test)", "torch": "x"})]


def test_rows_have_one_line_per_model_and_method(runs):
    rows = report.rows(runs)
    assert [r[:2] for r in rows] == [["tiny", "full"], ["tiny", "lora"], ["tiny", "qlora"]]
    header = report.header(runs)
    assert header[:10] == [
        "Model",
        "Method",
        *[c.capitalize() for c in COMPONENTS],
        "Total (MiB)",
        "Train step / eval step",
    ]
    assert header[10:] == ["Measured (MiB)", "Error", "Fits 1 GiB", "Max seq (batch 2)", "Max batch (seq 64)"]
    qlora = runs[0].results[2].estimate
    assert rows[2][8] == f"{qlora.total / 2**20:.2f}" and rows[2][11] == "-0.99%" and rows[2][12] == "yes"
    train, evaluation = (qlora.phases[p]["total_bytes"] / 2**20 for p in ("train", "eval"))
    assert rows[2][9] == f"{train:.2f}* / {evaluation:.2f}" and train > evaluation  # the peak phase is marked
    assert rows[0][10:12] == ["", ""]  # full and lora were not measured


def test_terminal_table_prints_every_row_and_the_advice(runs):
    from rich.console import Console

    console = Console(record=True, width=200)
    report.print_table(runs, console)
    text = console.export_text()
    assert "Predicted peak training memory (MiB)" in text
    assert text.count("│ tiny ") == 3
    assert text.count(f"{runs[0].plan.model} ") == 3  # one advice line per method
    assert "seq 64 · batch 2 · r 8 (all-linear) · paged_adamw_32bit · checkpointing · auto · bfloat16 on cuda" in text


def test_markdown_has_the_table_measured_components_and_environment(runs):
    text = report.to_markdown(runs)
    lines = text.splitlines()
    table = [line for line in lines if line.startswith("| tiny |")]
    assert len(table) == 3 + 1  # three predicted rows, one measured row
    assert lines[2].startswith("| Model | Method | Weights |") and lines[3].startswith("|---|---|---:|")
    assert "Measured on: device CPU (test), torch x" in text
    assert f"- {runs[0].plan.model} qlora: predicted peak" in text


def test_json_follows_the_schema_with_integer_bytes_that_add_up(runs):
    data = json.loads(json.dumps(report.to_json(runs)))
    run = data["runs"][0]
    assert run["model"] == runs[0].model and run["settings"]["seq_len"] == 64
    assert [r["method"] for r in run["results"]] == ["full", "lora", "qlora"]
    for r in run["results"]:
        assert list(r["bytes"]) == list(COMPONENTS)
        assert all(type(v) is int for v in r["bytes"].values())
        assert sum(r["bytes"].values()) == r["total_bytes"]
        assert r["fit"]["fits"] is True and r["fit"]["max_seq_len"] == 256
    assert "measured_total_bytes" not in run["results"][0]
    assert run["results"][2]["measured_total_bytes"] == runs[0].results[2].measured.peak
    assert run["gpu_bytes"] == 2**30 and run["environment"]["device"] == "CPU (test)"


def test_write_puts_markdown_json_and_a_png_per_model_in_the_folder(runs, tmp_path):
    written = report.write(runs, tmp_path / "out")
    assert sorted(p.name for p in written) == ["memory-tiny.png", "memory.json", "memory.md"]
    png = (tmp_path / "out" / "memory-tiny.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert json.loads((tmp_path / "out" / "memory.json").read_text()) == report.to_json(runs)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in written
    )  # no temporary files left
