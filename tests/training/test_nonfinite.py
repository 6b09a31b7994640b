"""A NaN loss stops training at that step (exit 5), keeps the last good checkpoint, and says what to try."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from qlora.config.errors import ExitCode
from qlora.config.recipe import recipe_from_mapping
from qlora.training.checkpoints import damage
from qlora.training.lock import LOCK_NAME


def short_recipe(model_dir, data_file, out, *overrides):
    data = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data_file), "max_seq_len": 200, "eval_size": 4},
        "training": {
            "max_steps": 6,
            "batch_size": 4,
            "grad_accum": 1,
            "learning_rate": 1e-3,
            "save_steps": 2,
            "logging_steps": 1,
        },
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
    from qlora.training.run import train

    out = tmp_path / "nan"
    nan_loss_at(monkeypatch, {4})
    with pytest.raises(SystemExit) as info:
        train(short_recipe(tiny_llama, alpaca_file, out))
    assert info.value.code == ExitCode.NONFINITE
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert damage(out / "checkpoints" / "checkpoint-2") is None
    weights = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists() and not (out / LOCK_NAME).exists()
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if l.startswith("error:"))
    assert line.startswith(
        "error: non-finite loss (NaN/inf) at step 4: training stopped, the last good checkpoint "
        "(checkpoint-2) is kept; try quantization.compute_dtype=bfloat16"
    )
    assert "training.learning_rate" in line and "training.max_grad_norm" in line


def test_skipped_nonfinite_steps_leave_weights_finite(tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys):
    from qlora.training.run import train

    out = tmp_path / "skip"
    nan_loss_at(monkeypatch, {3})
    metrics = train(short_recipe(tiny_llama, alpaca_file, out, "training.max_nonfinite_steps=1"))
    assert metrics["train_steps"] == 6
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert (
        "warning: non-finite loss or gradients at step 3: step skipped (1 of training.max_nonfinite_steps=1)"
        in capsys.readouterr().err
    )


def test_max_nonfinite_steps_must_not_be_negative():
    from qlora.config.errors import QLoraError

    with pytest.raises(QLoraError, match="training.max_nonfinite_steps: must be >= 0, got -1"):
        short_recipe("m", "d", "o", "training.max_nonfinite_steps=-1")


class TinyLM(torch.nn.Module):
    """A module whose forward returns a `.loss` the way transformers models do."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x, scale=1.0):
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(loss=self.linear(x).sum() * scale)


class Scaled:
    scaler = object()  # what accelerate's optimizer wrapper carries under fp16 grad scaling


def run_step(model, callback, loss_scale, grad_value, optimizer=None):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    state, control = TrainerState(), TrainerControl()
    model.train()
    model(torch.ones(1, 2), scale=loss_scale)
    for p in model.parameters():
        p.grad = torch.full_like(p, grad_value)
    callback.on_pre_optimizer_step(
        TrainingArguments(output_dir="unused", report_to="none"), state, control, model=model, optimizer=optimizer
    )
    return control.should_training_stop


@pytest.mark.parametrize(
    "loss_scale, grad_value, optimizer, stops",
    [
        (float("nan"), 1.0, None, True),  # a NaN loss
        (float("nan"), 1.0, Scaled(), True),  # a NaN loss, also under fp16 grad scaling
        (1.0, float("inf"), None, True),  # bf16/fp32: an inf gradient would poison the weights
        (1.0, float("inf"), Scaled(), False),  # fp16: an overflowing gradient is the scaler's routine, not a stop
        (1.0, 1.0, None, False),
    ],
)
def test_what_counts_as_a_nonfinite_step(loss_scale, grad_value, optimizer, stops):
    from qlora.training.nonfinite import stop_on_nonfinite_callback

    model, callback = TinyLM(), stop_on_nonfinite_callback(0)
    callback.on_train_begin(None, None, None, model=model)
    assert run_step(model, callback, loss_scale, grad_value, optimizer) is stops
    if stops:
        assert all(p.grad is None for p in model.parameters())  # the bad step changes nothing
    callback.on_train_end(None, None, None)
    assert callback.watch.handle is None


def test_skipping_non_finite_steps_is_refused_under_zero3():
    """DeepSpeed steps inside backward (accelerate's engine wrapper): no skip is possible, only the stop."""
    from qlora.config.errors import QLoraError

    with pytest.raises(
        QLoraError, match="^training.max_nonfinite_steps: DeepSpeed ZeRO-3 applies each optimizer step"
    ):
        short_recipe("m", "d", "o", "training.max_nonfinite_steps=2", "distributed.strategy=zero3")
    assert (
        short_recipe("m", "d", "o", "distributed.strategy=zero3").training.max_nonfinite_steps == 0
    )  # the stop stays
