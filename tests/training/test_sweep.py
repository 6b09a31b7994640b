"""`qlora sweep`: grid parsing, validation before any run, failures, ranking, and resuming."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import qlora.sweep
import qlora.training.sweep
from qlora.config.errors import ExitCode, QLoraError, run_cli
from qlora.config.io import atomic_write_json
from qlora.config.recipe import load_recipe
from qlora.training.sweep import parse_grid, point_name


def write_recipe(tmp_path: Path, model: str = "org/model", data: str = "data.jsonl", **extra) -> Path:
    recipe = {"model": {"name_or_path": model}, "data": {"path": data}, "output_dir": str(tmp_path / "sweep"), **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def read_rows(base: Path) -> list[dict[str, str]]:
    with open(base / "sweep_results.csv", newline="") as handle:
        return list(csv.DictReader(handle))


FAKE_TRAIN = r"""
# Stands in for `python -m qlora.train` in a point's process: no torch, so a point costs milliseconds.
import json, os, sys
from pathlib import Path

args = sys.argv[1:]
sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
out = Path(json.loads(sets["output_dir"]))
alpha = json.loads(sets.get("lora.alpha", "16"))
with open(os.environ["FAKE_TRAIN_CALLS"], "a") as log:
    log.write(json.dumps([out.name, "--resume" in args, "--overwrite" in args, os.getpid()]) + "\n")
outcome = json.loads(os.environ.get("FAKE_TRAIN_OUTCOMES", "{}")).get(str(alpha))
if outcome == "oom":
    print("error: out of GPU memory during training", file=sys.stderr)
    sys.exit(3)
if outcome == "oom after training":
    out.mkdir(parents=True, exist_ok=True)
    skipped = "out of GPU memory in the evaluation after training"
    (out / "metrics.json").write_text(json.dumps({"eval_loss_before": 3.0, "trainable_params": 100 * alpha,
                                                  "eval_after_skipped": skipped}))
    sys.exit(3)
if outcome == "interrupt":
    sys.exit(130)
if isinstance(outcome, str) and outcome.startswith("exit "):
    sys.exit(int(outcome.split()[1]))
if outcome == "crash":
    raise RuntimeError("something unexpected")
if isinstance(outcome, str):
    print("error: " + outcome, file=sys.stderr)
    sys.exit(2)
