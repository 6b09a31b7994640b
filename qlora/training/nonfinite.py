"""Stop at a non-finite loss instead of training on (and saving) NaN weights.

An fp16 overflow (T4) or too high a learning rate makes the loss NaN/inf; one optimizer step on its
gradients spreads NaN into every adapter weight. Checked once per optimizer step, just before it:

- the loss: a forward hook on the model records whether any micro-batch of the step had a
  non-finite `loss` in its output (kept on the device, read once per step);
- the gradients, unless an fp16 grad scaler is at work: without one, a non-finite gradient is as
  bad as a non-finite loss; with one, an overflowing gradient under a finite loss is routine (the
  scaler skips that step and lowers its scale), so only the loss counts.

The gradient norm is computed here although transformers' Trainer computes it too (for clipping, or
with an infinite bound when clipping is off), just before `on_pre_optimizer_step`: the Trainer keeps it
in a local variable and hands it to callbacks only through `on_log` (`logs["grad_norm"]`), after the
optimizer step and on logging steps only; `on_pre_optimizer_step` gets neither the norm nor the trainer
(transformers 5, checked on 5.24). That is too late to skip the step, so the check takes the norm once
more with torch's `get_total_norm` (one fused reduction, one sync). Clipping by a non-finite norm leaves
NaN gradients behind, so the figure after the Trainer's clipping says the same as the one before it.

With more than one process each one judges its own loss and gradients, and the verdict is OR-ed over
all of them (`qlora.training.distributed.any_process`): every process skips, or stops at, the same
step, so none waits in a collective for one that has stopped.

Under DeepSpeed ZeRO-3 the gradients are DeepSpeed's (no `p.grad`) and its engine steps inside backward
(accelerate's wrapper), so only the loss is checked and a bad step cannot be skipped (the recipe refuses
`max_nonfinite_steps` > 0 there): training stops at it, and its update is never saved.

A bad step is skipped (its gradients dropped, as the fp16 scaler does); after
`training.max_nonfinite_steps` skipped steps (default 0: at the first one) training stops without
saving, so the last checkpoint written is the last good one, and the run exits with
`ExitCode.NONFINITE` (5) and what to try.
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from qlora.training.distributed import any_process

log = logging.getLogger(__name__)

ADVICE = (
    "try quantization.compute_dtype=bfloat16 where the GPU supports it (fp16 overflows), a lower "
    "training.learning_rate, or a smaller training.max_grad_norm"
)


def gradients_finite(model) -> bool:
    """Whether every gradient the optimizer is about to apply is finite (one reduction, one sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0)).item())


class LossWatch:
    """A forward hook that remembers whether a training forward returned a non-finite loss."""

    def __init__(self):
        self.bad = None  # a bool tensor on the loss's device, or None when no loss was seen this step
        self.handle = None

    def attach(self, model) -> None:
        self.handle = model.register_forward_hook(self.hook)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def hook(self, module, args, output) -> None:
        loss = getattr(output, "loss", None)
        if module.training and isinstance(loss, torch.Tensor):
            bad = ~torch.isfinite(loss.detach()).all()
            self.bad = bad if self.bad is None else self.bad | bad

    def take(self) -> bool | None:
        """True/False for this step's losses (None when the model returned none), then forget them."""
        seen, self.bad = self.bad, None
        return None if seen is None else bool(seen.item())


def step_is_bad(watch: LossWatch, model, optimizer) -> bool:
    """The check described above, for the optimizer step about to run, as this process sees it."""
    loss_bad = watch.take()
    if loss_bad:
        return True
    if getattr(optimizer, "scaler", None) is not None:  # fp16 with a grad scaler: overflow is its business
        return False
    return model is not None and not gradients_finite(model)


class StopOnNonFinite(TrainerCallback):
    """Skips up to `max_skipped` non-finite steps (their update dropped), then stops training."""

    stopped_at: int | None = None
    skipped = 0

    def __init__(self, max_skipped: int = 0):
        self.max_skipped = max_skipped
        self.watch = LossWatch()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.watch.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.watch.detach()

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if not any_process(step_is_bad(self.watch, model, optimizer)):  # every process, every step
            return control
        for p in model.parameters() if model is not None else []:  # no update from this step
            p.grad = None  # (AdamW, paged or not, skips parameters without a gradient)
        step = state.global_step + 1
        if self.skipped < self.max_skipped:
            self.skipped += 1
            log.warning(
                f"warning: non-finite loss or gradients at step {step}: step skipped "
                f"({self.skipped} of training.max_nonfinite_steps={self.max_skipped})"
            )
            return control
        self.stopped_at = step
        control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # never checkpoint the step that went wrong
            control.should_save = False
            control.should_evaluate = False
        return control


def stop_on_nonfinite_callback(max_skipped: int = 0) -> StopOnNonFinite:
    """The Trainer callback that skips up to `max_skipped` non-finite steps, then stops training."""
    return StopOnNonFinite(max_skipped)
