"""Every user mistake through `python -m qlora.train`: one `error:` line naming the problem, exit 2.

The eight cases issue 6 lists run as real subprocesses (what a user sees, tracebacks included);
the rest of the catalogue runs in-process through the same `run_cli` wrapper, which is cheaper.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qlora.config.errors import ExitCode, run_cli


@pytest.fixture(scope="module")
def workdir(tiny_llama, alpaca_file, tmp_path_factory) -> Path:
    """A folder with a valid recipe (relative paths), a malformed one and a few bad datasets."""
    root = tmp_path_factory.mktemp("errors")
    (root / "model").symlink_to(tiny_llama, target_is_directory=True)
    (root / "data.jsonl").write_text(alpaca_file.read_text())
    (root / "recipe.yaml").write_text("model:\n  name_or_path: model\ndata:\n  path: data.jsonl\noutput_dir: out\n")
    (root / "malformed.yaml").write_text("model: [\n  name_or_path: model\n")
    (root / "empty.jsonl").write_text("")
    (root / "columns.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    return root


def run_train(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qlora.train", *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )


MUST_SHOW = [
    (["missing.yaml"], "error: recipe file not found: missing.yaml"),
    (["malformed.yaml"], "error: malformed YAML in malformed.yaml at line"),
    (["recipe.yaml", "--set", "lora.rnk=8"], "error: unknown recipe key 'lora.rnk' in --set (did you mean 'lora.r'?)"),
    (["recipe.yaml", "--set", "lora.r=abc"], "error: lora.r: expected an integer, got str 'abc'"),
    (["recipe.yaml", "--set", "lora.r=0"], "error: lora.r: must be > 0, got 0"),
    (
        ["recipe.yaml", "--set", "model.name_or_path=./no-such-model"],
        "error: model.name_or_path: folder not found: ./no-such-model",
    ),
    (
        ["recipe.yaml", "--set", "training.optimizer=sgdx"],
        "error: training.optimizer: unknown value 'sgdx' (valid: adamw_8bit, adamw_torch, paged_adamw_32bit, "
        "paged_adamw_8bit)",
    ),
    (["recipe.yaml", "--set", "data.path=missing.jsonl"], "error: data.path: file not found: missing.jsonl"),
]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", MUST_SHOW, ids=[" ".join(a) for a, _ in MUST_SHOW])
def test_bad_input_is_one_line_and_exit_2(workdir, args, message):
    result = run_train(workdir, *args)
    assert result.returncode == ExitCode.USAGE
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr  # one line
    assert result.stderr.startswith(message), result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (workdir / "out").exists()  # nothing was written for a run that never started


def cli_error(workdir: Path, monkeypatch, capsys, *args: str) -> str:
    """Run `qlora train` in-process from `workdir`; return its single stderr line."""
    from qlora.train import main

    monkeypatch.chdir(workdir)
    assert run_cli(main, list(args)) == ExitCode.USAGE
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: ")
    return lines[-1]


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.dropout=1", "lora.dropout: must be in [0, 1), got 1.0"),
        ("lora.dropout=-0.1", "lora.dropout: must be in [0, 1), got -0.1"),
        ("data.max_seq_len=0", "data.max_seq_len: must be > 0, got 0"),
        ("lora.targets=qkv", "lora.targets: unknown value 'qkv'"),
        ("training.lr_scheduler=cosinus", "training.lr_scheduler: unknown value 'cosinus'"),
        ("quantization.bits=3", "quantization.bits"),
        ("model.name_or_path=", "model.name_or_path: required"),
    ],
)
def test_recipe_values_out_of_range(workdir, monkeypatch, capsys, override, message):
    assert cli_error(workdir, monkeypatch, capsys, "recipe.yaml", "--set", override).startswith(f"error: {message}")


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.path=empty.jsonl", "holds no examples (empty)"),
        (
            "data.path=columns.jsonl",
            "data.path: no column 'instruction' for the alpaca format's 'instruction' (columns: question, answer)",
        ),
        ("output_dir=/proc/qlora-out", "output_dir: cannot create /proc/qlora-out"),
    ],
)
def test_data_and_output_problems(workdir, monkeypatch, capsys, override, message):
    assert message in cli_error(workdir, monkeypatch, capsys, "recipe.yaml", "--set", override)


def test_model_folder_without_config(workdir, monkeypatch, capsys, tmp_path):
    line = cli_error(workdir, monkeypatch, capsys, "recipe.yaml", "--set", f"model.name_or_path={tmp_path}")
    assert line == f"error: model.name_or_path: {tmp_path} has no config.json (not a transformers model folder)"


def test_unreachable_hub_model_fails_fast_without_retries(workdir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    line = cli_error(workdir, monkeypatch, capsys, "recipe.yaml", "--set", "model.name_or_path=nobody/no-model")
    assert line.startswith("error: model.name_or_path: 'nobody/no-model' is not a local folder nor in the Hub cache")


def test_bad_data_leaves_previous_results_alone_even_with_overwrite(workdir, monkeypatch, capsys):
    results = workdir / "kept"
    (results / "adapter").mkdir(parents=True)
    (results / "metrics.json").write_text("{}")
    cli_error(
        workdir,
        monkeypatch,
        capsys,
        "recipe.yaml",
        "--overwrite",
        "--set",
        "output_dir=kept",
        "--set",
        "data.path=empty.jsonl",
    )
    assert (results / "metrics.json").read_text() == "{}" and (results / "adapter").is_dir()


def test_a_metric_the_task_cannot_measure_stops_before_any_model_loads(workdir, monkeypatch, capsys):
    import qlora.training.run

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    for name in ("build_model", "load_tokenizer", "check_model_source"):
        monkeypatch.setattr(qlora.training.run, name, no_model)
    line = cli_error(workdir, monkeypatch, capsys, "recipe.yaml", "--set", "eval.metric=accuracy")
    assert line == "error: eval.metric: 'accuracy' does not apply to task 'causal_lm' (use none, exact_match)"
