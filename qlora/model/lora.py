"""LoRA on the frozen base: which linear layers and expert stacks get adapters, attaching them (peft), their dtype."""

from __future__ import annotations

import functools
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers.pytorch_utils import Conv1D

from qlora.config.architecture import (
    CLASSIFIER_HEADS,
    expert_target_names,
    lora_target_names,
    peft_remapped_names,
)
from qlora.config.errors import QLoraError
from qlora.config.precision import ADAPTER_DTYPE
from qlora.config.recipe import LoraSpec
from qlora.ops.experts import (
    ExpertLora,
    expert_parameter_names,
    experts_as_placeholders,
    is_experts_module,
    packed_expert_codes,
)

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


def expert_stacks(model) -> dict[str, list[str]]:
    """{experts module path: its fused weight stacks}, e.g. {'model.layers.0.mlp.experts': ['gate_up_proj', ...]}."""
    return {name: expert_parameter_names(m) for name, m in model.named_modules() if is_experts_module(m)}


def lora_target_modules(model, targets: str | list[str]) -> list[str]:
    """Resolve `lora.targets` (a preset or names) against the model's own linear layers (the profiler applies
    the same rule, `lora_target_names`, to its meta-device inventory)."""
    leaves = {leaf for stacks in expert_stacks(model).values() for leaf in stacks}
    names = lora_target_names(linear_leaf_names(model), output_head_names(model), targets, leaves)
    remapped = sorted(set(names) & peft_remapped_names(getattr(model.config, "model_type", "")))
    if remapped:
        log.info(
            f"lora: {', '.join(remapped)} not adapted on this model's dense/shared MLP: peft maps these names to its "
            "fused experts (which qlora adapts as expert stacks)"
        )
    return [name for name in names if name not in remapped]


def lora_target_parameters(model, targets: str | list[str]) -> list[str]:
    """Full paths of the expert stacks `lora.targets` adapts (peft's `target_parameters`; full paths because
    peft matches a parametrized, i.e. 4-bit, parameter by its exact path)."""
    leaves = {leaf for stacks in expert_stacks(model).values() for leaf in stacks}
    chosen = set(expert_target_names(leaves, targets))
    return [f"{path}.{leaf}" for path, stacks in expert_stacks(model).items() for leaf in stacks if leaf in chosen]


def attach_lora(model, spec: LoraSpec, task: str = "causal_lm"):
    """Wrap the frozen base with LoRA adapters; only adapter (and a new classifier head) train.

    Expert stacks are adapted through peft's `target_parameters` (so the adapter is plain peft), which peft
    refuses with `lora_dropout` != 0: the config peft saves says 0 and the dropout is put back by
    `use_split_expert_lora` on every target, experts included (qlora's split LoRA drops the routed tokens).
    """
    parameters = lora_target_parameters(model, spec.targets)
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=0.0 if parameters else spec.dropout,
        target_modules=lora_target_modules(model, spec.targets),
        # GPT-2's Conv1D stores its weight as (in, out); peft transposes it when told (a 4- or 8-bit load has
        # already turned those layers into bitsandbytes' Linear, which is not transposed).
        fan_in_fan_out=any(isinstance(module, Conv1D) for module in model.modules()),
        target_parameters=parameters or None,
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        modules_to_save=[n for n in CLASSIFIER_HEADS if hasattr(model, n)] if task == "classification" else None,
    )
    # autocast_adapter_dtype keeps LoRA weights in fp32 even on a 16-bit base (precision.ADAPTER_DTYPE).
    with quiet_peft_deprecations(), experts_as_placeholders(model):
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    if parameters:
        use_split_expert_lora(peft_model, spec.dropout)
        log.info(
            f"lora: {len(parameters)} expert stacks adapted (split LoRA on the routed tokens); lora.dropout "
            f"{spec.dropout} applies to every target, adapter_config.json records 0 (peft loads expert LoRA only so)"
        )
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


def load_adapter(base, adapter_dir: str):
    """A saved adapter on `base` as peft loads it (the expert stacks of a 4-bit base wrapped as on a 16-bit
    one, then routed through qlora's split LoRA)."""
    from peft import PeftModel

    with quiet_peft_deprecations(), experts_as_placeholders(base):
        model = PeftModel.from_pretrained(base, adapter_dir)
    use_split_expert_lora(model)
    return model


def active_expert_loras(wrapper) -> list[ExpertLora]:
    """The LoRA factors of a peft ParamWrapper that apply now (none when disabled or already merged)."""
    if wrapper.disable_adapters or wrapper.merged:
        return []
    return [
        ExpertLora(wrapper.lora_A[name].weight, wrapper.lora_B[name].weight, wrapper.scaling[name])
        for name in wrapper.active_adapters
        if name in wrapper.lora_A
    ]


def use_split_expert_lora(model, dropout: float = 0.0) -> int:
    """Route peft's expert LoRA through qlora's experts implementation (qlora.ops.experts): each peft
    ParamWrapper passes its call straight to the experts module, which applies A then B to the routed tokens.

    peft's own ParamWrapper forward parametrizes the stack as W + ΔW for every expert in every call: the
    4-bit stack dequantized and a second full-size ΔW, both kept for backward. Returns the stacks routed.
    Linear LoRA layers get `dropout` back (peft was given 0 for the reason in `attach_lora`).
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lora.layer import ParamWrapper

    count = 0
    for module in model.modules():
        if isinstance(module, ParamWrapper):
            experts = module.get_base_layer()
            experts.__dict__.setdefault("expert_lora", {})[module.parameter_name] = functools.partial(
                active_expert_loras, module
            )
            experts.__dict__["expert_lora_dropout"] = dropout
            module.__class__ = pass_through_wrapper_class()
            count += 1
        elif isinstance(module, LoraLayer) and dropout:
            for name in module.lora_dropout:
                module.lora_dropout[name] = torch.nn.Dropout(p=dropout)
    return count


def _pass_through(self, x, *args, **kwargs):
    return self.base_layer(x, *args, **kwargs)


@functools.cache
def pass_through_wrapper_class():
    """peft's ParamWrapper whose call goes straight to the experts module (built on first use: importing
    qlora.model must not import peft). A subclass, so save, merge and unload stay peft's own."""
    from peft.tuners.lora.layer import ParamWrapper

    return type("PassThroughParamWrapper", (ParamWrapper,), {"forward": _pass_through})


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
    # peft unpacks bitsandbytes' Params4bit only; a 4-bit expert stack's codes are plain uint8 (two per byte)
    total += sum(packed.numel() for packed in packed_expert_codes(model))
    return int(trainable), int(total)
