"""Merge: onto the dequantized 4-bit base (not the original weights), saved as plain transformers, checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.config.errors import ExitCode, QLoraError, run_cli


@pytest.fixture(scope="module")
def run(trained_run):
    from qlora.post.export import read_run

    return read_run(trained_run)


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    """(merged folder, merge check)."""
    from qlora.post.merge import merge

    to = tmp_path_factory.mktemp("merged") / "model"
    return to, merge(run, to)


@pytest.fixture(scope="module")
def reference(run):
    """Logits of the 4-bit base + adapter (what training and `qlora generate` use) on the check prompts."""
    from qlora.post.generate import load_adapted_model
    from qlora.post.merge import check_inputs, logits_for

    model, tokenizer = load_adapted_model(run)
    inputs = check_inputs(run, tokenizer)
    with model.disable_adapter():
        base_only = logits_for(model, inputs)
    return inputs, logits_for(model, inputs), base_only


def test_merged_model_matches_the_4bit_base_plus_adapter(merged, reference):
    from qlora.post.merge import MAX_RELATIVE_DIFF, max_diff

    _, check = merged
    _, with_adapter, base_only = reference
    assert check.ok and check.finite and check.relative < MAX_RELATIVE_DIFF and check.floor > 0
    assert check.adapter_change == max_diff(with_adapter, base_only) > 0.1  # the adapter moves logits a lot
    assert check.positions > 100 and check.placement == "cpu"  # auto without a GPU


def test_merging_onto_the_original_weights_is_rejected(run, merged, reference, tiny_llama):
    """The trap: the adapter's deltas were learned against the NF4 weights, not the checkpoint's. Measured
    against what the adapter changes, the wrong base is three times over the limit and the right merge far under."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora.post.merge import MAX_RELATIVE_DIFF, compare, logits_for

    inputs, with_adapter, base_only = reference
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    wrong = PeftModel.from_pretrained(original, str(run.adapter_dir)).merge_and_unload().eval()
    check = compare(with_adapter, logits_for(wrong, inputs), base_only, merged[1].floor)
    assert not check.ok and check.relative > 2 * MAX_RELATIVE_DIFF
    assert merged[1].ok and check.relative > 10 * merged[1].relative


@pytest.mark.parametrize("compute", ["bfloat16", "float16"])
def test_with_a_16bit_compute_dtype_right_merges_pass_and_the_original_base_is_refused(
    run, tmp_path, tiny_llama, compute
):
    """What a GPU does (16-bit kernels on both sides of the check), on the CPU: every right merge passes, in either
    --dtype, and the merge onto the original weights stays far outside both the limit and the rounding floor."""
    import dataclasses

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora.post.generate import load_adapted_model
    from qlora.post.merge import (
        FLOOR_MULTIPLE,
        MAX_RELATIVE_DIFF,
        SAVE_DTYPES,
        check_inputs,
        compare,
        logits_for,
        merge,
        rounding_floor,
    )

    quantization = dataclasses.replace(run.recipe.quantization, compute_dtype=compute)
    run16 = dataclasses.replace(run, recipe=dataclasses.replace(run.recipe, quantization=quantization))
    checks = {save: merge(run16, tmp_path / save, save_dtype=save) for save in ("float16", "bfloat16")}
    assert all(check.ok and check.finite for check in checks.values()), checks
    model, tokenizer = load_adapted_model(run16, "cpu", SAVE_DTYPES[compute])
    inputs = check_inputs(run16, tokenizer)
    with model.disable_adapter():
        base_only = logits_for(model, inputs)
    with_adapter = logits_for(model, inputs)
    for save, right in checks.items():
        original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        wrong = (
            PeftModel.from_pretrained(original, str(run.adapter_dir))
            .merge_and_unload()
            .to(SAVE_DTYPES[save])
            .float()
            .eval()
        )
        floor = rounding_floor(run16, SAVE_DTYPES[compute], save, tokenizer, "cpu", inputs, base_only)
        check = compare(with_adapter, logits_for(wrong, inputs), base_only, floor)
        assert not check.ok, (compute, save, check)
        assert check.relative > 2 * MAX_RELATIVE_DIFF and check.max_abs_diff > 2 * FLOOR_MULTIPLE * floor, (
            compute,
            save,
            check,
        )
        assert check.max_abs_diff > 5 * right.max_abs_diff, (compute, save, check, right)


