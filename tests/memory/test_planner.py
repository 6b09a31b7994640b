"""The fit planner: fits or not, the largest sequence and batch found by bisection, advice, recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora.config.recipe import load_recipe, parse_gpu_memory
from qlora.memory.estimate import estimate, estimate_recipe
from qlora.memory.planner import largest, plan, plan_fit
from qlora.memory.settings import Settings

GIB = 2**30
RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
SIZED_RECIPES = [p for p in RECIPES if load_recipe(p).target_gpu]


@pytest.mark.parametrize("threshold", [0, 1, 2, 37, 99, 100])
def test_largest_is_the_last_value_that_fits(threshold):
    calls = []

    def fits(n):
        calls.append(n)
        return n <= threshold

    assert largest(fits, 100) == threshold
    assert len(calls) <= 9  # bisection, not a scan


def test_seven_b_on_24gb_limits_are_the_edge_of_fitting():
    fit_plan = plan("llama-2-7b", ("full", "lora", "qlora"), Settings(), 24 * GIB)
    full, lora, qlora = fit_plan.methods
    assert not full.fits and lora.fits and qlora.fits
    assert qlora.max_seq_len == 4096  # the model's context: the search's upper end
    for fit in (lora, qlora):
        below = estimate("llama-2-7b", fit.method, Settings(batch_size=fit.max_batch_size)).total
        above = estimate("llama-2-7b", fit.method, Settings(batch_size=fit.max_batch_size + 1)).total
        assert below <= 24 * GIB < above
    assert lora.max_batch_size < qlora.max_batch_size
    assert estimate("llama-2-7b", "lora", Settings(seq_len=lora.max_seq_len)).total <= 24 * GIB
    advice = fit_plan.advice()
    assert advice[0] == "llama-2-7b full: predicted peak 80.23 GiB of 24.00 GiB: does not fit"
    assert advice[1].startswith("  - fits with --methods lora-8bit: ")  # lora and qlora are in the plan already
    assert "fits; longest sequence 4,096 (the model's context) at batch 1" in advice[-1]


def test_a_shorter_sequence_is_the_first_advice_when_it_is_enough():
    settings = Settings(seq_len=65536)  # the chunked loss fits 16,384 since issue 11
    fit = plan("llama-3.1-8b", ("qlora",), settings, 24 * GIB).methods[0]
    assert not fit.fits and 512 < fit.max_seq_len < 65536
    assert estimate("llama-3.1-8b", "qlora", settings.replace(seq_len=fit.max_seq_len)).total <= 24 * GIB
    assert estimate("llama-3.1-8b", "qlora", settings.replace(seq_len=fit.max_seq_len + 1)).total > 24 * GIB


def test_a_lower_rank_when_no_sequence_or_batch_is_enough():
    advice = plan("qwen2.5-32b", ("qlora",), Settings(), 24 * GIB).advice()
    assert "does not fit" in advice[0]
    rank = int(advice[1].split("--rank ")[1].split(":")[0])
    assert estimate("qwen2.5-32b", "qlora", Settings(rank=rank)).total <= 24 * GIB
    assert estimate("qwen2.5-32b", "qlora", Settings(rank=rank + 1)).total > 24 * GIB


def test_advice_when_nothing_fits_names_the_smallest_possible_peak():
    advice = plan("llama-2-70b", ("qlora",), Settings(), 24 * GIB).advice()
    assert len(advice) == 2 and "does not fit" in advice[0]
    assert advice[1].startswith(
        "  - nothing fits 24.00 GiB: even QLoRA at batch 1, one token, rank 1 and 8-bit AdamW needs 36."
    )


def test_plan_fit_speaks_in_recipe_keys():
    recipe = load_recipe(RECIPES[0].parent / "qwen2.5-32b-alpaca-24gb.yaml", ["data.max_seq_len=4096"])
    advice = plan_fit(recipe, 24 * GIB).advice()
    assert "qwen2.5-32b qlora" in advice[0] and "does not fit" in advice[0]
    assert advice[1].startswith("  - fits with data.max_seq_len=")


def test_a_batch_too_large_for_any_useful_length_is_advised_down_to_one():
    recipe = load_recipe(RECIPES[0].parent / "llama-2-13b-alpaca-24gb.yaml")  # batch 4 x 1024 tokens, r 64
    gpu = int(12.5 * GIB)  # 12.5 GiB: batch 4 holds 117 tokens, batch 1 holds 470
    advice = plan_fit(recipe, gpu).advice()
    one = next(line for line in advice if "training.batch_size=1 and data.max_seq_len=" in line)
    longest = int(one.split("data.max_seq_len=")[1].split()[0])
    settings = estimate_recipe(recipe).settings
    assert estimate("llama-2-13b", "qlora", settings.replace(batch_size=1, seq_len=longest)).total <= gpu
    assert estimate("llama-2-13b", "qlora", settings.replace(batch_size=1, seq_len=longest + 1)).total > gpu
    assert any("lora.r=" in line for line in advice)  # the rank is the change that keeps batch and length


@pytest.mark.parametrize("path", SIZED_RECIPES, ids=lambda p: p.name)
def test_every_sized_recipe_fits_its_target_gpu(path):
    """Issue 4: each recipe's predicted peak (model named by its Hub id, mapped offline) fits target_gpu."""
    recipe = load_recipe(path)
    predicted = estimate_recipe(recipe)
    assert predicted.method == recipe.method and predicted.settings.seq_len == recipe.data.max_seq_len
    assert predicted.total <= parse_gpu_memory(recipe.target_gpu)
    assert plan_fit(recipe, parse_gpu_memory(recipe.target_gpu)).methods[0].fits


