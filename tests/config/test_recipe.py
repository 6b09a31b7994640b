"""Recipe schema: YAML + --set overrides, types, ranges and did-you-mean errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from qlora.config.errors import QLoraError
from qlora.config.recipe import Recipe, all_keys, load_recipe, parse_gpu_memory, recipe_from_mapping

MINIMAL = {"model": {"name_or_path": "org/model"}, "data": {"path": "data.jsonl"}, "output_dir": "out"}


def write(tmp_path: Path, data, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_are_the_qlora_paper_settings():
    recipe = recipe_from_mapping(MINIMAL)
    assert recipe.quantization.bits == 4 and recipe.quantization.quant_type == "nf4"
    assert recipe.quantization.double_quant is True
    assert recipe.lora.targets == "all-linear"
    assert recipe.training.optimizer == "paged_adamw_32bit"
    assert recipe.training.max_grad_norm == 0.3
    assert recipe.training.gradient_checkpointing is True
    assert recipe.method == "qlora"


@pytest.mark.parametrize(
    ("override", "attr", "expected"),
    [
        ("lora.r=8", ("lora", "r"), 8),
        ("lora.dropout=0", ("lora", "dropout"), 0.0),
        ("lora.targets=[q_proj,v_proj]", ("lora", "targets"), ["q_proj", "v_proj"]),
        ("training.learning_rate=1e-4", ("training", "learning_rate"), 1e-4),  # YAML 1.1 says str
        ("training.learning_rate=3", ("training", "learning_rate"), 3.0),
        ("quantization.bits=none", ("quantization", "bits"), None),
        ("quantization.bits=8", ("quantization", "bits"), 8),
        ("data.columns={output: response}", ("data", "columns"), {"output": "response"}),
    ],
)
def test_set_overrides_are_typed(override, attr, expected):
    recipe = recipe_from_mapping(MINIMAL, [override])
    assert getattr(getattr(recipe, attr[0]), attr[1]) == expected


def test_method_follows_bits():
    assert recipe_from_mapping(MINIMAL, ["quantization.bits=8"]).method == "lora-8bit"
    assert recipe_from_mapping(MINIMAL, ["quantization.bits=none"]).method == "lora"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.rnk=8", "unknown recipe key 'lora.rnk' in --set (did you mean 'lora.r'?)"),
        ("lora.r=abc", "lora.r: expected an integer, got str 'abc'"),
        ("lora.r=0", "lora.r: must be > 0, got 0"),
        ("lora.r=2.5", "lora.r: expected an integer, got float 2.5"),
        ("lora.dropout=1", "lora.dropout: must be in [0, 1), got 1.0"),
        ("data.max_seq_len=0", "data.max_seq_len: must be > 0, got 0"),
        ("training.optimizer=sgdx", "training.optimizer: unknown value 'sgdx'"),
        ("lora.targets=atention", "lora.targets: unknown value 'atention' (did you mean 'attention'?)"),
        ("quantization.bits=3", "quantization.bits: must be 4, 8 or none, got 3"),
        (
            "training.gradient_checkpointing=maybe",
            "training.gradient_checkpointing: expected true, false, auto or a number of layers >= 0",
        ),
        ("target_gpu=lots", "target_gpu: unknown GPU 'lots' (did you mean 'l40s'?); expected a preset (t4, "),
        ("target_gpu=4080", "target_gpu: unknown GPU '4080' (did you mean '4090'?); expected a preset"),
        ("target_gpu=24G", "target_gpu: '24G' is ambiguous; write 24GB (10^n bytes, as sold) or 24GiB (2^n bytes)"),
        ("lora", "--set expects key=value, got 'lora'"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(QLoraError) as info:
        recipe_from_mapping(MINIMAL, [override])
    assert message in str(info.value)


def test_unknown_yaml_key_suggests_closest(tmp_path):
    path = write(tmp_path, {**MINIMAL, "training": {"max_step": 5}})
    with pytest.raises(
        QLoraError, match=r"unknown recipe key 'training.max_step' \(did you mean 'training.max_steps'\?\)"
    ):
        load_recipe(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"data": {"path": "d"}, "output_dir": "o"}, "model.name_or_path: required"),
        ({"model": {"name_or_path": "m"}, "output_dir": "o"}, "data.path: required"),
        ({"model": {"name_or_path": "m"}, "data": {"path": "d"}}, "output_dir: required"),
        ({**MINIMAL, "lora": 5}, "lora: expected a mapping of keys, got int 5"),
    ],
)
def test_missing_and_misshapen_sections(tmp_path, data, message):
    with pytest.raises(QLoraError, match=message):
        load_recipe(write(tmp_path, data))


def test_file_errors(tmp_path):
    with pytest.raises(QLoraError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(QLoraError, match=r"malformed YAML in .* at line 3"):
        load_recipe(write(tmp_path, "model:\n  name_or_path: [unclosed\n"))
    with pytest.raises(QLoraError, match="expected a mapping of keys at the top level, got list"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_relative_input_paths_resolve_against_the_recipe(tmp_path):
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "data.jsonl").write_text("{}\n")
    path = write(tmp_path, {**MINIMAL, "data": {"path": "assets/data.jsonl"}})
    recipe = load_recipe(path)
    assert recipe.data.path == str((tmp_path / "assets" / "data.jsonl").resolve())
    assert recipe.model.name_or_path == "org/model"  # a Hub name is left alone
    assert recipe.output_dir == "out"  # outputs stay relative to the working directory


def test_saved_recipe_round_trips(tmp_path):
    recipe = recipe_from_mapping(MINIMAL, ["lora.r=8", "quantization.bits=none", "target_gpu=24GB"])
    recipe.save(tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again.to_dict() == recipe.to_dict()
    assert isinstance(again, Recipe) and again.quantization.bits is None


def test_all_keys_lists_dotted_leaves():
    keys = all_keys()
    assert {"lora.r", "training.max_steps", "model.name_or_path", "output_dir", "target_gpu"} <= set(keys)
    assert "lora" not in keys and "source" not in keys


def test_parse_gpu_memory_units_are_explicit_and_presets_are_what_the_card_reports():
    assert parse_gpu_memory("24GB") == 24 * 10**9  # as sold: decimal
    assert parse_gpu_memory("15.5 GiB") == int(15.5 * 2**30)
    assert parse_gpu_memory("15828254720") == 15_828_254_720  # plain bytes, as total_memory prints
    assert parse_gpu_memory("t4") == parse_gpu_memory("T4") == 15095 * 2**20  # ~14.74 GiB, not 16 GB
