"""Long context on one GPU: the recipe keys `training.mlp_tiles` and `training.offload_checkpoints`.

- `training.mlp_tiles: auto | 1 | N`: each decoder layer's MLP runs over N tiles of tokens and is
  recomputed tile by tile in backward (`qlora.tiled_mlp`). `auto` picks, per call,
  `ceil(tokens / max(hidden, 4096))` tiles (Arctic Long Sequence Training's ceil(tokens / hidden),
  with a floor): a tile has at most `hidden` tokens on a model with hidden >= 4096, so its
  `tokens x intermediate` tensors are no larger than one MLP weight, the size of the dequantized
  weight a 4-bit layer's backward makes anyway. Up to 4,096 tokens (or `hidden`) nothing is tiled:
  there the MLP's terms are a few hundred MiB at most on an 8B model, and the extra forward a tiled
  MLP costs (three instead of two under checkpointing) would buy nothing; small models (the demo,
  tests) are never slowed by tiles they do not need.
- `training.offload_checkpoints: false | true | auto`: under gradient checkpointing the input kept
  for each layer's recompute lives in host RAM. `auto` offloads only when the profiler predicts
  that the run does not fit the GPU otherwise.

Offload uses `torch.autograd.graph.save_on_cpu` around each checkpointed layer (what transformers'
`activation_checkpointing_enable(offload=True)` installs). Checked on torch 2.13 with non-reentrant
checkpointing: the outer saved-tensor hooks see exactly one tensor per layer, the layer input the
checkpoint keeps for its recompute (`_CheckpointFrame.save_inputs`); everything saved inside the
layer goes to the checkpoint's own hooks and is recomputed. So the hooks move precisely the
"layer inputs kept by checkpointing" term and nothing else; the copy to pinned memory is
asynchronous on the compute stream. torchtune's stream-overlapped hooks would also overlap the
copy with compute, but offload every saved tensor (they are written for the whole forward) and
add a dependency for a few percent of a long-context step. transformers' own `offload=True` is not
called because it always asks for pinned memory, which a machine without a GPU cannot give: the
same hooks are installed here with pinning only where CUDA is, so CPU tests run this very path.
"""

from __future__ import annotations

import functools
import math
import sys

OFFLOAD_CHOICES = (False, True, "auto")
AUTO_TILE_TOKENS = 4096  # `mlp_tiles: auto`: the fewest tokens per tile (hidden when larger)


def check_keys(mlp_tiles, offload, gradient_checkpointing: bool) -> None:
    """Recipe validation of the two keys: one-line errors naming the key."""
    from qlora.errors import QLoraError

    if not (mlp_tiles == "auto" or (isinstance(mlp_tiles, int) and not isinstance(mlp_tiles, bool) and mlp_tiles >= 1)):
        raise QLoraError(f"training.mlp_tiles: expected auto or an integer >= 1, got {mlp_tiles!r}")
    if offload not in OFFLOAD_CHOICES or (offload in (0, 1) and not isinstance(offload, bool)):
        raise QLoraError(f"training.offload_checkpoints: expected false, true or auto, got {offload!r}")
    if offload is True and not gradient_checkpointing:
        raise QLoraError("training.offload_checkpoints: true needs training.gradient_checkpointing=true "
                         "(it moves the layer inputs that checkpointing keeps)")


def mlp_tiles_for(setting, tokens: int, hidden: int) -> int:
    """How many tiles the MLP uses for a call with `tokens` tokens (1: untiled)."""
    if setting == "auto":
        return max(1, math.ceil(tokens / max(hidden, AUTO_TILE_TOKENS)))
    return max(1, min(int(setting), tokens))


def apply_long_context(model, recipe, *, force_offload: bool = False) -> None:
    """Install what `recipe.training` asks for on a built (LoRA-wrapped) model.

    `force_offload`: offload even on a CPU (host and device are one there, so it saves nothing):
    lets tests run the hook path and compare adapters with and without it.
    """
    t = recipe.training
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if t.mlp_tiles != 1:
        from qlora.tiled_mlp import decoder_mlps, tile_mlp

        hidden = base.config.get_text_config().hidden_size
        for mlp in decoder_mlps(base):
            tile_mlp(mlp, functools.partial(mlp_tiles_for, t.mlp_tiles, hidden=hidden))
    if t.gradient_checkpointing and (force_offload or wants_offload(recipe)):
        offload_checkpoints(base)


def wants_offload(recipe) -> bool:
    """`true` on a GPU; `auto` when the profiler's plan does not fit this GPU without offload."""
    import torch

    choice = recipe.training.offload_checkpoints
    if choice is False:
        return False
    if not torch.cuda.is_available():
        if choice is True:
            print("training.offload_checkpoints: no GPU, so nothing to offload (activations are in host RAM already)", file=sys.stderr)
        return False
    if choice is True:
        return True
    return not _fits_without_offload(recipe, torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def _fits_without_offload(recipe, gpu_bytes: int) -> bool:
    from qlora.profile.estimate import estimate
    from qlora.profile.settings import from_recipe

    model, method, settings = from_recipe(recipe)
    predicted = estimate(model, method, settings.replace(offload_checkpoints=False))
    fits = predicted.total <= gpu_bytes
    print(f"training.offload_checkpoints: auto: predicted {predicted.total / 2**30:.2f} GiB without offload on a "
          f"{gpu_bytes / 2**30:.2f} GiB GPU, so {'no offload' if fits else 'the checkpointed layer inputs go to host RAM'}",
          file=sys.stderr)
    return fits


def offload_checkpoints(model) -> None:
    """Every checkpointed layer keeps its input in host RAM (pinned where a GPU is) until its recompute."""
    import torch

    pin = torch.cuda.is_available()

    def checkpoint_on_host(function, *args, **kwargs):
        with torch.autograd.graph.save_on_cpu(pin_memory=pin):
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)

    # transformers' `_set_gradient_checkpointing` sets this attribute on the same modules.
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module._gradient_checkpointing_func = checkpoint_on_host
