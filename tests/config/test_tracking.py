"""`training.report_to`: the trackers transformers knows, each checked as installed when the recipe loads."""

from __future__ import annotations

import pytest

from qlora.config import tracking
from qlora.config.errors import QLoraError
from qlora.config.recipe import recipe_from_mapping

BASE = {"model": {"name_or_path": "org/model"}, "data": {"path": "d.jsonl"}, "output_dir": "out"}


def test_the_names_are_transformers_own():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(tracking.INTEGRATIONS) == set(INTEGRATION_TO_CALLBACK)


def test_none_is_no_tracker_and_an_installed_one_passes():
    assert tracking.report_targets("none") == [] and tracking.report_targets([]) == []
    recipe = recipe_from_mapping(BASE, ["training.report_to=tensorboard", "training.run_name=first"])
    assert recipe.training.report_to == "tensorboard" and recipe.training.run_name == "first"
    assert tracking.report_targets(["tensorboard"]) == ["tensorboard"]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tensorbord", "unknown value 'tensorbord' (did you mean 'tensorboard'?)"),  # the schema's choices
        ("[tensorbord]", "unknown tracker 'tensorbord' (did you mean 'tensorboard'?)"),  # each of a list
        ("[none, tensorboard]", "'none' stands alone"),
        ("wandb", "'wandb' needs wandb, not installed: pip install 'qlora-kit[wandb]'"),
    ],
)
def test_mistakes_are_one_line_naming_what_to_install(value, message, monkeypatch):
    monkeypatch.setattr(tracking, "_installed", lambda module: module != "wandb")
    with pytest.raises(QLoraError, match="^training.report_to: ") as err:
        recipe_from_mapping(BASE, [f"training.report_to={value}"])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_empty_run_name_is_refused():
    with pytest.raises(QLoraError, match="training.run_name"):
        recipe_from_mapping(BASE, ["training.run_name=' '"])