metrics = {"trainable_params": 100 * alpha, "eval_loss_before": 3.0, "eval_loss_after": 3.0 - alpha / 100,
           "eval_exact_match_before": 0.0, "eval_exact_match_after": outcome if outcome is not None else 0.0,
           "peak_memory_bytes": 3 * 2**30, "train_runtime_s": 1.5}
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps(metrics))
"""


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """Every point runs FAKE_TRAIN in its own process; returns `set_outcomes(dict)` (per lora.alpha: a
    float exact match, 'oom', 'interrupt', 'crash' or an error message) and `calls()` (name, resume, overwrite,
    pid)."""
    folder = tmp_path / "fake-module"
    folder.mkdir()
    (folder / "fake_qlora_train.py").write_text(FAKE_TRAIN)
    monkeypatch.setattr(qlora.training.sweep, "TRAIN_MODULE", "fake_qlora_train")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_TRAIN_CALLS", str(log))

    class Fake:
        @staticmethod
        def set_outcomes(outcomes: dict[int, object]) -> None:
            monkeypatch.setenv("FAKE_TRAIN_OUTCOMES", json.dumps({str(k): v for k, v in outcomes.items()}))

        @staticmethod
        def calls() -> list[tuple]:
            return [tuple(json.loads(line)) for line in log.read_text().splitlines()] if log.exists() else []

    return Fake


def names_and_flags(calls: list[tuple]) -> list[tuple]:
    return [call[:3] for call in calls]


# --- the grid -------------------------------------------------------------------------------------


def test_grid_values_are_typed_like_set():
    grid = parse_grid(["lora.alpha=8,32", "lora.targets=qv,[q_proj,v_proj]", "training.learning_rate=1e-4,2e-4"])
    assert grid == {
        "lora.alpha": [8, 32],
        "lora.targets": ["qv", ["q_proj", "v_proj"]],
        "training.learning_rate": ["1e-4", "2e-4"],
    }  # YAML 1.1 strings; the recipe reads them as floats


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (["lora.alpa=8,32"], "unknown recipe key 'lora.alpa' in --grid (did you mean 'lora.alpha'?)"),
        (["output_dir=a,b"], "unknown recipe key 'output_dir' in --grid"),
        (["lora.alpha"], "--grid expects key=v1,v2,..., got 'lora.alpha'"),
        (["lora.alpha="], "--grid lora.alpha: no values given"),
        (["lora.targets=[q_proj,qv"], "--grid lora.targets: cannot read the values"),
        (["lora.r=8", "lora.r=16"], "--grid lora.r is given twice"),
    ],
)
def test_grid_mistakes_name_the_key(item, message):
    with pytest.raises(QLoraError, match="^" + re.escape(message)):
        parse_grid(item)


def test_point_names_are_readable_and_filesystem_safe():
    assert point_name({"lora.alpha": 8, "lora.targets": "qv"}) == "lora.alpha=8__lora.targets=qv"
    assert point_name({"lora.targets": ["q_proj", "v_proj"]}) == "lora.targets=q_proj+v_proj"
    assert point_name({"data.path": "/data/my set.jsonl"}) == "data.path=_data_my_set.jsonl"


# --- validation before any run --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grid", "lora.alpha=8,-1"], "error: grid point lora.alpha=-1: lora.alpha: must be > 0, got -1"),
        (["--grid", "lora.alpha=8,8"], "error: --grid: two points share the folder 'lora.alpha=8'"),
        (["--grid", "lora.alpha=8", "--set", "lora.alpha=4"], "error: lora.alpha is both in --set and in --grid"),
    ],
)
def test_every_point_is_checked_before_the_first_run(tmp_path, fake_train, capsys, argv, message):
    assert run_cli(qlora.sweep.main, [str(write_recipe(tmp_path)), *argv]) == 2
    assert capsys.readouterr().err.startswith(message)
    assert fake_train.calls() == [] and not (tmp_path / "sweep").exists()


def test_folder_trained_with_another_recipe_is_refused(tmp_path, fake_train, capsys):
    recipe = write_recipe(tmp_path)
    point = tmp_path / "sweep" / "lora.alpha=8"
    load_recipe(recipe, ["lora.alpha=8", "training.max_steps=5", f"output_dir={point}"]).save(point / "recipe.yaml")
    assert run_cli(qlora.sweep.main, [str(recipe), "--grid", "lora.alpha=8"]) == 2
    assert "was trained with training.max_steps=5, this sweep has training.max_steps=-1" in capsys.readouterr().err


# --- failures and ranking -------------------------------------------------------------------------


def test_failed_points_are_recorded_and_the_sweep_goes_on(tmp_path, fake_train, capsys):
    fake_train.set_outcomes({16: "lora.targets: this model has no linear layer named 'x'", 32: "oom", 128: "crash"})
    assert run_cli(qlora.sweep.main, [str(write_recipe(tmp_path)), "--grid", "lora.alpha=8,16,32,64,128"]) == 1
    rows = read_rows(tmp_path / "sweep")
    assert [(r["lora.alpha"], r["status"]) for r in rows] == [
        ("64", "ok"),
        ("8", "ok"),  # lower eval loss first
        ("16", "failed: lora.targets: this model has no linear layer named 'x'"),
        ("32", "failed: out of GPU memory"),
        ("128", "failed: exit code 1"),
    ]
    assert rows[0]["eval_loss_after"] == "2.36" and rows[0]["trainable_params"] == "6400"
    assert rows[2]["eval_loss_after"] == ""
    assert len(fake_train.calls()) == 5
    assert "RuntimeError: something unexpected" in capsys.readouterr().err  # the point's own output reaches the user


def test_a_point_whose_last_evaluation_ran_out_of_memory_keeps_its_row_on_a_rerun(tmp_path, fake_train):
    fake_train.set_outcomes({16: "oom after training"})
    argv = [str(write_recipe(tmp_path)), "--grid", "lora.alpha=8,16"]
    assert run_cli(qlora.sweep.main, argv) == 1
    row = {r["lora.alpha"]: r for r in read_rows(tmp_path / "sweep")}["16"]
    assert (row["status"], row["eval_loss_before"], row["eval_loss_after"]) == ("failed: out of GPU memory", "3.0", "")
    assert run_cli(qlora.sweep.main, argv) == 1  # the rerun skips the finished point and says why it failed
    row = {r["lora.alpha"]: r for r in read_rows(tmp_path / "sweep")}["16"]
    assert (row["status"], row["eval_loss_before"]) == (
        "failed: out of GPU memory in the evaluation after training",
        "3.0",
    )
    assert len(fake_train.calls()) == 2


def test_every_point_trains_in_its_own_process(tmp_path, fake_train):
    """bitsandbytes never frees paged optimizer buffers: a point must not inherit the previous point's."""
    assert run_cli(qlora.sweep.main, [str(write_recipe(tmp_path)), "--grid", "lora.alpha=8,16,32"]) == 0
    pids = [call[3] for call in fake_train.calls()]
    assert len(pids) == 3 and len(set(pids)) == 3 and os.getpid() not in pids


