"""GPU sizes: explicit units, presets holding what torch reports, and the profiler planning for them."""

import json
import re
from pathlib import Path

import pytest

from qlora.config.errors import QLoraError, run_cli
from qlora.config.gpus import GIB, GPU_PRESETS, markdown_table, parse_gpu_list, parse_gpu_memory, preset
from qlora.profile import main

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("24GB", 24_000_000_000),
        ("24 gb", 24_000_000_000),
        ("24GiB", 24 * 2**30),
        ("22.5GiB", int(22.5 * 2**30)),
        ("512MiB", 512 * 2**20),
        ("1.5TB", 1_500_000_000_000),
        ("25386352640", 25_386_352_640),
        ("1024B", 1024),
    ],
)
def test_units_are_explicit(text, expected):
    assert parse_gpu_memory(text) == expected


@pytest.mark.parametrize("text", ["24G", "80g", "16M"])
def test_a_bare_prefix_is_ambiguous_and_says_both_spellings(text):
    with pytest.raises(QLoraError, match=rf"^--gpu: '{text}' is ambiguous; write \d+[GM]B .* or \d+[GM]iB"):
        parse_gpu_memory(text, "--gpu")


def test_an_unknown_preset_is_one_line_naming_the_key_with_did_you_mean():
    with pytest.raises(QLoraError) as info:
        parse_gpu_memory("a100-40", "target_gpu")
    message = str(info.value)
    assert message.startswith("target_gpu: unknown GPU 'a100-40' (did you mean 'a100-40gb'?)") and "\n" not in message
    with pytest.raises(
        QLoraError, match=r"^--gpu: unknown GPU 'rtx409' \(did you mean '4090'\?\)"
    ):  # an alias's target
        parse_gpu_memory("rtx409", "--gpu")


def test_presets_hold_what_the_card_reports_not_the_box_label():
    t4 = preset("t4")
    assert t4.bytes == 15_828_254_720 and 14.7 < t4.gib < 14.8 < 16e9 / GIB  # ~14.74 GiB usable of "16 GB"
    assert preset("T4") is t4 and preset("rtx4090") is preset("4090")
    for p in GPU_PRESETS.values():
        assert p.source and p.kind in ("deviceQuery", "torch", "nvidia-smi")
        nominal = int(re.search(r"(\d+) GB", p.card).group(1))
        assert 0.88 * nominal * 1e9 < p.bytes < nominal * GIB, (
            p.name
        )  # below the sold size (HBM cards sell GiB), above it less ECC
    assert [p.capability < (8, 0) for p in (preset("t4"), preset("v100-16gb"), preset("3090"))] == [True, True, False]


def test_several_gpus_comma_separated_or_repeated():
    assert parse_gpu_list(["t4,4090", "80GB"]) == [
        (GPU_PRESETS["t4"].bytes, False),
        (GPU_PRESETS["4090"].bytes, True),
        (80 * 10**9, True),
    ]


def profile_json(argv, capsys):
    code = run_cli(main, [*argv, "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)["runs"]


def test_gpu_t4_plans_for_the_memory_a_t4_reports(capsys):
    (run,) = profile_json(
        ["--model", "llama-3.1-8b", "--methods", "qlora", "--seq-len", "2048", "--gpu", "t4"], capsys
    )
    fit = run["results"][0]["fit"]
    assert run["gpu_bytes"] == fit["gpu_bytes"] == 15_828_254_720
    (boxed,) = profile_json(
        ["--model", "llama-3.1-8b", "--methods", "qlora", "--seq-len", "2048", "--gpu", "16GB"], capsys
    )
    # the box label (16e9 bytes) would promise a longer sequence than the card can hold
    assert boxed["results"][0]["fit"]["max_seq_len"] > fit["max_seq_len"]


def test_the_t4_recipe_plans_for_its_preset(capsys):
    (run,) = profile_json(["--recipe", "recipes/llama-3.1-8b-alpaca-t4.yaml"], capsys)
    assert run["gpu_bytes"] == GPU_PRESETS["t4"].bytes and run["results"][0]["fit"]["fits"] is True


def test_one_run_per_gpu(capsys):
    runs = profile_json(
        ["--model", "smollm2-135m", "--methods", "qlora", "--gpu", "t4,4090", "--gpu", "a100-80gb"], capsys
    )
    assert [r["gpu_bytes"] for r in runs] == [GPU_PRESETS[n].bytes for n in ("t4", "4090", "a100-80gb")]
    assert len({json.dumps(r["results"][0]["bytes"]) for r in runs}) == 1  # one prediction, planned three times


def test_readme_table_is_the_generated_one():
    assert markdown_table() in README.read_text()


def test_an_unquoted_yaml_preset_is_the_preset_not_bytes():
    from qlora.config.recipe import parse_gpu_memory as recipe_parse
    from qlora.config.recipe import recipe_from_mapping
    from qlora.memory.planner import plan_fit  # noqa: F401  (the OOM advice path parses the same way)

    recipe = recipe_from_mapping(
        {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "output_dir": "o", "target_gpu": 4090}
    )
    assert recipe_parse(recipe.target_gpu) == GPU_PRESETS["4090"].bytes
    with pytest.raises(QLoraError, match=r"^target_gpu: unknown GPU '24'; expected a preset .* 24GB \(10\^9 bytes\)"):
        recipe_from_mapping(
            {"model": {"name_or_path": "m"}, "data": {"path": "d.jsonl"}, "output_dir": "o", "target_gpu": 24}
        )
