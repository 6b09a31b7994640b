"""Which attention implementation a model runs (recipe key `model.attn_implementation`).

`auto` (the default) asks transformers which implementations the family's model class supports (its
`_supports_sdpa` / `_supports_flex_attn` / `_supports_flash_attn` flags, the ones its own dispatch checks) and
takes the first that trains on the device: sdpa (fused, no scores kept), then flex attention on a GPU (fused,
applies Gemma 2's score soft-capping and gpt-oss's sinks, but has no backward on the CPU), then eager. An
explicit choice the family or the device cannot run is a one-line error. Training (`qlora.model.load`) and the
profiler (`qlora.memory.estimate`) both decide here, so the profiler counts what training runs.
"""

from __future__ import annotations

from qlora.config.errors import QLoraError

# What transformers 5 offers that trains offline: kernels-hub names ("kernels-community/...") need the network.
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3")
AUTO_ORDER = ("sdpa", "flex_attention", "eager")
FLAGS = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn", "flash_attention": "_supports_flash_attn"}


def supported_attention(model_class) -> tuple[str, ...]:
    """The implementations transformers lets `model_class` run (eager always), from its class flags."""
    names = [name for name, flag in FLAGS.items() if getattr(model_class, flag, False) and name != "flash_attention"]
    if getattr(model_class, "_supports_flash_attn", False):
        names += ["flash_attention_2", "flash_attention_3"]
    return (*names, "eager")


def model_class(config, task: str = "causal_lm"):
    """The class `from_pretrained` builds for `config` (None for remote code that transformers does not ship)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    )

    mapping = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING if task == "classification" else MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        return mapping[type(config)]
    except KeyError:
        return None


def unavailable(name: str, device: str, check_installed: bool) -> str | None:
    """Why `name` cannot train on `device` whatever the model (None when it can). `check_installed`: look for the
    flash-attn package (training here); the profiler, planning for a GPU, does not."""
    if name == "flex_attention" and device == "cpu":
        return "flex attention has no backward on the CPU"
    if name.startswith("flash_attention"):
        if device == "cpu":
            return f"{name} needs a CUDA GPU"
        if check_installed:
            from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available

            if not (is_flash_attn_2_available if name.endswith("2") else is_flash_attn_3_available)():
                return f"{name} needs the flash-attn package (`pip install flash-attn`)"
    return None


def choose_attention(
    architecture: str, supported: tuple[str, ...] | None, requested: str, device: str, check_installed: bool = True
) -> tuple[str, str]:
    """(implementation, why): `requested` checked against what the class `architecture` supports (`supported`,
    None when unknown: transformers' default, sdpa) and the device, or chosen for `auto`."""
    if supported is None:
        supported = ("sdpa", "eager")
    if requested != "auto":
        if requested not in supported:
            raise QLoraError(
                f"model.attn_implementation: {architecture} does not support '{requested}' in transformers "
                f"(it supports {', '.join(supported)}); use auto or one of those"
            )
        reason = unavailable(requested, device, check_installed)
        if reason:
            raise QLoraError(f"model.attn_implementation: '{requested}' cannot train here: {reason}; use auto or sdpa")
        return requested, "as the recipe says"
    passed = []
    for name in AUTO_ORDER:
        if name not in supported:
            passed.append(f"{architecture} does not support {name}")
            continue
        reason = unavailable(name, device, check_installed)
        if reason:
            passed.append(reason)
            continue
        return name, "; ".join(passed) if passed else f"the fused kernel {architecture} supports"
    raise AssertionError("eager is always supported")


def describe_choice(name: str, why: str) -> str:
    """The one line training prints about `auto`."""
    return f"model.attn_implementation: auto -> {name} ({why})"
