"""The documentation generated from the recipe schema: current in the repository, and true to the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qlora.config import docs
from qlora.config.errors import ExitCode, QLoraError
from qlora.config.recipe import all_keys

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
SCHEMA = ROOT / "recipes" / "recipe.schema.json"
REGENERATE = "run `python -m qlora.config.docs --readme README.md --schema recipes/recipe.schema.json`"


def test_the_readme_is_what_the_docs_script_writes():
    text = README.read_text(encoding="utf-8")
    assert docs.readme_text(text) == text, REGENERATE


def test_the_schema_file_is_what_the_docs_script_writes():
    assert SCHEMA.read_text(encoding="utf-8") == docs.schema_text(), REGENERATE


def test_the_table_has_one_row_per_recipe_key_with_its_default_and_choices():
    rows = [line for line in docs.reference_table().splitlines()[2:]]
    assert [row.split(" | ")[0].strip("| `") for row in rows] == all_keys()
    (bits,) = [row for row in rows if row.startswith("| `quantization.bits`")]
    assert bits.startswith("| `quantization.bits` | `4` | `4`, `8`, `none` |")
    (path,) = [row for row in rows if row.startswith("| `data.path`")]
    assert path.startswith("| `data.path` | required | a string |")


def test_the_script_rewrites_only_between_the_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# title\n\nbefore\n{docs.BEGIN}\nstale table\n{docs.END}\n"
        f"between\n{docs.EXIT_BEGIN}\n{docs.EXIT_END}\nafter\n"
    )
    schema = tmp_path / "recipe.schema.json"
    assert docs.main(["--readme", str(readme), "--schema", str(schema)]) == 0
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{docs.EXIT_END}\nafter\n")
    assert f"{docs.END}\nbetween\n" in text and "| 7 | `MERGE_MISMATCH` |" in text
    assert "stale table" not in text and "| `lora.r` | `64` | an integer | adapter rank (> 0) |" in text
    assert json.loads(schema.read_text())["properties"]["lora"]["properties"]["r"] == {
        "description": "adapter rank (> 0)",
        "default": 64,
        "type": "integer",
    }


def test_a_readme_without_markers_is_an_error():
    with pytest.raises(QLoraError, match="needs one"):
        docs.readme_text("# no markers\n")


@pytest.fixture(scope="module")
def validator():
    jsonschema = pytest.importorskip("jsonschema")
    return jsonschema.Draft202012Validator(docs.json_schema())


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid_under_the_schema(validator, recipe):
    assert list(validator.iter_errors(yaml.safe_load(recipe.read_text()))) == []


@pytest.mark.parametrize(
    "recipe",
    [
        {"lora": {"rnk": 8}},  # a misspelt key
        {"training": {"optimizer": "sgd"}},  # not a choice
        {"quantization": {"bits": 3}},
        {"lora": {"targets": []}},
        {"training": {"batch_size": "two"}},
    ],
)
def test_the_schema_flags_what_the_loader_refuses(validator, recipe):
    assert list(validator.iter_errors(recipe))


def test_the_schema_accepts_what_the_loader_accepts(validator):
    recipe = {
        "quantization": {"bits": "none"},
        "lora": {"targets": ["q_proj", "v_proj"]},
        "data": {"eval_size": 50, "columns": {"output": "response"}},
        "training": {"learning_rate": 1, "gradient_checkpointing": "auto", "mlp_tiles": 4},
        "distributed": {"strategy": None},
        "target_gpu": 4090,
    }
    assert list(validator.iter_errors(recipe)) == []


def test_every_exit_code_is_in_the_table_once_with_its_own_meaning():
    rows = docs.exit_codes_table().splitlines()[2:]
    assert [int(row.split(" | ")[0].strip("| ")) for row in rows] == [int(code) for code in ExitCode]
    assert len({code.meaning for code in ExitCode}) == len(ExitCode)
    assert ExitCode.MERGE_MISMATCH != ExitCode.PREEMPTED and ExitCode.TERMINATED == 143
