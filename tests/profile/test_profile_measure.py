"""The model of memory (activations above all) against real training steps measured on the CPU."""

from __future__ import annotations

import json

import pytest

from qlora.errors import run_cli
from qlora.profile.estimate import estimate
from qlora.profile.measure import PeakTracker, measure
from qlora.profile.settings import Settings

SMALL = Settings(seq_len=32, batch_size=2, rank=4, device="cpu")


def test_tracker_follows_storages_to_their_release():
    import torch

    tracker = PeakTracker()
    with tracker:
        a = torch.ones(1000)  # 4,000 bytes
        b = a * 2
        view = b[:10]  # a view: the same storage, counted once
        del a, b
        c = torch.zeros(10)
    assert tracker.peak == 8000
    assert tracker.current == 4000 + 40  # b's storage lives on through the view, and c
    del view, c


@pytest.mark.slow
def test_cli_measure_every_method_within_5_percent_of_its_measured_peak(llama_config, capsys):
    """The must-show: `--measure` on a small Llama config.json; in fact the model is exact to a few bytes."""
    argv = ["--model", str(llama_config), "--seq-len", "32", "--batch-size", "2", "--rank", "4", "--measure", "--format", "json"]
    assert run_cli(__import__("qlora.profile.cli", fromlist=["main"]).main, argv) == 0
    results = json.loads(capsys.readouterr().out)["runs"][0]["results"]
    assert [r["method"] for r in results] == ["full", "lora", "qlora"]
    for r in results:
        measured = r["measured_total_bytes"]
        assert abs(r["allocated_bytes"] - measured) / measured < 0.05
        assert abs(r["allocated_bytes"] - measured) < 64  # every tensor accounted for, to a scalar or two
        for component in ("weights", "adapters", "gradients", "optimizer"):
            assert r["measured"]["bytes"][component] == r["bytes"][component]


@pytest.mark.parametrize("config,method,changes", [
    ("qwen2_config", "qlora", {}),  # biases, tied embeddings
    ("llama_config", "lora", {"checkpointing": False, "attn_implementation": "eager"}),  # everything saved, S x S scores
], ids=["qwen2-qlora", "llama-lora-eager-no-checkpointing"])
def test_activation_model_matches_a_measured_step(config, method, changes, request):
    config_path = str(request.getfixturevalue(config))
    settings = SMALL.replace(**changes)
    predicted, measured = estimate(config_path, method, settings), measure(config_path, method, settings)
    assert predicted.bytes["activations"] == pytest.approx(measured.bytes["activations"], rel=0.01)
    assert predicted.allocated == pytest.approx(measured.peak, rel=0.01)
