"""The profiler's terms for the tiled MLP and offloaded checkpoints, checked against measured CPU steps,
and the planner's long-context search and advice."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY_LLAMA, predicted_and_measured

from qlora.config.errors import QLoraError, run_cli
from qlora.config.recipe import recipe_from_mapping
from qlora.memory.activations import OFFLOADED
from qlora.memory.estimate import estimate
from qlora.memory.planner import plan, predict
from qlora.memory.settings import Settings, from_recipe


def write_config(folder, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder / "config.json"


# An MLP wide enough (and a vocabulary small enough) that a layer's backward, not the loss, is the peak.
WIDE_MLP = {**TINY_LLAMA, "intermediate_size": 1024, "vocab_size": 128, "max_position_embeddings": 1024}
NARROW_MLP = {**WIDE_MLP, "intermediate_size": 64}  # tiled finely, the norm's or attention's backward takes over
WIDE_HEADS = {**NARROW_MLP, "head_dim": 40, "num_key_value_heads": 1}  # attention wider than hidden
LONG = Settings(seq_len=128, batch_size=1, rank=4, device="cpu")
LONG_KEYS = ("data.max_seq_len=128", "training.batch_size=1", "lora.r=4")  # LONG as a recipe (what --measure builds)


@pytest.mark.parametrize(
    "config,method,changes,busiest",
    [
        (WIDE_MLP, "qlora", ("training.mlp_tiles=4",), "one MLP tile"),
        (WIDE_MLP, "lora", ("training.mlp_tiles=3", "data.max_seq_len=100", "lora.dropout=0"), "one MLP tile"),
        (WIDE_MLP, "lora-8bit", ("training.mlp_tiles=4", "lora.dropout=0"), "one MLP tile"),
        (NARROW_MLP, "qlora", ("training.mlp_tiles=16",), "post-attention norm"),
        (WIDE_HEADS, "qlora", ("training.mlp_tiles=16", "lora.dropout=0"), "attention"),
        (WIDE_HEADS, "lora", ("training.mlp_tiles=16", "lora.targets=qv"), "attention"),
    ],
    ids=[
        "qlora-mlp-tile",
        "lora-uneven-tiles-no-dropout",
        "int8-mlp-tile",
        "qlora-norm",
        "qlora-o-proj",
        "lora-qv-attention-kernel",
    ],
)
def test_a_tiled_step_is_predicted_to_a_few_bytes(tmp_path, config, method, changes, busiest):
    predicted, measured = predicted_and_measured(write_config(tmp_path, config), method, *LONG_KEYS, *changes)
    assert busiest in predicted.peak_moment and "MLP" in predicted.peak_moment
    for component in ("weights", "adapters", "gradients", "optimizer"):
        assert measured.bytes[component] == predicted.bytes[component]
    assert abs(predicted.allocated - measured.peak) < 64
    if (
        busiest == "one MLP tile" and method != "lora-8bit"
    ):  # the eval step's no-grad forward runs the MLP tile by tile too
        assert predicted.phases["eval"]["allocated_bytes"] == measured.phases["eval"]


def test_tiling_removes_the_mlp_intermediates_from_a_layer(tmp_path):
    path = str(write_config(tmp_path, WIDE_MLP))
    untiled, tiled = (
        estimate(path, "qlora", LONG.replace(mlp_tiles=1)),
        estimate(path, "qlora", LONG.replace(mlp_tiles=4)),
    )
    assert tiled.peak_moment == "backward through one layer (one MLP tile)"
    assert untiled.peak_moment == "backward through one layer"
    assert tiled.bytes["activations"] < 0.45 * untiled.bytes["activations"]


def test_auto_tiles_a_long_sequence_only(tmp_path):
    path = str(write_config(tmp_path, {**WIDE_MLP, "max_position_embeddings": 8192}))  # auto tiles beyond 4,096 tokens
    short, long_ = LONG.replace(seq_len=4096), LONG.replace(seq_len=8192)
    assert estimate(path, "qlora", short).details == estimate(path, "qlora", short.replace(mlp_tiles=1)).details
    assert estimate(path, "qlora", long_).details == estimate(path, "qlora", long_.replace(mlp_tiles=2)).details


def test_offload_moves_the_kept_layer_inputs_to_host_ram():
    settings = Settings(seq_len=16384, rank=16, lora_dropout=0.0)
    kept, offloaded = (
        estimate("llama-3.1-8b", "qlora", settings),
        estimate("llama-3.1-8b", "qlora", settings.replace(offload_checkpoints=True)),
    )
    layer_input = 16384 * 4096 * 2  # tokens x hidden, bf16
    assert kept.details["activations"]["layer inputs kept by checkpointing"] == 32 * layer_input
    assert "layer inputs kept by checkpointing" not in offloaded.details["activations"]
    # at a layer's backward the GPU holds one layer's input, back from host RAM for its recompute
    assert kept.allocated - offloaded.allocated == (31 if "layer" in offloaded.peak_moment else 32) * layer_input
    assert offloaded.host_bytes[OFFLOADED] == 32 * layer_input
    assert sum(offloaded.host_bytes.values()) == 32 * 2**27  # pinned blocks of a power of two: 128 MiB each
    data = offloaded.to_dict()
    assert data["host_ram_bytes"] == 32 * 2**27 and data["host_bytes"][OFFLOADED] == 32 * layer_input
    assert kept.to_dict()["host_ram_bytes"] == 0


def test_offload_on_a_cpu_changes_nothing(llama_config):
    on_cpu = Settings(seq_len=32, rank=4, device="cpu")
    assert (
        estimate(str(llama_config), "qlora", on_cpu.replace(offload_checkpoints=True)).details
        == estimate(str(llama_config), "qlora", on_cpu).details
    )
    assert estimate(str(llama_config), "qlora", on_cpu.replace(offload_checkpoints=True)).host_bytes == {}


def test_settings_read_the_recipe_keys_and_refuse_bad_values():
    recipe = recipe_from_mapping(
        {
            "model": {"name_or_path": "org/m"},
            "data": {"path": "d.jsonl"},
            "output_dir": "o",
            "training": {"mlp_tiles": 6, "offload_checkpoints": "auto"},
        }
    )
    _, _, settings = from_recipe(recipe)
    assert (settings.mlp_tiles, settings.offload_checkpoints) == (6, "auto")
    with pytest.raises(QLoraError, match="^training.mlp_tiles: "):  # the recipe checks the values, once
        recipe_from_mapping({"model": {"name_or_path": "org/m"}, "training": {"mlp_tiles": 0}}, for_training=False)
    with pytest.raises(QLoraError, match="^training.offload_checkpoints: "):
        recipe_from_mapping(
            {"model": {"name_or_path": "org/m"}, "training": {"offload_checkpoints": "maybe"}}, for_training=False
        )


def test_auto_offload_is_resolved_against_the_gpu():
    settings = Settings(seq_len=32768, rank=32, lora_dropout=0.0, offload_checkpoints="auto")
    roomy, tight = (
        predict("llama-3.1-8b", "qlora", settings, 200 * 2**30),
        predict("llama-3.1-8b", "qlora", settings, 18 * 2**30),
    )
    assert roomy.host_bytes == {} and tight.host_bytes


def test_the_planner_names_the_long_context_keys():
    """r 32 all-linear batch 1 with the recipes' defaults: the advice spells each key to change and how far it goes."""
    settings = Settings(rank=32, seq_len=4096, mlp_tiles=1)
    advice = plan("llama-3.1-8b", ("qlora",), settings, 24 * 10**9, "recipe").advice()
    longer = next(line for line in advice if "longest sequence" in line and "with" in line and line.startswith("  - "))
    assert (
        "training.offload_checkpoints=true" in longer
        and "lora.dropout=0" in longer
        and "training.mlp_tiles=" in longer
    )
    assert "host RAM" in longer
    longest = int(longer.split("longest sequence ")[1].split(" ")[0].replace(",", ""))
    assert longest > plan("llama-3.1-8b", ("qlora",), settings, 24 * 10**9, "recipe").methods[0].max_seq_len
    tiles = int(longer.split("training.mlp_tiles=")[1].split(" ")[0].rstrip(","))
    assert tiles == -(-longest // 4096)  # what auto would use there


def test_a_run_that_does_not_fit_is_told_the_long_context_keys():
    settings = Settings(
        rank=32, seq_len=30000, lora_dropout=0.05
    )  # with the chunked loss the layers, not the loss, stop it
    advice = plan("mistral-7b", ("qlora",), settings, 16 * 10**9, "recipe").advice()
    assert "does not fit" in advice[0]
    assert any(line.startswith("  - fits with training.offload_checkpoints=true, lora.dropout=0: ") for line in advice)


def test_profile_recipe_measure_works_for_a_folder_with_only_a_config(tmp_path, capsys):
    folder = tmp_path / "model"
    write_config(folder, {**TINY_LLAMA, "vocab_size": 128})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": str(folder)},
                "data": {"path": "d.jsonl", "max_seq_len": 96},
                "output_dir": str(tmp_path / "o"),
                "lora": {"r": 4},
                "training": {"mlp_tiles": 3},
            }
        )
    )
    from qlora.profile import main

    assert run_cli(main, ["--recipe", str(recipe), "--measure", "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)["runs"][0]["results"][0]
    assert "one MLP tile" in result["peak_moment"] or "MLP tiled" in result["peak_moment"]
    assert abs(result["allocated_bytes"] - result["measured_total_bytes"]) < 64
