"""The shipped recipes: every one loads offline, and the consumer-GPU ones say how to run them and what they need."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from qlora.config.recipe import load_recipe, parse_gpu_memory
from qlora.memory.estimate import estimate_recipe

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
ALL_RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
CONSUMER_RECIPES = [p for p in ALL_RECIPES if not p.name.startswith("demo")]


def header(path: Path) -> str:
    """The comment block at the top of a recipe file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(itertools.takewhile(lambda line: line.startswith("#"), lines))


def test_there_are_enough_consumer_recipes():
    assert len(CONSUMER_RECIPES) >= 6


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.name)
def test_recipe_loads_offline(path):
    recipe = load_recipe(path)  # validation only: no model or data is fetched
    assert recipe.output_dir and recipe.model.name_or_path and recipe.data.path


@pytest.mark.parametrize("path", CONSUMER_RECIPES, ids=lambda p: p.name)
def test_consumer_recipe_names_its_gpu_launch_command_and_peak(path):
    recipe = load_recipe(path)
    assert estimate_recipe(recipe).total <= parse_gpu_memory(recipe.target_gpu)  # sized for it: the peak fits
    text = header(path)
    assert f"qlora train recipes/{path.name}" in text
    assert recipe.target_gpu in text
    stated = float(text.split("# Predicted peak:")[1].split("GiB")[0])
    assert stated == pytest.approx(
        estimate_recipe(recipe).total / 2**30, abs=0.006
    )  # the header is the profiler's figure
    assert recipe.output_dir == f"runs/{path.stem}"
