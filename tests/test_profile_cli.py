"""`qlora profile` as a user runs it: the headline table, JSON, --recipe, --out, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora.config.errors import run_cli
from qlora.config.gpus import GPU_PRESETS
from qlora.profile import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def profile(argv, capsys):
    code = run_cli(main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_no_arguments_print_the_headline_table(capsys):
    code, out, _ = profile([], capsys)
    assert code == 0
    rows = [line for line in out.splitlines() if line.startswith("│ llama-2-")]
    assert [row.split("│")[1:3] for row in rows] == [
        [f" {model:<11} ", f" {method:<6} "]
        for model in ("llama-2-7b", "llama-2-13b", "llama-2-70b")
        for method in ("full", "lora", "qlora")
    ]
    assert "seq 512 · batch 1 · r 64 (all-linear) · paged_adamw_32bit · checkpointing · auto · bfloat16 on cuda" in out


def test_json_for_llama_2_7b(capsys):
    code, out, _ = profile(["--model", "llama-2-7b", "--format", "json"], capsys)
    assert code == 0
    (run,) = json.loads(out)["runs"]
    assert run["model"] == "llama-2-7b" and run["settings"]["rank"] == 64
    totals = {r["method"]: r["total_bytes"] for r in run["results"]}
    assert totals["full"] > totals["lora"] > totals["qlora"]
    qlora = run["results"][2]
    assert qlora["bytes"]["weights"] == 3_865_836_416
    assert sum(qlora["bytes"].values()) == qlora["total_bytes"]


def test_recipe_profiles_its_own_method_and_plans_for_its_target_gpu(capsys):
    recipe = RECIPES / "llama-3.1-8b-alpaca-t4.yaml"
    code, out, _ = profile(["--recipe", str(recipe), "--format", "json"], capsys)
    assert code == 0
    (run,) = json.loads(out)["runs"]
    assert run["model"] == "llama-3.1-8b" and run["recipe"] == str(recipe)
    assert [r["method"] for r in run["results"]] == ["qlora"]
    assert (
        run["settings"]["seq_len"] == 1024
        and run["settings"]["batch_size"] == 2
        and run["settings"]["compute_dtype"] == "float16"
    )
    assert run["gpu_bytes"] == GPU_PRESETS["t4"].bytes and run["results"][0]["fit"]["fits"] is True  # target_gpu: t4


def test_recipe_set_overrides_change_what_is_profiled(capsys):
    recipe = RECIPES / "qwen2.5-32b-alpaca-24gb.yaml"
    code, out, _ = profile(["--recipe", str(recipe), "--set", "data.max_seq_len=4096", "--format", "markdown"], capsys)
    assert code == 0
    assert (
        "seq 4,096" in out and "| no | 2,322 |" in out
    )  # target_gpu "3090": 23.55 GiB, chunked loss, Liger, the H200-measured context
    assert "  - fits with data.max_seq_len=2322 (at batch 1)" in out


def test_a_classification_recipe_is_profiled_as_its_classifier(capsys):
    """Its labels are read from the local data (five noun categories); no vocabulary-sized logits."""
    code, out, _ = profile(["--recipe", str(RECIPES / "demo-classify.yaml"), "--format", "json"], capsys)
    assert code == 0
    (run,) = json.loads(out)["runs"]
    assert run["settings"]["task"] == "classification" and run["settings"]["num_labels"] == 5
    (result,) = run["results"]
    assert result["parameters_by_role"]["lm_head"] == 0 and result["parameters_by_role"]["classifier"] == 5 * 256
    assert result["details"]["adapters"]["classifier head (trained copy)"] == 5 * 256 * 4
    code, out, _ = profile(
        ["--model", "mistral-7b", "--methods", "qlora", "--task", "classification", "--num-labels", "3"], capsys
    )
    assert code == 0 and "classifier (3 labels) · seq 512" in out


def test_out_writes_markdown_json_and_pngs(tmp_path, capsys):
    code, _, err = profile(
        ["--model", "smollm2-135m", "--methods", "lora,qlora", "--gpu", "8GiB", "--out", str(tmp_path)], capsys
    )
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory-smollm2-135m.png", "memory.json", "memory.md"]
    assert f"wrote {tmp_path / 'memory.md'}" in err
    assert "Fits 8 GiB" in (tmp_path / "memory.md").read_text()


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--model", "llama-2-7bb"],
            "error: unknown model 'llama-2-7bb' (did you mean 'llama-2-7b'?): give a catalog name (llama-2-7b, ",
        ),
        (["--model", "./missing/config.json"], "error: model config not found: ./missing/config.json"),
        (["--gpu", "24XB"], "error: --gpu: unknown GPU '24XB'; expected a preset (t4, v100-16gb, 3060, "),
        (["--gpu", "a100-80"], "error: --gpu: unknown GPU 'a100-80' (did you mean 'a100-80gb'?)"),
        (["--methods", "full,qlra"], "error: --methods: unknown value 'qlra' (did you mean 'qlora'?)"),
        (["--methods", ","], "error: --methods: give at least one of full, lora, lora-8bit, qlora"),
        (["--seq-len", "0"], "error: --seq-len: must be > 0, got 0"),
        (
            ["--recipe", "recipes/demo-classify.yaml", "--rank", "8"],
            "error: --rank: a --recipe sets its own method and settings",
        ),
        (
            ["--set", "lora.rr=8"],
            "error: unknown recipe key 'lora.rr' in --set (did you mean 'lora.r'?)",
        ),  # --set changes every run
        (["--model", "llama-2-70b", "--measure"], "error: --measure: llama-2-70b needs about "),
        (["--num-labels", "3"], "error: --num-labels: sizes a classifier's head; add --task classification"),
        (
            ["--task", "classification", "--num-labels", "1"],
            "error: --num-labels: a classifier needs at least 2 labels, got 1",
        ),
    ],
    ids=[
        "unknown-model",
        "missing-config",
        "bad-gpu",
        "gpu-typo",
        "bad-method",
        "no-method",
        "bad-seq-len",
        "recipe-and-flag",
        "set-unknown-key",
        "measure-too-big",
        "labels-without-task",
        "one-label",
    ],
)
def test_user_mistakes_are_one_line_errors_with_exit_2(argv, message, capsys):
    code, out, err = profile(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.slow
def test_python_m_qlora_profile_prints_the_headline_table_within_20_seconds():
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "qlora.profile"], capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("│ llama-2-") == 9
    assert elapsed < 20


@pytest.mark.parametrize(
    "gpu,dtype", [("t4", "float16"), ("v100", "float16"), ("4090", "bfloat16"), ("24GB", "bfloat16")]
)
def test_the_plan_names_the_compute_dtype_of_the_card_it_plans_for(gpu, dtype, capsys):
    """A T4 or V100 trains in fp16 (compute capability below 8.0), newer cards in bf16; the bytes are the same."""
    code, out, _ = profile(["--model", "llama-3.1-8b", "--methods", "qlora", "--gpu", gpu, "--format", "json"], capsys)
    assert code == 0
    run = json.loads(out)["runs"][0]
    assert run["compute_dtype"] == dtype
    code, table, _ = profile(["--model", "llama-3.1-8b", "--methods", "qlora", "--gpu", gpu], capsys)
    assert f"{dtype} on cuda" in table
    code, plain, _ = profile(["--model", "llama-3.1-8b", "--methods", "qlora", "--format", "json"], capsys)
    assert json.loads(plain)["runs"][0]["results"][0]["bytes"] == run["results"][0]["bytes"]
