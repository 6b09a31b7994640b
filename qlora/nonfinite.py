"""Stop at a non-finite loss instead of training on (and saving) NaN weights.

An fp16 overflow (T4) or too high a learning rate makes the loss NaN/inf; its gradients are then
non-finite too, and one optimizer step would spread NaN into every adapter weight. The check runs
on the gradients just before each optimizer step (the Trainer hands callbacks the model, not the
loss; a non-finite loss always gives non-finite gradients). A bad step is skipped (its gradients
dropped, as the fp16 grad scaler does); after `training.max_nonfinite_steps` skipped steps (default
0: the first one) training stops without saving, so the last checkpoint written is the last good
one, and the run exits with `NONFINITE_EXIT_CODE` (5) and what to try.
"""

from __future__ import annotations

import sys

NONFINITE_EXIT_CODE = 5
ADVICE = ("try quantization.compute_dtype=bfloat16 where the GPU supports it (fp16 overflows), a lower "
          "training.learning_rate, or a smaller training.max_grad_norm")


def gradients_finite(model) -> bool:
    """Whether every gradient the optimizer is about to apply is finite (one reduction, one sync)."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0)).item())


def stop_on_nonfinite_callback(max_skipped: int = 0):
    """The Trainer callback that skips up to `max_skipped` non-finite steps, then stops training."""
    from transformers import TrainerCallback

    class StopOnNonFinite(TrainerCallback):
        stopped_at: int | None = None
        skipped = 0

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if model is None or gradients_finite(model):
                return control
            for p in model.parameters():  # no update from this step (AdamW skips parameters without grads)
                p.grad = None
            step = state.global_step + 1
            if self.skipped < max_skipped:
                self.skipped += 1
                print(f"warning: non-finite loss or gradients at step {step}: step skipped "
                      f"({self.skipped} of training.max_nonfinite_steps={max_skipped})", file=sys.stderr)
                return control
            self.stopped_at = step
            control.should_training_stop = True
            return control

        def on_step_end(self, args, state, control, **kwargs):
            if self.stopped_at is not None:  # never checkpoint the step that went wrong
                control.should_save = False
                control.should_evaluate = False
            return control

    return StopOnNonFinite()