def test_a_non_finite_logit_on_any_prompt_is_refused():
    """NaN on the third prompt: Python's max over the prompts would skip it after a finite first one."""
    from qlora.post.merge import compare

    reference = [torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3), torch.zeros(2, 3)]
    base = [r + 1 for r in reference]
    candidate = [r.clone() for r in reference]
    candidate[2][1, 1] = float("nan")
    check = compare(reference, candidate, base, floor=1.0)
    assert not check.finite and not check.ok
    candidate[2][1, 1] = 1.0
    assert compare(reference, candidate, base, floor=1.0).ok


def test_an_adapter_that_changes_nothing_is_only_accepted_when_identical():
    from qlora.post.merge import MergeCheck

    assert MergeCheck(max_abs_diff=0.0, adapter_change=0.0, logit_scale=1.0, positions=1).ok
    assert not MergeCheck(max_abs_diff=1e-6, adapter_change=0.0, logit_scale=1.0, positions=1).ok


def test_saved_folder_is_a_plain_16bit_transformers_model(merged, reference):
    from transformers import AutoModelForCausalLM

    from qlora.post.merge import compare, logits_for

    folder, check = merged
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names
    assert "adapter_config.json" not in names and not any(n.endswith(".bin") for n in names)
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert not hasattr(model, "peft_config")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    linears = [m for m in model.modules() if "Linear" in type(m).__name__]
    assert linears and all(type(m) is torch.nn.Linear for m in linears)
    inputs, with_adapter, base_only = reference
    assert compare(with_adapter, logits_for(model.float(), inputs), base_only).max_abs_diff == pytest.approx(
        check.max_abs_diff, abs=1e-6
    )


def test_existing_folder_needs_overwrite(run, merged):
    from qlora.post.merge import merge

    with pytest.raises(QLoraError, match="already exists and is not empty; pass --overwrite"):
        merge(run, merged[0])


def test_a_failed_check_exits_nonzero_and_writes_nothing(run, tmp_path, monkeypatch, capsys):
    import qlora.merge
    import qlora.post.merge

    monkeypatch.setattr(qlora.post.merge, "MAX_RELATIVE_DIFF", 0.0)
    monkeypatch.setattr(qlora.post.merge, "FLOOR_MULTIPLE", 0.0)
    assert run_cli(qlora.merge.main, [str(run.out_dir), "--to", str(tmp_path / "m")]) == ExitCode.MERGE_MISMATCH == 7
    assert "does not match the 4-bit base + adapter; nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_a_classification_run_without_its_label_names_is_refused(run, tmp_path):
    """The head's size and label order come from metrics.json; without them no base can be rebuilt."""
    import dataclasses

    from qlora.post.merge import merge

    recipe = dataclasses.replace(run.recipe, task="classification")
    with pytest.raises(
        QLoraError, match=r"metrics.json: a classification run without its label names \(data.labels\)"
    ):
        merge(dataclasses.replace(run, recipe=recipe), tmp_path / "m")


