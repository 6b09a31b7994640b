"""Merge: onto the dequantized 4-bit base (not the original weights), saved as plain transformers, checked."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.errors import QLoraError, run_cli
from test_export import session_run  # the session's real tiny run folder, see test_export.py


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama, alpaca_file):
    from qlora.export import read_run

    return read_run(session_run(tmp_path_factory, tiny_llama, alpaca_file))


@pytest.fixture(scope="module")
def merged(run, tmp_path_factory):
    """(merged folder, merge check)."""
    from qlora.merge import merge

    to = tmp_path_factory.mktemp("merged") / "model"
    return to, merge(run, to)


@pytest.fixture(scope="module")
def reference(run):
    """Logits of the 4-bit base + adapter (what training and `qlora generate` use) on the check prompts."""
    from qlora.generate import load_adapted_model
    from qlora.merge import check_inputs, logits_for

    model, tokenizer = load_adapted_model(run)
    inputs = check_inputs(run, tokenizer)
    with model.disable_adapter():
        base_only = logits_for(model, inputs)
    return inputs, logits_for(model, inputs), base_only


def test_merged_model_matches_the_4bit_base_plus_adapter(merged):
    _, check = merged
    assert check.ok and check.relative < 0.02
    assert check.positions > 100 and check.logit_scale > 0


def test_the_check_is_not_vacuous_the_adapter_moves_logits_far_beyond_the_limit(reference):
    from qlora.merge import compare

    _, with_adapter, base_only = reference
    assert compare(with_adapter, base_only).relative > 0.1


def test_merging_onto_the_original_weights_is_ten_times_further_off(run, merged, reference, tiny_llama):
    """The trap: the adapter's deltas were learned against the NF4 weights, not the checkpoint's.
    (On this tiny model the wrong base still lands near 1 % of the logit scale, so compare with the right merge.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qlora.merge import compare, logits_for

    inputs, with_adapter, _ = reference
    original = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    wrong = PeftModel.from_pretrained(original, str(run.adapter_dir)).merge_and_unload().eval()
    assert compare(with_adapter, logits_for(wrong, inputs)).max_abs_diff > 10 * merged[1].max_abs_diff


def test_saved_folder_is_a_plain_16bit_transformers_model(merged, reference):
    from transformers import AutoModelForCausalLM

    from qlora.merge import compare, logits_for

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
    inputs, with_adapter, _ = reference
    assert compare(with_adapter, logits_for(model.float(), inputs)).max_abs_diff == pytest.approx(check.max_abs_diff, abs=1e-6)


def test_existing_folder_needs_overwrite(run, merged):
    from qlora.merge import merge

    with pytest.raises(QLoraError, match="already exists and is not empty; pass --overwrite"):
        merge(run, merged[0])


def test_a_failed_check_exits_nonzero_and_writes_nothing(run, tmp_path, monkeypatch, capsys):
    import qlora.merge

    monkeypatch.setattr(qlora.merge, "MAX_RELATIVE_DIFF", 0.0)
    assert run_cli(qlora.merge.main, [str(run.out_dir), "--to", str(tmp_path / "m")]) == qlora.merge.MISMATCH_EXIT_CODE
    assert "does not match the 4-bit base + adapter; nothing was written" in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_a_classification_run_without_its_label_names_is_refused(run, tmp_path):
    """The head's size and label order come from metrics.json; without them no base can be rebuilt."""
    import dataclasses

    from qlora.merge import merge

    recipe = dataclasses.replace(run.recipe, task="classification")
    with pytest.raises(QLoraError, match=r"metrics.json: a classification run without its label names \(data.labels\)"):
        merge(dataclasses.replace(run, recipe=recipe), tmp_path / "m")


@pytest.mark.slow
def test_cli_merge_prints_the_check_and_saves_a_loadable_model(run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "qlora.merge", str(run.out_dir), "--to", str(tmp_path / "M"), "--dtype", "bfloat16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    match = re.search(r"max \|logit diff\| (\S+), logit scale \(max \|logit\|\) (\S+): (\S+) %", result.stdout)
    assert match and float(match.group(3)) < 2.0, result.stdout
    config = json.loads((Path(tmp_path / "M") / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
