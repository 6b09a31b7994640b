"""benchmarks/compare_profiles.py's comparison, on tiny hand-made outputs (the full run is not part of the suite)."""

from __future__ import annotations

import copy

from conftest import load_benchmark


def entry(weights: int) -> dict:
    return {
        "bytes": {"weights": weights, "optimizer": 200},
        "total_bytes": weights + 200,
        "allocated_bytes": weights + 150,
    }


OUTPUT = {
    "runs": [
        {
            "model": "tiny",
            "advice": ["from qlora.profile.planner"],
            "results": [
                {
                    "method": "lora",
                    "peak_moment": "backward",
                    **entry(100),
                    "phases": {"train": entry(100), "eval": entry(90)},
                },
            ],
        }
    ]
}


def test_identical_outputs_have_no_differences():
    compare = load_benchmark("compare_profiles")
    assert compare.compare_outputs(OUTPUT, copy.deepcopy(OUTPUT)) == []


def test_one_changed_byte_is_one_difference_naming_its_key():
    compare = load_benchmark("compare_profiles")
    current = copy.deepcopy(OUTPUT)
    current["runs"][0]["results"][0]["bytes"]["optimizer"] = 201
    assert compare.compare_outputs(OUTPUT, current) == [("runs[0].results[0]/lora.bytes.optimizer", 200, 201)]
    assert "bytes.optimizer: base=200 current=201 (Δ +1)" in compare.describe(compare.compare_outputs(OUTPUT, current))


def test_text_fields_are_not_byte_differences():
    compare = load_benchmark("compare_profiles")
    current = copy.deepcopy(OUTPUT)
    current["runs"][0]["model"] = "renamed"
    current["runs"][0]["advice"] = ["from qlora.memory.planner"]
    current["runs"][0]["results"][0]["peak_moment"] = "loss chunk"
    assert compare.compare_outputs(OUTPUT, current) == []
    assert compare.other_differences(OUTPUT, current) == [
        "runs[0].advice[0]",
        "runs[0].model",
        "runs[0].results[0].peak_moment",
    ]


def test_phases_are_compared_only_when_both_sides_have_them():
    compare = load_benchmark("compare_profiles")
    current = copy.deepcopy(OUTPUT)
    current["runs"][0]["results"][0]["phases"]["eval"]["total_bytes"] = 1
    assert [key for key, _, _ in compare.compare_outputs(OUTPUT, current)] == [
        "runs[0].results[0]/lora.phases.eval.total_bytes"
    ]
    del current["runs"][0]["results"][0]["phases"]
    assert compare.compare_outputs(OUTPUT, current) == []
