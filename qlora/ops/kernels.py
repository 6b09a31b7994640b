"""Fused decoder kernels on CUDA (`training.kernels: auto`): Liger Kernel's RMSNorm, SwiGLU and RoPE.

They are installed the way Liger documents for a model family (`apply_liger_kernel_to_<family>` without a
model): transformers' classes are swapped before the model is built, so every layer is built with them and
no instance is patched (Liger's instance patching binds methods that hold their module: a reference cycle).
Its fused linear cross-entropy is left off here: the chunked loss (qlora.ops.loss) calls it itself.

With the tiled MLP, the SwiGLU MLP is the class each tile runs (`TiledMLP` runs its MLP class's forward),
so the two combine: one tile's fused gate/up product at a time. The kernels run on CUDA only (Triton).
"""

from __future__ import annotations

import functools
import inspect
import logging

log = logging.getLogger(__name__)


@functools.cache
def apply_decoder_kernels(model_type: str) -> bool:
    """Swap in Liger's RMSNorm, SwiGLU and RoPE for `model_type` (once per process); False when Liger is not
    installed or has no kernels for that family."""
    try:
        from liger_kernel.transformers.monkey_patch import (
            MODEL_TYPE_TO_APPLY_LIGER_FN,
        )  # CUDA-only, optional dependency
    except ImportError:
        log.info(
            "training.kernels: auto: Liger Kernel is not installed, so the decoder runs transformers' own RMSNorm, "
            "SwiGLU and RoPE; pip install 'qlora-kit[kernels]'"
        )
        return False
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        log.info(f"training.kernels: auto: Liger Kernel has no fused kernels for '{model_type}' models")
        return False
    wanted = {
        "rope": True,
        "rms_norm": True,
        "swiglu": True,
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
    }
    apply(**{key: value for key, value in wanted.items() if key in inspect.signature(apply).parameters})
    return True
