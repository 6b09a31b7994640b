"""A NaN loss stops training at that step (exit 5), keeps the last good checkpoint, and says what to try."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qlora.checkpoints import damage
from qlora.nonfinite import NONFINITE_EXIT_CODE
from qlora.recipe import recipe_from_mapping
from qlora.run_lock import LOCK_NAME


def short_recipe(model_dir, data_file, out, *overrides):
    data = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data_file), "max_seq_len": 200, "eval_size": 4},
        "training": {"max_steps": 6, "batch_size": 4, "grad_accum": 1, "learning_rate": 1e-3, "save_steps": 2,
                     "logging_steps": 1},
        "output_dir": str(out),
    }
    return recipe_from_mapping(data, list(overrides))


def nan_loss_at(monkeypatch, bad_steps):
    """Make the loss NaN while the Trainer computes these optimizer steps (1-based)."""
    import transformers

    original = transformers.Trainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        result = original(self, model, inputs, *args, **kwargs)
        if self.model.training and self.state.global_step + 1 in bad_steps:
            if isinstance(result, tuple):
                return (result[0] * float("nan"), *result[1:])
            return result * float("nan")
        return result

    monkeypatch.setattr(transformers.Trainer, "compute_loss", compute_loss)


def test_nan_loss_stops_keeps_last_good_checkpoint_and_advises(tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys):
    from qlora.train import train

    out = tmp_path / "nan"
    nan_loss_at(monkeypatch, {4})
    with pytest.raises(SystemExit) as info:
        train(short_recipe(tiny_llama, alpaca_file, out))
    assert info.value.code == NONFINITE_EXIT_CODE
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert damage(out / "checkpoints" / "checkpoint-2") is None
    weights = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists() and not (out / LOCK_NAME).exists()
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if l.startswith("error:"))
    assert line.startswith("error: non-finite loss (NaN/inf) at step 4: training stopped, the last good checkpoint "
                           "(checkpoint-2) is kept; try quantization.compute_dtype=bfloat16")
    assert "training.learning_rate" in line and "training.max_grad_norm" in line


def test_skipped_nonfinite_steps_leave_weights_finite(tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys):
    from qlora.train import train

    out = tmp_path / "skip"
    nan_loss_at(monkeypatch, {3})
    metrics = train(short_recipe(tiny_llama, alpaca_file, out, "training.max_nonfinite_steps=1"))
    assert metrics["train_steps"] == 6
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert "warning: non-finite loss or gradients at step 3: step skipped (1 of training.max_nonfinite_steps=1)" in capsys.readouterr().err


def test_max_nonfinite_steps_must_not_be_negative():
    from qlora.errors import QLoraError

    with pytest.raises(QLoraError, match="training.max_nonfinite_steps: must be >= 0, got -1"):
        short_recipe("m", "d", "o", "training.max_nonfinite_steps=-1")

