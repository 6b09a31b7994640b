"""`qlora demo`: the packaged recipes, --classify, --out and --set, as the installed command runs them."""

from __future__ import annotations

import pytest

import qlora.demo.__main__ as demo
import qlora.training.run
from qlora.cli import main as qlora_main
from qlora.demo import ASSETS


@pytest.fixture
def trained(monkeypatch):
    calls = []
    monkeypatch.setattr(qlora.training.run, "train", lambda recipe, **kw: calls.append((recipe, kw)))
    return calls


def test_the_demo_trains_the_packaged_recipe_into_runs_demo(trained):
    assert qlora_main(["demo"]) == 0
    ((recipe, kwargs),) = trained
    assert recipe.source == demo.recipe_path(False) and recipe.output_dir == "runs/demo"
    assert recipe.model.name_or_path == str(ASSETS / "base-model") and recipe.eval.metric == "exact_match"
    assert kwargs == {"overwrite": True}


def test_classify_out_and_set(trained, tmp_path):
    argv = ["--classify", "--out", str(tmp_path / "c"), "--set", "training.report_to=tensorboard"]
    assert demo.main(argv) == 0
    ((recipe, _),) = trained
    assert recipe.task == "classification" and recipe.data.path == str(ASSETS / "classify.jsonl")
    assert recipe.output_dir == str(tmp_path / "c") and recipe.training.report_to == "tensorboard"


def test_the_command_lists_demo_and_init(capsys):
    assert qlora_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "\n  demo " in out and "\n  init " in out
