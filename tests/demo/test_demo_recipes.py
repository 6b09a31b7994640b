"""The two demo recipes point at the committed assets, and their data fits their max_seq_len."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from qlora.config.recipe import load_recipe
from qlora.demo import ASSETS as PACKAGE_ASSETS

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ASSETS = PACKAGE_ASSETS


@pytest.mark.parametrize("name", ["demo.yaml", "demo-classify.yaml"])
def test_demo_recipe_uses_the_committed_assets_without_truncation(name):
    from transformers import AutoTokenizer

    from qlora.data.prepare import load_source, tokenize_row

    recipe = load_recipe(RECIPES / name)
    assert recipe.model.name_or_path == str(ASSETS / "base-model")  # resolved against the recipe's folder
    assert recipe.output_dir == f"runs/{Path(name).stem}" and recipe.quantization.bits == 4
    tok = AutoTokenizer.from_pretrained(recipe.model.name_or_path)
    for path in filter(None, (recipe.data.path, recipe.data.eval_path)):
        assert Path(path).parent == ASSETS
        raw = load_source(replace(recipe.data, path=path))
        labels = (
            {label: i for i, label in enumerate(sorted(set(raw["label"])))}
            if recipe.task == "classification"
            else None
        )
        cut = [tokenize_row(row, recipe.data, tok, labels)[1] for row in raw]
        assert not any(cut), f"{path}: {sum(cut)} rows longer than data.max_seq_len"


def test_demo_recipe_measures_exact_match_on_held_out_prompts():
    recipe = load_recipe(RECIPES / "demo.yaml")
    assert recipe.eval.metric == "exact_match" and recipe.lora.targets == "all-linear"
    assert recipe.eval.max_examples <= recipe.data.eval_size and recipe.eval.max_new_tokens <= 8


def test_dpo_demo_pairs_fit_and_it_continues_the_sft_demo():
    from transformers import AutoTokenizer

    from qlora.data.preference import prepare_preference_data

    recipe = load_recipe(RECIPES / "demo-dpo.yaml")
    assert recipe.training.objective == "dpo" and recipe.data.format == "preference"
    assert recipe.model.adapter == "runs/demo" and recipe.model.adapter_optional  # the SFT demo's output_dir
    assert Path(recipe.data.path).parent == Path(recipe.data.eval_path).parent == ASSETS
    data = prepare_preference_data(recipe, AutoTokenizer.from_pretrained(recipe.model.name_or_path))
    assert data.stats["train_examples"] == 668 and data.stats["eval_examples"] == 64
    assert not any(v for k, v in data.stats.items() if k.endswith(("truncated", "identical", "empty", "long_prompt")))
    assert recipe.eval.max_examples == load_recipe(RECIPES / "demo.yaml").eval.max_examples  # the same 40 words
