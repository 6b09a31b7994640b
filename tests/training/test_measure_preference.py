"""The preference step's memory (TRL's DPO step: chosen + rejected, the reference forward, TRL's log-prob head)
predicted against the same step measured on the CPU."""

from __future__ import annotations

import json

import pytest
from conftest import predicted_and_measured, prediction

from qlora.config.errors import run_cli

PAIRS = ("data.max_seq_len=256", "lora.r=4", "training.objective=dpo")  # 256-token pairs


@pytest.mark.parametrize(
    "changes",
    [
        ("training.batch_size=1",),
        ("training.batch_size=2", "dpo.precompute_ref_log_probs=true"),
        ("training.batch_size=2", "training.gradient_checkpointing=false"),  # TRL turns LoRA's dropout off
    ],
    ids=["batch-1", "batch-2-precomputed-reference", "batch-2-no-checkpointing"],
)
def test_dpo_step_is_predicted_within_1_percent(llama_config, changes):
    predicted, measured = predicted_and_measured(llama_config, "qlora", *PAIRS, *changes)
    for component in ("weights", "adapters", "optimizer"):  # the 'ref' copy doubles the adapters
        assert measured.bytes[component] == predicted.bytes[component]
    assert predicted.allocated == pytest.approx(measured.peak, rel=0.01)
    assert predicted.phases["eval"]["allocated_bytes"] == pytest.approx(measured.phases["eval"], rel=0.01)


def test_dpo_holds_more_than_sft_and_the_cli_takes_the_key(llama_config, capsys):
    sft = prediction(llama_config, "qlora", "data.max_seq_len=256", "lora.r=4")
    dpo = prediction(llama_config, "qlora", *PAIRS)
    assert dpo.bytes["adapters"] == 2 * sft.bytes["adapters"]
    assert dpo.bytes["activations"] > 1.5 * sft.bytes["activations"]  # two sequences per pair
    assert "TRL log-prob head" in dpo.peak_moment
    argv = ["--model", str(llama_config), "--methods", "qlora", "--seq-len", "256", "--rank", "4"]
    argv += ["--set", "training.objective=dpo", "--format", "json"]
    assert run_cli(__import__("qlora.profile", fromlist=["main"]).main, argv) == 0
    (result,) = json.loads(capsys.readouterr().out)["runs"][0]["results"]
    assert result["bytes"]["adapters"] == dpo.bytes["adapters"]