@pytest.mark.slow
def test_cli_merge_prints_the_check_and_saves_a_loadable_model(run, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "qlora.merge", str(run.out_dir), "--to", str(tmp_path / "M"), "--dtype", "bfloat16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    match = re.search(
        r"max \|logit diff\| (\S+) against the adapter's change (\S+): (\S+) % \(limit 1 %\)", result.stdout
    )
    assert match and float(match.group(3)) < 1.0, result.stdout
    assert "merge memory: " in result.stderr and "merging on cpu" in result.stderr
    config = json.loads((Path(tmp_path / "M") / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


# --- where the merge runs: within a GPU memory budget ---------------------------------------------


def test_merge_memory_of_an_8b_model_does_not_fit_a_t4_whole_but_does_layer_by_layer():
    from qlora.memory.merge import choose_placement, merge_memory_bytes

    memory = merge_memory_bytes("llama-3.1-8b", "float16")
    t4 = int(14.57 * 2**30)  # what torch reports free on a 16 GB T4 once the context is up
    assert memory.full > 8.0e9 * 2 > t4  # 8B parameters in fp16, plus one weight being converted
    assert 4.5 * 2**30 < memory.layers < 7 * 2**30  # the 4-bit model and one dense weight
    assert choose_placement("auto", memory, t4) == "layers"
    assert choose_placement("auto", memory, 80 * 2**30) == "cuda"
    assert choose_placement("auto", memory, 2**30) == "cpu"
    assert choose_placement("auto", memory, None) == "cpu"
    assert choose_placement("cuda", memory, t4) == "cuda"  # asked for: tried as asked


def test_asking_for_the_gpu_without_one_is_a_clear_error(run, tmp_path, capsys):
    import qlora.merge
    import qlora.post.merge

    assert run_cli(qlora.merge.main, [str(run.out_dir), "--to", str(tmp_path / "m"), "--device", "layers"]) == 2
    assert "error: --device layers: no CUDA GPU is available (use --device cpu or auto)" in capsys.readouterr().err
    assert run_cli(qlora.merge.main, [str(run.out_dir), "--to", str(tmp_path / "m"), "--gpu-memory", "lots"]) == 2
    assert "error: --gpu-memory: expected a size such as '12GiB', got 'lots'" in capsys.readouterr().err


def test_merge_within_a_small_gpu_budget_goes_layer_by_layer_and_matches(run, merged, tmp_path, monkeypatch, capsys):
    """A budget that holds the 4-bit model and one layer but not the whole dense model: the layer-by-layer
    path runs (its GPU work lands on the CPU here) and saves the same weights as the whole-model merge."""
    from safetensors.torch import load_file

    import qlora.post.merge
    from qlora.memory.merge import merge_memory_bytes
    from qlora.post.merge import merge

    memory = merge_memory_bytes(run.recipe.model.name_or_path, "float32")
    budget = (memory.layers + memory.full) // 2
    monkeypatch.setattr(qlora.post.merge, "free_gpu_bytes", lambda: 10 * memory.full)
    check = merge(run, tmp_path / "m", gpu_memory=budget)
    assert check.placement == "layers" and check.ok
    assert "merging on layers" in capsys.readouterr().err
    whole, layered = load_file(merged[0] / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert whole.keys() == layered.keys() and all(torch.equal(whole[k], layered[k]) for k in whole)


def test_layer_by_layer_dequantization_is_transformers_dequantization(run):
    from transformers import AutoTokenizer

    from qlora.post.generate import load_run_base
    from qlora.post.merge import dequantize_layer_by_layer

    tokenizer = AutoTokenizer.from_pretrained(str(run.adapter_dir))
    expected = load_run_base(run, torch.float32, tokenizer).dequantize(dtype=torch.float32).state_dict()
    model = dequantize_layer_by_layer(load_run_base(run, torch.float32, tokenizer), torch.float32, to="cpu")
    assert not getattr(model, "is_quantized", False) and "quantization_config" not in model.config.to_dict()
    assert all(type(m) is torch.nn.Linear for m in model.modules() if "Linear" in type(m).__name__)
    got = model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_the_command_line_offers_the_merge_layers_own_choices():
    """qlora/merge.py names them without importing the merge layers (torch): they must stay the same."""
    import qlora.merge
    from qlora.memory.merge import PLACEMENTS
    from qlora.post.merge import SAVE_DTYPES

    assert tuple(sorted(SAVE_DTYPES)) == qlora.merge.SAVE_DTYPE_NAMES
    assert qlora.merge.PLACEMENT_NAMES == PLACEMENTS
