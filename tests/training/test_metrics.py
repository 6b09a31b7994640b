"""Metrics: the numpy formulas against hand-worked values, and which metric each task may ask for."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from qlora.config.errors import QLoraError
from qlora.config.recipe import recipe_from_mapping
from qlora.training.metrics import (
    accuracy,
    classification_metrics,
    map_at_3,
    memory_figures,
    paged_optimizer_bytes,
    task_metrics,
    weighted_f1,
)

LABELS = np.array([0, 0, 1, 1, 2])
PREDICTIONS = np.array([0, 1, 1, 1, 0])


def recipe(task="causal_lm", metric="none", fmt="alpaca"):
    fmt = "classification" if task == "classification" else fmt
    return recipe_from_mapping(
        {
            "model": {"name_or_path": "m"},
            "data": {"path": "d.jsonl", "format": fmt},
            "task": task,
            "eval": {"metric": metric},
            "output_dir": "o",
        }
    )


def test_accuracy():
    assert accuracy(PREDICTIONS, LABELS) == pytest.approx(0.6)


def test_weighted_f1_matches_the_hand_worked_value():
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 1 -> 0.8; class 2: tp 0 -> 0; weights 2, 2, 1
    assert weighted_f1(PREDICTIONS, LABELS) == pytest.approx((0.5 * 2 + 0.8 * 2 + 0.0 * 1) / 5)
    assert weighted_f1(LABELS, LABELS) == 1.0


def test_map_at_3_scores_by_rank_of_the_right_answer():
    scores = np.array([[9, 1, 2, 3], [1, 9, 2, 3], [1, 2, 9, 3], [1, 2, 3, 9]], dtype=float)
    labels = np.array([0, 2, 3, 0])  # ranks 1, 3, 2, 4
    assert map_at_3(scores, labels) == pytest.approx((1 + 1 / 3 + 1 / 2 + 0) / 4)


def test_map_at_3_with_two_classes_is_defined():
    assert map_at_3(np.array([[0.1, 0.9], [0.8, 0.2]]), np.array([0, 0])) == pytest.approx((0.5 + 1) / 2)


def test_classification_metrics_add_map_at_3_only_when_ranked():
    logits = np.eye(3)[PREDICTIONS]
    assert classification_metrics(logits, LABELS, ranked=False).keys() == {"eval_accuracy", "eval_f1"}
    ranked = classification_metrics(logits, LABELS, ranked=True)
    assert ranked["eval_accuracy"] == pytest.approx(0.6) and "eval_map_at_3" in ranked


@pytest.mark.parametrize(
    "task, metric", [("causal_lm", "accuracy"), ("causal_lm", "map@3"), ("classification", "exact_match")]
)
def test_a_metric_the_task_cannot_measure_is_an_error_when_the_recipe_loads(task, metric):
    with pytest.raises(QLoraError, match=f"eval.metric: '{metric}' does not apply to task '{task}'"):
        recipe(task, metric)


def test_chat_prompts_are_generated_without_an_extra_bos(monkeypatch):
    """A chat template writes its own BOS; alpaca prompts get one from us."""
    import qlora.training.metrics

    seen = []
    monkeypatch.setattr(
        qlora.training.metrics, "exact_match", lambda *args: seen.append(args[4:]) or 0.5
    )  # (add_bos, batch)
    data = type("Data", (), {"eval_examples": [], "stats": {}})()
    loaded = type("Loaded", (), {"model": None, "tokenizer": None})()
    for fmt in ("chat", "alpaca"):
        assert task_metrics(recipe(metric="exact_match", fmt=fmt), None, loaded, data) == {"eval_exact_match": 0.5}
    assert [add_bos for add_bos, _ in seen] == [False, True]
    assert {batch for _, batch in seen} == {
        recipe(metric="exact_match").training.batch_size
    }  # no eval_batch_size: the training batch


def test_exact_match_generates_at_the_eval_batch_size(monkeypatch):
    import qlora.training.metrics

    seen = []
    monkeypatch.setattr(
        qlora.training.metrics,
        "generate_answers",
        lambda model, tok, prompts, new, batch, bos: seen.append(batch) or [""] * len(prompts),
    )
    examples = [qlora.training.metrics.Example(prompt="p", response="r")] * 3
    qlora.training.metrics.exact_match(None, None, examples, 4, True, 6)
    assert seen == [6]


def fake_optimizer():
    """Adam-like states: two paged fp32 moments (bnb's paged 32-bit AdamW) and an unpaged step count."""
    exp_avg, exp_avg_sq = torch.zeros(1000), torch.zeros(1000)
    exp_avg.is_paged = exp_avg_sq.is_paged = True
    inner = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))])
    inner.state = {"p": {"state1": exp_avg, "state2": exp_avg_sq, "step": torch.tensor(3.0)}}
    return types.SimpleNamespace(optimizer=inner)  # accelerate's wrapper exposes the real one as .optimizer


def test_paged_states_are_counted_once_each_through_the_accelerate_wrapper():
    assert paged_optimizer_bytes(fake_optimizer()) == 2 * 1000 * 4
    assert paged_optimizer_bytes(None) == 0


def test_cuda_figures_add_paged_states_to_allocated_and_keep_each_labelled(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 5 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: 6 * 2**30)
    figures = memory_figures(fake_optimizer())
    assert figures == {
        "peak_memory_bytes": 5 * 2**30 + 8000,
        "peak_memory_allocated_bytes": 5 * 2**30,
        "paged_optimizer_bytes": 8000,
        "peak_memory_reserved_bytes": 6 * 2**30,
    }


def test_cpu_figure_is_the_resident_set_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    figures = memory_figures(fake_optimizer())
    assert list(figures) == ["peak_memory_bytes"] and figures["peak_memory_bytes"] > 50 * 2**20
