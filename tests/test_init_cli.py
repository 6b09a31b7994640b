"""`qlora init`: a recipe sized by the planner that `qlora profile --recipe` says fits and training loads as is,
or one line saying why nothing fits."""

from __future__ import annotations

import json

import pytest

import qlora.init
import qlora.profile
from qlora.config.errors import run_cli
from qlora.config.recipe import DataSpec, load_recipe
from qlora.data.lengths import token_lengths
from qlora.demo import ASSETS
from qlora.memory.sizing import TARGET_GLOBAL_BATCH, round_up


@pytest.fixture
def long_alpaca(tmp_path):
    """200 Alpaca rows whose prompt + response run from ~150 to ~1,000 characters."""
    path = tmp_path / "data.jsonl"
    rows = [
        {
            "instruction": "Summarise the text.",
            "input": "word " * (20 + 4 * i % 180),
            "output": "summary " * (1 + i % 9),
        }
        for i in range(200)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def header(path) -> str:
    """The recipe's comment header as one line (it is wrapped at 115 characters)."""
    return " ".join(line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#"))


def init(argv, capsys):
    code = run_cli(qlora.init.main, [str(a) for a in argv])
    return code, capsys.readouterr()


def test_llama_8b_on_24gb_fits_as_profile_says_and_loads_for_training(tmp_path, long_alpaca, capsys):
    out = tmp_path / "recipes" / "mine.yaml"
    code, io = init(["--model", "llama-3.1-8b", "--gpu", "24GB", "--data", long_alpaca, "--out", out], capsys)
    assert code == 0, io.err
    recipe = load_recipe(out)  # what `qlora train` reads first (validated, paths resolved)
    assert recipe.model.name_or_path == "meta-llama/Llama-3.1-8B" and recipe.data.path == str(long_alpaca)
    assert recipe.target_gpu == "24GB" and recipe.method == "qlora" and recipe.data.format == "alpaca"
    assert recipe.training.batch_size * recipe.training.grad_accum == TARGET_GLOBAL_BATCH
    assert recipe.training.gradient_checkpointing == "auto" and recipe.data.max_seq_len % 64 == 0
    lengths = token_lengths(DataSpec(path=str(long_alpaca), format="alpaca"))  # characters / 4 of the prompt + answer
    assert recipe.data.max_seq_len == round_up(lengths.percentile(99)) == 384  # from the data, not a default
    text = header(out)
    assert "estimated at ~4 characters per token" in text
    assert run_cli(qlora.profile.main, ["--recipe", str(out), "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)["runs"][0]["results"][0]
    assert result["fit"]["fits"] and result["fit"]["gpu_bytes"] == 24 * 10**9
    assert f"Predicted peak: {result['total_bytes'] / 2**30:.2f} GiB of 22.35 GiB" in text


def test_llama_70b_on_12gb_is_refused_with_the_reason(tmp_path, long_alpaca, capsys):
    out = tmp_path / "r.yaml"
    code, io = init(["--model", "llama-3.1-70b", "--gpu", "12GB", "--data", long_alpaca, "--out", out], capsys)
    assert code == 2 and not out.exists()
    (line,) = io.err.strip().splitlines()
    assert line.startswith("error: nothing fits: llama-3.1-70b qlora needs ") and "of the GPU's 11.18 GiB" in line
    assert "the weights alone: 36.80 GiB" in line


def test_a_local_model_folder_measures_lengths_with_its_own_tokenizer(tmp_path, capsys):
    out = tmp_path / "demo.yaml"
    argv = ["--model", ASSETS / "base-model", "--gpu", "t4", "--data", ASSETS / "instructions.jsonl", "--out", out]
    code, io = init(argv, capsys)
    assert code == 0, io.err
    recipe = load_recipe(out)
    assert recipe.model.name_or_path == str(ASSETS / "base-model") and recipe.data.max_seq_len == 64  # 53-57 tokens
    assert recipe.training.batch_size == 16 and recipe.training.optimizer == "paged_adamw_32bit"
    assert "(the model's tokenizer)" in header(out) and "0.0% are longer" in header(out)


def test_format_is_told_by_the_columns_and_out_is_not_replaced(tmp_path, capsys):
    data = tmp_path / "odd.jsonl"
    data.write_text('{"question": "a", "answer": "b"}\n')
    code, io = init(["--model", "qwen2.5-0.5b", "--gpu", "t4", "--data", data, "--out", tmp_path / "o.yaml"], capsys)
    assert code == 2 and "cannot tell the format from the columns ['answer', 'question']; pass --format" in io.err
    (tmp_path / "o.yaml").write_text("mine")
    code, io = init(["--model", "qwen2.5-0.5b", "--gpu", "t4", "--data", data, "--out", tmp_path / "o.yaml"], capsys)
    assert code == 2 and "--force" in io.err and (tmp_path / "o.yaml").read_text() == "mine"
