"""`training.gradient_checkpointing: N | auto`: the first N decoder layers checkpointed, the rest keep their
activations; the profiler models any N, and `auto` takes the fewest that fit the GPU planned for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import predicted_and_measured, prediction

from qlora.config.errors import QLoraError, run_cli
from qlora.config.recipe import recipe_from_mapping
from qlora.memory.estimate import estimate, settings_inventory
from qlora.memory.planner import fewest_checkpointed_layers
from qlora.memory.settings import Settings

CONFIG = (
    Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "llama-h256-v128k" / "config.json"
)  # hidden 256, 4 layers, 128k vocabulary


@pytest.mark.parametrize("layers", [0, 2, 4])
def test_any_number_of_checkpointed_layers_is_predicted_within_1_percent_of_measured(layers):
    predicted, measured = predicted_and_measured(
        CONFIG,
        "qlora",
        "data.max_seq_len=256",
        "training.batch_size=1",
        "lora.r=16",
        f"training.gradient_checkpointing={layers}",
    )
    assert abs(predicted.allocated - measured.peak) <= 0.01 * measured.peak
    assert predicted.checkpointed_layers == layers


def test_fewer_checkpointed_layers_hold_more_and_recompute_less():
    peaks = [
        prediction(
            "llama-3.1-8b", "qlora", "data.max_seq_len=2048", "lora.r=16", f"training.gradient_checkpointing={n}"
        )
        for n in (1, 16, 32)
    ]
    assert peaks[0].total > peaks[1].total > peaks[2].total
    assert peaks[0].recompute_saved_pct > peaks[1].recompute_saved_pct > peaks[2].recompute_saved_pct == 0
    assert (
        peaks[2].bytes == prediction("llama-3.1-8b", "qlora", "data.max_seq_len=2048", "lora.r=16").bytes
    )  # N = all = true


def test_auto_takes_the_fewest_layers_that_fit_the_gpu():
    settings = Settings(seq_len=2048, rank=16, checkpoint_layers="auto")  # planned for a GPU
    inv = settings_inventory("llama-3.1-8b", settings)
    with_ten = estimate(inv, "qlora", settings.replace(checkpoint_layers=10)).total
    assert fewest_checkpointed_layers(inv, "qlora", settings, with_ten) == 10  # a GPU of exactly that size
    assert fewest_checkpointed_layers(inv, "qlora", settings, with_ten - 1) == 11
    assert fewest_checkpointed_layers(inv, "qlora", settings, 10**15) == 0
    assert fewest_checkpointed_layers(inv, "qlora", settings, 10**9) == 32  # nothing fits: every layer


def test_training_resolves_auto_against_the_recipes_target_gpu(capsys):
    from qlora.training.auto import resolve_checkpointing

    base = {
        "model": {"name_or_path": "llama-3.1-8b"},
        "data": {"path": "d.jsonl", "max_seq_len": 2048},
        "output_dir": "o",
        "lora": {"r": 16},
        "training": {"gradient_checkpointing": "auto"},
    }
    chosen = resolve_checkpointing(recipe_from_mapping(base, ["target_gpu=24GB", "training.kernels=none"]))
    assert 0 < chosen.training.gradient_checkpointing < 32
    line = capsys.readouterr().err.strip()
    assert line.startswith(
        f"training.gradient_checkpointing: auto: {chosen.training.gradient_checkpointing} of 32 decoder layers"
    )
    assert "recompute saved" in line
    liger = resolve_checkpointing(
        recipe_from_mapping(base, ["target_gpu=24GB"])
    )  # Liger's kernels (the GPU default) save less
    assert liger.training.gradient_checkpointing < chosen.training.gradient_checkpointing
    unknown = resolve_checkpointing(recipe_from_mapping(base))  # no target_gpu, no GPU here: every layer
    assert unknown.training.gradient_checkpointing == 32


def test_the_cli_plans_the_fewest_layers_for_a_24gb_card(capsys):
    from qlora.profile import main

    argv = [
        "--model",
        "llama-3.1-8b",
        "--methods",
        "qlora",
        "--rank",
        "16",
        "--seq-len",
        "2048",
        "--set",
        "training.gradient_checkpointing=auto",
        "--gpu",
        "24GB",
        "--format",
        "json",
    ]
    assert run_cli(main, argv) == 0
    result = json.loads(capsys.readouterr().out)["runs"][0]["results"][0]
    assert result["gradient_checkpointing_layers"] < 32 and result["total_bytes"] <= 24 * 10**9
    assert result["recompute_saved_pct"] > 0


@pytest.mark.parametrize("value", ["-1", "some", "1.5"])
def test_bad_values_name_the_key(value):
    with pytest.raises(QLoraError, match="^training.gradient_checkpointing: "):
        recipe_from_mapping(
            {"model": {"name_or_path": "m"}}, [f"training.gradient_checkpointing={value}"], for_training=False
        )


def test_exact_match_generation_is_part_of_the_eval_phase_with_its_kv_cache():
    """`eval.metric: exact_match` generates at the eval batch with a KV cache: the eval phase holds it."""
    keys = ("data.max_seq_len=2048", "lora.r=16", "training.eval_batch_size=16")
    plain = prediction("llama-3.1-8b", "qlora", *keys)
    generating = prediction("llama-3.1-8b", "qlora", *keys, "eval.metric=exact_match", "eval.max_new_tokens=256")
    kv_cache = (
        32 * 16 * 2048 * 2 * 8 * 128 * 4
    )  # layers x batch x prompt x (keys, values) x kv heads x head dim x fp32 (CPU)
    assert generating.phases["eval"]["allocated_bytes"] > plain.phases["eval"]["allocated_bytes"] + 0.99 * kv_cache
    assert generating.phase == "eval" and "generation" in generating.peak_moment
    assert (
        generating.details["activations"]["eval: KV cache (every layer, the prompt)"] == kv_cache
    )  # the prompt's forward is the peak
