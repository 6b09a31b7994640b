"""The memory profiler: what a training step of full FT, LoRA or QLoRA holds, component by component.

The names below are imported lazily (by function), so `import qlora.profile` costs nothing until
a profile is asked for: the trainer imports `plan_fit` only to explain an out-of-memory error.
"""

from __future__ import annotations


def estimate_recipe(recipe):
    """Predicted peak (`Estimate`) of what `recipe` trains, for its own method and settings, on a GPU."""
    from qlora.profile.estimate import estimate_recipe as _estimate_recipe

    return _estimate_recipe(recipe)


def plan_fit(recipe, gpu_bytes: int):
    """`FitPlan` of `recipe` on a GPU of `gpu_bytes`; `.advice()` says what fits and what to change."""
    from qlora.profile.planner import plan_fit as _plan_fit

    return _plan_fit(recipe, gpu_bytes)


def merge_memory_bytes(model, dtype: str = "bfloat16", bits: int | None = 4, double_quant: bool = True):
    """`MergeMemory` (GPU bytes for `qlora merge`: whole model / layer by layer) of `model` in `dtype`."""
    from qlora.merge_memory import merge_memory_bytes as _merge_memory_bytes

    return _merge_memory_bytes(model, dtype, bits, double_quant)
