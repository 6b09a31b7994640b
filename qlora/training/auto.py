"""The recipe's `auto` keys, decided once before the model loads by asking the profiler (qlora.memory);
the components below get plain values."""

from __future__ import annotations

import dataclasses
import logging

import torch

from qlora.config.gpus import parse_gpu_memory
from qlora.memory.estimate import estimate_recipe, settings_inventory
from qlora.memory.flops import recompute_saved_pct
from qlora.memory.planner import fewest_checkpointed_layers
from qlora.memory.settings import from_recipe
from qlora.ops.loss import fused_kernel_installed

log = logging.getLogger(__name__)


def gpu_bytes() -> int | None:
    """Memory of this process's GPU (what a plan must fit), None without one."""
    return (
        torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        if torch.cuda.is_available()
        else None
    )


def wants_offload(recipe) -> bool:
    """`training.offload_checkpoints`: `true` on a GPU; `auto` when the profiler predicts that the run does not
    fit this GPU without offload."""
    choice = recipe.training.offload_checkpoints
    if choice is False:
        return False
    if not torch.cuda.is_available():
        if choice is True:
            log.info(
                "training.offload_checkpoints: no GPU, so nothing to offload (activations are in host RAM already)"
            )
        return False
    return choice is True or not fits_without_offload(recipe, gpu_bytes())


def fits_without_offload(recipe, gpu: int) -> bool:
    training = dataclasses.replace(recipe.training, offload_checkpoints=False)
    predicted = estimate_recipe(dataclasses.replace(recipe, training=training))
    fits = predicted.total <= gpu
    log.info(
        f"training.offload_checkpoints: auto: predicted {predicted.total / 2**30:.2f} GiB without offload on a "
        f"{gpu / 2**30:.2f} GiB GPU, so {'no offload' if fits else 'the checkpointed layer inputs go to host RAM'}"
    )
    return fits


def resolve_kernels(recipe):
    """`training.kernels: auto` on a GPU without Liger Kernel -> 'none', said in one line (what is lost, how to get
    it), so that the profiler's answers for this run (checkpointing, offload, OOM advice) model what runs."""
    if recipe.training.kernels != "auto" or not torch.cuda.is_available() or fused_kernel_installed():
        return recipe
    log.info(
        "training.kernels: auto: Liger Kernel is not installed, so transformers' RMSNorm, SwiGLU and RoPE and the "
        "torch chunked loss run (slower: 1.45 s instead of 1.14 s per 8B step of 2 x 2,048 tokens on an H200, and "
        "more activation memory); pip install 'qlora-kit[kernels]'"
    )
    return dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, kernels="none"))


def resolve_checkpointing(recipe):
    """`training.gradient_checkpointing: auto` -> the fewest (first) decoder layers whose predicted peak fits the
    recipe's `target_gpu`, else the GPU this process runs on, else (neither known) every layer; said in one line.
    Other values pass through. Returns the recipe to train."""
    if recipe.training.gradient_checkpointing != "auto":
        return recipe
    gpu = parse_gpu_memory(recipe.target_gpu, "target_gpu") if recipe.target_gpu else gpu_bytes()
    model, method, settings = from_recipe(recipe)
    inv = settings_inventory(model, settings)
    layers = inv.dims.layers if gpu is None else fewest_checkpointed_layers(inv, method, settings, gpu)
    chosen = dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, gradient_checkpointing=layers))
    saved = recompute_saved_pct(inv, settings.seq_len, method, layers)
    where = (
        "no GPU size known (target_gpu or a GPU), so every layer"
        if gpu is None
        else f"the fewest that fit {gpu / 2**30:.2f} GiB"
    )
    log.info(
        f"training.gradient_checkpointing: auto: {layers} of {inv.dims.layers} decoder layers checkpointed ({where}); "
        f"recompute saved: {saved:.1f} % of the step's FLOPs"
    )
    return chosen
