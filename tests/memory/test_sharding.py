"""The profiler per GPU: what DDP, FSDP and ZeRO-3 divide, the host RAM of offload and loading, the card planner."""

from __future__ import annotations

import json

import pytest

from qlora.config.errors import QLoraError, run_cli
from qlora.memory.estimate import estimate
from qlora.memory.settings import Settings
from qlora.profile import main

GIB = 2**30


def per_gpu(model="llama-3.1-70b", **sharding):
    return estimate(model, "qlora", Settings(**sharding))


def test_ddp_keeps_a_whole_replica_and_adds_the_all_reduce_buckets():
    one, two = per_gpu(), per_gpu(gpus=2)
    assert two.bytes["weights"] == one.bytes["weights"] and two.bytes["optimizer"] == one.bytes["optimizer"]
    assert two.bytes["gradients"] == 2 * one.bytes["gradients"]
    assert two.host_bytes == {}


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharding_splits_parameters_gradients_and_states_but_not_the_quantization_state(strategy):
    eight, two = per_gpu(model="llama-3.1-8b"), per_gpu(gpus=2, strategy=strategy, model="llama-3.1-8b")
    assert two.bytes["adapters"] == pytest.approx(eight.bytes["adapters"] / 2, abs=1)
    assert two.bytes["optimizer"] == pytest.approx(eight.bytes["optimizer"] / 2, abs=1)
    weights = two.details["weights"]
    replicated = sum(
        v
        for k, v in eight.details["weights"].items()
        if k in ("absmax (8-bit)", "double-quant state", "4-bit code table")
    )
    assert weights["4-bit quantization state (every GPU)"] == replicated
    assert weights["sharded parameters (1/2)"] == pytest.approx(
        (sum(eight.details["weights"].values()) - replicated) / 2, abs=1
    )
    assert two.bytes["activations"] == eight.bytes["activations"]  # each GPU runs its own micro-batch
    assert sum(two.bytes.values()) == two.total


def test_fsdp_offload_moves_sharded_state_to_host_ram_and_loading_needs_a_copy_per_process():
    off = per_gpu(gpus=2, strategy="fsdp", offload="cpu")
    on = per_gpu(gpus=2, strategy="fsdp")
    whole = sum(per_gpu().details["weights"].values())
    assert off.bytes["optimizer"] == off.bytes["adapters"] == 0 and off.total < on.total
    assert (
        sum(off.host_bytes.values()) == sum(on.host_bytes.values()) == 2 * whole
    )  # each process quantizes on its CPU


def test_zero3_loading_the_whole_4bit_model_onto_each_gpu_is_its_peak_for_a_70b():
    est = per_gpu(gpus=2, strategy="zero3")
    assert est.peak_moment.startswith("loading") and est.bytes["weights"] == sum(per_gpu().details["weights"].values())


def run_cli_raising(argv):
    """The profile CLI's work without its error printing: a user mistake raises."""
    from qlora.profile import jobs, parse_args

    return jobs(parse_args(argv))


def test_refusals_name_the_flag():
    with pytest.raises(QLoraError, match="--offload"):
        run_cli_raising(["--gpus", "2", "--strategy", "ddp", "--offload", "cpu"])
    with pytest.raises(QLoraError, match="--strategy: fsdp cannot shard bitsandbytes 8-bit"):
        estimate("llama-3.1-8b", "lora-8bit", Settings(gpus=2, strategy="fsdp"))
    assert run_cli(main, ["--gpus", "auto"]) == 2


def profile_json(argv, capsys):
    assert run_cli(main, argv) == 0
    return json.loads(capsys.readouterr().out)["runs"][0]


def test_70b_on_two_24gb_cards_with_fsdp_and_offload_fits_with_host_ram_stated(capsys):
    run = profile_json(
        [
            "--model",
            "llama-3.1-70b",
            "--methods",
            "qlora",
            "--gpus",
            "2",
            "--strategy",
            "fsdp",
            "--offload",
            "cpu",
            "--gpu",
            "24GB",
            "--format",
            "json",
        ],
        capsys,
    )
    (result,) = run["results"]
    assert result["fit"]["fits"] and result["total_bytes"] <= 24 * GIB
    assert 40 * GIB < result["host_ram_bytes"] == sum(result["host_bytes"].values())
    assert run["settings"]["gpus"] == 2 and run["settings"]["strategy"] == "fsdp"


def test_without_offload_it_says_what_fits_instead(capsys):
    run = profile_json(
        [
            "--model",
            "llama-3.1-70b",
            "--methods",
            "qlora",
            "--gpus",
            "2",
            "--strategy",
            "fsdp",
            "--gpu",
            "24GB",
            "--format",
            "json",
        ],
        capsys,
    )
    assert not run["results"][0]["fit"]["fits"]
    assert any(line.startswith("  - fits with --offload cpu") for line in run["advice"])
    assert any(line.startswith("  - fits with --gpus ") for line in run["advice"])


def test_gpus_auto_answers_how_many_cards_and_which_strategy(capsys):
    run = profile_json(
        ["--model", "llama-3.1-70b", "--methods", "qlora", "--gpus", "auto", "--gpu", "24GB", "--format", "json"],
        capsys,
    )
    plans = run["gpus_needed"]["qlora"]
    assert plans[0] == {**plans[0], "strategy": "fsdp", "offload": "cpu", "gpus": 2}
    assert {"strategy": "ddp", "offload": "none", "gpus": None} in plans  # a 70B replica never fits 24 GB


def test_a_recipe_sized_for_two_gpus_is_profiled_per_gpu_and_flags_override_it(capsys):
    from pathlib import Path

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "llama-3.1-70b-alpaca-2x24gb.yaml")
    run = profile_json(["--recipe", recipe, "--format", "json"], capsys)
    settings = run["settings"]
    assert (settings["gpus"], settings["strategy"], settings["offload"]) == (2, "fsdp", "cpu")  # distributed.gpus: 2
    assert run["results"][0]["fit"]["fits"] and run["results"][0]["host_ram_bytes"] > 0
    alone = profile_json(["--recipe", recipe, "--gpus", "1", "--format", "json"], capsys)
    assert not alone["results"][0]["fit"]["fits"]  # a 70B step does not fit one 24 GB card


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gpus", "two"], "--gpus: expected a number of GPUs or 'auto'"),
        (["--gpus", "2", "--strategy", "ddp", "--offload", "cpu"], "--offload: 'cpu' moves sharded parameters"),
        (["--model", "llama-3.1-8b", "--gpus", "2", "--measure"], "--measure: measures one process"),
    ],
)
def test_sharding_flags_fail_in_one_line(argv, message, capsys):
    assert run_cli(main, argv) == 2
    assert message in capsys.readouterr().err
