"""`qlora profile --model CONFIG --methods qlora,lora,full --seq-len 2048 --measure` on each dense family's tiny
config (benchmarks/configs, made by benchmarks/families/make_configs.py): the prediction within 1 % of the
measured peak on the CPU. The families the activation model does not follow yet are marked, with what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "benchmarks" / "configs"
NOT_YET = {  # family -> (methods off by more than 1 %, why); figures from this test, CPU, 2,048 tokens
    "olmo2": (("full",), "+3.5 %: over-predicted by the query and key norms' normalized outputs (1.5 MiB)"),
    "phi3": (("full",), "-2.3 %: one more hidden-sized tensor in full fine-tuning's layer backward"),
}
FAMILIES = ["llama", "mistral-sliding", "gemma2", "gemma3", "granite", "gpt-neox", "qwen3", "phi3", "olmo2"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_the_profiler_is_within_one_percent_of_the_measured_peak(family, capsys):
    from qlora.profile import main

    argv = ["--model", str(CONFIGS / family), "--methods", "qlora,lora,full", "--seq-len", "2048", "--measure"]
    assert main([*argv, "--format", "json"]) == 0
    results = json.loads(capsys.readouterr().out)["runs"][0]["results"]
    errors = {r["method"]: r["allocated_bytes"] / r["measured_total_bytes"] - 1 for r in results}
    print(family, {method: f"{100 * error:+.2f} %" for method, error in errors.items()})
    off, why = NOT_YET.get(family, ((), ""))
    for method, error in errors.items():
        if method in off:
            assert abs(error) > 0.01, f"{family} {method} is within 1 % now: take it off NOT_YET"
        else:
            assert abs(error) <= 0.01, f"{family} {method}: {100 * error:+.2f} %"
