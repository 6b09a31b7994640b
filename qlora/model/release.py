"""Dropping a 4-bit model frees its memory at once, not whenever Python's cyclic collector next runs.

bitsandbytes' `Linear4bit` and `Embedding4bit` give their weight a back-reference to the layer
(`Params4bit(..., module=self)`, so moving the weight can update the layer's quant_state). Each 4-bit layer
and its weight therefore form a reference cycle: plain reference counting never frees them, and the quantized
weights stay on the device until `gc` happens to run (never, with automatic collection off). `release` breaks
those back-references, after which dropping the last reference to the model frees every layer at once.
"""

from __future__ import annotations

import gc

import torch


def release(model: torch.nn.Module | None) -> None:
    """Break bitsandbytes' layer <-> weight cycles in `model` (call it when done with the model, then drop it).

    The model must not be used afterwards: a released 4-bit weight can no longer move to another device."""
    if model is None:
        return
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if getattr(param, "module", None) is module:
                param.module = None


def free_memory() -> None:
    """Return dropped models' memory before the next one loads or a measurement reads the allocator: cycles
    that are not bitsandbytes' (a Trainer and its callbacks) are collected, and CUDA's cached blocks returned."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