def test_llama_3_1_8b_r16_at_2048_tokens_holds_no_vocabulary_sized_logits():
    """Issue 11's must-show: the T4 recipe (QLoRA r 16, all-linear) at batch 1 x 2,048 was 9.40 GiB of
    tensors with the standard loss; the chunked loss and its 512-token chunks bring it under 7.5 GiB (torch's
    kernels, as then); Liger's kernels (the GPU default now) hold less still."""
    keys = ["data.max_seq_len=2048", "training.batch_size=1"]
    recipe = load_recipe(RECIPES[0].parent / "llama-3.1-8b-alpaca-t4.yaml", [*keys, "training.kernels=none"])
    chunked = estimate_recipe(recipe)
    standard = estimate_recipe(load_recipe(recipe.source, [*keys, "training.kernels=none", "training.loss=standard"]))
    assert chunked.allocated <= 7.5 * GIB < 9.4 * GIB <= standard.allocated
    assert chunked.peak_moment == "backward through one layer"  # the loss is no longer the largest moment
    assert standard.peak_moment == "start of backward (loss gradient)"
    assert estimate_recipe(load_recipe(recipe.source, keys)).allocated < chunked.allocated


def test_the_planner_names_the_chunked_loss_when_it_is_what_fits():
    recipe = load_recipe(
        RECIPES[0].parent / "llama-3.1-8b-alpaca-t4.yaml",
        ["data.max_seq_len=4096", "training.batch_size=1", "training.loss=standard"],
    )
    advice = plan_fit(recipe, 10 * GIB).advice()  # 14.02 GiB with the standard loss, 9.55 chunked
    assert "does not fit" in advice[0]
    assert any(line.startswith("  - fits with training.loss=chunked: ") for line in advice)


def test_an_eval_batch_too_large_is_advised_down():
    """The eval step is a phase of the run: a large eval batch with the standard loss's eval logits
    can be what does not fit, and the advice names training.eval_batch_size."""
    recipe = load_recipe(
        RECIPES[0].parent / "llama-3.1-8b-alpaca-t4.yaml",
        ["data.max_seq_len=2048", "training.batch_size=1", "training.loss=standard", "training.eval_batch_size=8"],
    )
    estimate_ = estimate_recipe(recipe)
    assert estimate_.phase == "eval" and estimate_.peak_moment == "eval step (eval logits and loss)"
    assert estimate_.phases["eval"]["total_bytes"] == estimate_.total > estimate_.phases["train"]["total_bytes"]
    advice = plan_fit(recipe, 16 * GIB).advice()
    line = next(line for line in advice if "training.eval_batch_size=" in line)
    size = int(line.split("training.eval_batch_size=")[1].split(":")[0])
    assert 1 <= size < 8
    fits = lambda n: (
        estimate_recipe(load_recipe(recipe.source, [*OVERRIDES_8B, f"training.eval_batch_size={n}"])).total <= 16 * GIB
    )
    assert fits(size) and not fits(size + 1)


OVERRIDES_8B = ["data.max_seq_len=2048", "training.batch_size=1", "training.loss=standard"]
