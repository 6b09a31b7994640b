"""The recipe's `auto` keys, decided once before the model loads by asking the profiler (qlora.memory);
the components below get plain values."""

from __future__ import annotations

import dataclasses
import sys

import torch

from qlora.memory.estimate import estimate_recipe


def gpu_bytes() -> int | None:
    """Memory of this process's GPU (what a plan must fit), None without one."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if torch.cuda.is_available() else None


def wants_offload(recipe) -> bool:
    """`training.offload_checkpoints`: `true` on a GPU; `auto` when the profiler predicts that the run does not
    fit this GPU without offload."""
    choice = recipe.training.offload_checkpoints
    if choice is False:
        return False
    if not torch.cuda.is_available():
        if choice is True:
            print("training.offload_checkpoints: no GPU, so nothing to offload (activations are in host RAM already)", file=sys.stderr)
        return False
    return choice is True or not fits_without_offload(recipe, gpu_bytes())


def fits_without_offload(recipe, gpu: int) -> bool:
    training = dataclasses.replace(recipe.training, offload_checkpoints=False)
    predicted = estimate_recipe(dataclasses.replace(recipe, training=training))
    fits = predicted.total <= gpu
    print(f"training.offload_checkpoints: auto: predicted {predicted.total / 2**30:.2f} GiB without offload on a "
          f"{gpu / 2**30:.2f} GiB GPU, so {'no offload' if fits else 'the checkpointed layer inputs go to host RAM'}",
          file=sys.stderr)
    return fits
