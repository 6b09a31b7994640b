"""The demo recipe's keys (default attention, LoRA dropout 0.05, 4-bit NF4, chunked loss) train a tiny random model
of each dense family without a traceback: soft-capped Gemma 2, sliding-window Gemma 3 and Mistral, logit-scaled
Granite, Phi-3, Qwen3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from families import FAMILIES, save_tiny_family
from safetensors import safe_open

from qlora.config.recipe import load_recipe

DEMO = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
ATTENTION = {"gemma2": "eager"}  # sdpa elsewhere; Gemma 2 refuses sdpa and flex attention has no CPU backward


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_demo_recipe_trains_each_family(model_type, tmp_path, capsys):
    from qlora.training.run import train

    model = save_tiny_family(model_type, tmp_path / "model")
    overrides = [
        f"model.name_or_path={model}",
        f"output_dir={tmp_path / 'out'}",
        "training.max_steps=2",
        "training.batch_size=4",
        "data.max_examples=24",
        "data.eval_size=4",
        "eval.max_examples=2",
        "eval.max_new_tokens=2",
    ]
    metrics = train(load_recipe(DEMO, overrides))
    err = capsys.readouterr().err
    chosen = ATTENTION.get(model_type, "sdpa")
    assert f"model.attn_implementation: auto -> {chosen} (" in err
    assert "standard loss" not in err  # every head takes the chunked loss (no vocabulary-sized logits)
    assert math.isfinite(metrics["eval_loss_before"]) and math.isfinite(metrics["eval_loss_after"])
    adapter = tmp_path / "out" / "adapter"
    targets = set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
    with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
        wrapped = {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in weights.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert wrapped == targets and len(targets) >= 4  # every linear layer of attention and MLP
