"""LoRA on the frozen base: which linear layers get adapters, attaching them (peft), their dtype."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers.pytorch_utils import Conv1D

from qlora.config.architecture import CLASSIFIER_HEADS, lora_target_names
from qlora.config.errors import QLoraError
from qlora.config.precision import ADAPTER_DTYPE
from qlora.config.recipe import LoraSpec

log = logging.getLogger(__name__)


def linear_leaf_names(model) -> set[str]:
    """Leaf names of every linear layer (plain, 4-bit or 8-bit, or GPT-2's transposed `Conv1D`, as peft's
    all-linear counts it), e.g. {'q_proj', 'down_proj', 'lm_head'}."""
    kinds = (torch.nn.Linear, Conv1D, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds)}


def output_head_names(model) -> set[str]:
    """Leaf names of the output head(s): the LM head or a classifier, which LoRA must not wrap."""
    heads = {name for name in CLASSIFIER_HEADS if hasattr(model, name)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads.update(
        name.rsplit(".", 1)[-1] for name, module in model.named_modules() if output is not None and module is output
    )
    return heads


def lora_target_modules(model, targets: str | list[str]) -> list[str]:
    """Resolve `lora.targets` (a preset or names) against the model's own linear layers (the profiler applies
    the same rule, `lora_target_names`, to its meta-device inventory)."""
    return lora_target_names(linear_leaf_names(model), output_head_names(model), targets)


def attach_lora(model, spec: LoraSpec, task: str = "causal_lm"):
    """Wrap the frozen base with LoRA adapters; only adapter (and a new classifier head) train."""
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=lora_target_modules(model, spec.targets),
        # GPT-2's Conv1D stores its weight as (in, out); peft transposes it when told (a 4- or 8-bit load has
        # already turned those layers into bitsandbytes' Linear, which is not transposed).
        fan_in_fan_out=any(isinstance(module, Conv1D) for module in model.modules()),
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        modules_to_save=[n for n in CLASSIFIER_HEADS if hasattr(model, n)] if task == "classification" else None,
    )
    # autocast_adapter_dtype keeps LoRA weights in fp32 even on a 16-bit base (precision.ADAPTER_DTYPE).
    with quiet_peft_deprecations():
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    upcast_trainable(peft_model)
    return peft_model


def adapter_folder(spec, announce: bool = True) -> Path | None:
    """`model.adapter` as the adapter folder to continue (a run folder means its adapter/), or None.

    Missing: an error naming the key, or None with a note under `model.adapter_optional` (the DPO demo
    before the SFT demo has run)."""
    if not spec.adapter:
        return None
    path = Path(spec.adapter).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    if spec.adapter_optional and not path.exists():
        if announce:
            log.info(
                f"note: model.adapter {spec.adapter} does not exist yet: training a new adapter from the base "
                "(its reference is the base alone)"
            )
        return None
    what = "not found" if not path.exists() else "holds no adapter_config.json (nor adapter/adapter_config.json)"
    raise QLoraError(f"model.adapter: {spec.adapter} {what}; give an adapter folder or a qlora run folder")


def continue_adapter(model, folder: Path, task: str = "causal_lm"):
    """The base with a trained adapter loaded to train further (peft's `is_trainable`), fp32 like a new one.

    A LoRA adapter on a 4-bit base is continued, never merged into it (merging rounds the update away)."""
    from peft import PeftModel

    with quiet_peft_deprecations():
        peft_model = PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    upcast_trainable(peft_model)
    return peft_model


@contextmanager
def quiet_peft_deprecations():
    """peft still reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model; the
    FutureWarning is theirs to fix and says nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def upcast_trainable(model) -> None:
    """Every trained tensor in fp32 (precision.ADAPTER_DTYPE), the classifier head's copy included.

    peft's `autocast_adapter_dtype` covers the LoRA layers only: a `modules_to_save` head is copied
    in the base's 16-bit dtype, where small updates round away, and under fp16 mixed precision
    the gradient scaler refuses fp16 gradients ("Attempting to unscale FP16 gradients").
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != ADAPTER_DTYPE:
            param.data = param.data.to(ADAPTER_DTYPE)


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting a 4-bit weight as its unpacked element count."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)