def test_a_diverging_point_fails_alone_but_sigterm_stops_the_sweep(tmp_path, fake_train):

    fake_train.set_outcomes({16: f"exit {ExitCode.NONFINITE}"})
    assert run_cli(qlora.sweep.main, [str(write_recipe(tmp_path)), "--grid", "lora.alpha=8,16"]) == 1
    assert [(r["lora.alpha"], r["status"]) for r in read_rows(tmp_path / "sweep")] == [
        ("8", "ok"),
        ("16", "failed: non-finite loss"),
    ]
    fake_train.set_outcomes({8: f"exit {ExitCode.PREEMPTED}"})
    with pytest.raises(SystemExit) as info:
        run_cli(
            qlora.sweep.main,
            [str(write_recipe(tmp_path, output_dir=str(tmp_path / "b"))), "--grid", "lora.alpha=8,16"],
        )
    assert info.value.code == ExitCode.PREEMPTED


def test_task_metric_ranks_first_and_gets_columns(tmp_path, fake_train):
    fake_train.set_outcomes({8: 0.9, 64: 0.5})
    recipe = write_recipe(tmp_path, eval={"metric": "exact_match"})
    assert run_cli(qlora.sweep.main, [str(recipe), "--grid", "lora.alpha=64,8"]) == 0
    rows = read_rows(tmp_path / "sweep")
    assert list(rows[0]) == [
        "lora.alpha",
        "trainable_params",
        "eval_loss_before",
        "eval_loss_after",
        "eval_exact_match_before",
        "eval_exact_match_after",
        "peak_memory_bytes",
        "train_runtime_s",
        "status",
    ]
    assert [r["lora.alpha"] for r in rows] == ["8", "64"]  # higher exact match first, despite a higher loss
    markdown = (tmp_path / "sweep" / "sweep_results.md").read_text().splitlines()
    assert markdown[0].startswith("| lora.alpha | trainable_params |") and "peak_memory_GiB" in markdown[0]
    assert markdown[2] == "| 8 | 800 | 3.0000 | 2.9200 | 0.0000 | 0.9000 | 3,221,225,472 | 3.00 | 1.5 | ok |"
    assert (tmp_path / "sweep" / "sweep_results.png").read_bytes()[:4] == b"\x89PNG"  # the points side by side


def test_equal_task_metric_ranks_the_lower_eval_loss_first(tmp_path, fake_train):
    # eight steps of the demo leave every point at 0 % exact match; the loss must still order them
    recipe = write_recipe(tmp_path, eval={"metric": "exact_match"})
    assert run_cli(qlora.sweep.main, [str(recipe), "--grid", "lora.alpha=8,64,32"]) == 0
    assert [r["lora.alpha"] for r in read_rows(tmp_path / "sweep")] == ["64", "32", "8"]


def test_resume_skips_finished_resumes_checkpointed_restarts_junk(tmp_path, fake_train):
    base = tmp_path / "sweep"
    atomic_write_json(base / "lora.alpha=8" / "metrics.json", {"eval_loss_after": 1.0, "trainable_params": 5})
    (base / "lora.alpha=16" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (base / "lora.alpha=16" / "checkpoints" / "checkpoint-2" / "COMPLETE").write_text("ok\n")
    (base / "lora.alpha=32" / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # no marker: half written
    assert run_cli(qlora.sweep.main, [str(write_recipe(tmp_path)), "--grid", "lora.alpha=8,16,32"]) == 0
    assert names_and_flags(fake_train.calls()) == [("lora.alpha=16", True, False), ("lora.alpha=32", False, True)]
    assert {r["lora.alpha"]: r["eval_loss_after"] for r in read_rows(base)}["8"] == "1.0"


def test_interrupted_sweep_resumes_without_retraining(tmp_path, fake_train):
    argv = [str(write_recipe(tmp_path)), "--grid", "lora.alpha=8,16,32"]
    fake_train.set_outcomes({16: "interrupt"})  # Ctrl-C reaches the point's process, which exits 130
    assert run_cli(qlora.sweep.main, argv) == 130
    base = tmp_path / "sweep"
    assert [r["status"] for r in read_rows(base)] == ["ok", "pending", "pending"]
    mtime = (base / "lora.alpha=8" / "metrics.json").stat().st_mtime_ns

    fake_train.set_outcomes({})
    assert run_cli(qlora.sweep.main, argv) == 0
    assert (base / "lora.alpha=8" / "metrics.json").stat().st_mtime_ns == mtime
    assert [call[0] for call in fake_train.calls()] == [
        "lora.alpha=8",
        "lora.alpha=16",
        "lora.alpha=16",
        "lora.alpha=32",
    ]
    assert [r["status"] for r in read_rows(base)] == ["ok", "ok", "ok"]


# --- real training on the tiny model --------------------------------------------------------------


def tiny_recipe(tmp_path: Path, tiny_llama: Path, alpaca_file: Path) -> Path:
    return write_recipe(
        tmp_path,
        model=str(tiny_llama),
        data=str(alpaca_file),
        lora={"r": 8},
        training={"max_steps": 2, "batch_size": 4, "grad_accum": 1, "save_steps": 100},
    )


@pytest.mark.slow
def test_cli_sweep_writes_one_row_per_point(tmp_path, tiny_llama, alpaca_file):
    recipe = tiny_recipe(tmp_path, tiny_llama, alpaca_file)
    out = tmp_path / "D"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora.sweep",
            str(recipe),
            "--grid",
            "lora.alpha=8,64",
            "--grid",
            "lora.targets=qv,all-linear",
            "--set",
            "training.max_steps=8",
            "--set",
            f"output_dir={out}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_rows(out)
    assert len(rows) == 4 and {(r["lora.alpha"], r["lora.targets"]) for r in rows} == {
        ("8", "qv"),
        ("8", "all-linear"),
        ("64", "qv"),
        ("64", "all-linear"),
    }
    assert all(
        json.loads((out / f"lora.alpha={a}__lora.targets={t}" / "metrics.json").read_text())["train_steps"] == 8
        for a, t in [("8", "qv"), ("64", "all-linear")]
    )
    assert "qlora sweep" in result.stdout and (out / "sweep_results.md").exists()
    assert (out / "sweep_results.png").exists() and len(list(out.glob("*/training.png"))) == 4
    losses = [float(r["eval_loss_after"]) for r in rows]
    assert losses == sorted(losses)
    # r=8 on q (64->64) and v (64->32, two KV heads) in both layers; all-linear adds k, o and the MLP.
    params = {(r["lora.alpha"], r["lora.targets"]): int(r["trainable_params"]) for r in rows}
    assert params[("8", "qv")] == params[("64", "qv")] == 2 * 8 * ((64 + 64) + (64 + 32))
    assert params[("8", "all-linear")] > params[("8", "qv")]
