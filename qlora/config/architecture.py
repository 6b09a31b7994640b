"""Names of model parts across the common decoder families (Llama, Mistral, Qwen2, Gemma, Phi-3, GPT-NeoX,
Falcon, GPT-2), shared by training (LoRA targets, the loss) and the profiler (its meta-device inventory),
so that both resolve `lora.targets` and the output head the same way."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from qlora.config.errors import QLoraError, did_you_mean

ATTENTION_NAMES = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "query_key_value",
    "c_attn",
    "dense",
    "out_proj",
    "c_proj",
}
QV_NAMES = {"q_proj", "v_proj", "query", "value"}
MLP_NAMES = {
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "fc1",
    "fc2",
    "c_fc",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "w1",
    "w2",
    "w3",
}
PRESETS = {"attention": ATTENTION_NAMES, "qv": QV_NAMES, "mlp": MLP_NAMES}
# Fused expert stacks (transformers 5: one (experts, out, in) parameter per projection of a MoE layer); the
# presets that cover the MLP cover them. Routers (`gate`, `router`) are never adapted: LoRA on the routing
# would move tokens between experts whose 4-bit weights cannot follow.
EXPERT_PARAMETER_NAMES = {"gate_up_proj", "up_proj", "down_proj"}
EXPERT_PRESETS = {"all-linear", "mlp"}
CLASSIFIER_HEADS = ("score", "classifier")
IGNORE_INDEX = -100  # labels with this value are skipped by the loss (PyTorch's cross-entropy default)
# Config keys of heads that are more than `hidden @ W.T (+ b)` in ways the chunked loss does not reproduce
# (no transformers 5 causal LM uses them; remote code might). Scaling and final soft-capping are reproduced.
HEAD_TRANSFORMS = ("output_multiplier_scale", "logit_softcapping")


@dataclass(frozen=True)
class HeadTransform:
    """What a causal LM's forward does to `hidden @ W.T (+ b)` before the loss: multiply by `scale` (Granite divides
    by `logits_scaling`, Cohere multiplies by `logit_scale`), then soft-cap to `softcap * tanh(logits / softcap)`
    (Gemma 2's `final_logit_softcapping`). The chunked loss applies both inside each chunk."""

    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and not self.softcap


PLAIN_HEAD = HeadTransform()  # logits = hidden @ W.T (+ b), as most families


def head_transform(config) -> HeadTransform:
    """The output head's transform, read from a model config the way the families' forwards read it."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = 1.0
    if getattr(config, "logits_scaling", None):  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    softcap = getattr(config, "final_logit_softcapping", None)
    return HeadTransform(scale=scale, softcap=float(softcap) if softcap else None)


def chunked_loss_unsupported(model) -> str | None:
    """Why the chunked loss cannot reproduce this causal LM's logits, or None when it can (works on a meta model)."""
    import inspect

    import torch  # here, not at the top: `qlora.config` is imported by every CLI's argument parsing

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for key in HEAD_TRANSFORMS:
        value = getattr(config, key, None)
        if value not in (None, 1, 1.0, 0, False):
            return f"its config sets {key}={value}"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear:
        return f"its output head is a {type(head).__name__}, not a plain linear layer"
    if getattr(model, "base_model", model) is model:
        return "it has no separate decoder to take the hidden states from"
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return "its forward takes no logits_to_keep"
    return None


@functools.lru_cache(maxsize=16)
def peft_remapped_names(model_type: str) -> frozenset[str]:
    """Linear leaf names that peft (0.21) turns into expert targets for this model type, whose experts transformers
    5 fuses: peft drops them from `target_modules` (and adapts the fused stacks instead), so a dense or shared-expert
    MLP with these names (GLM-4.5's first layer and shared expert) cannot carry a LoRA that plain peft would load.
    Read from peft's own table; empty when peft or transformers has none."""
    try:
        from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN, _MOE_TARGET_MODULE_MAPPING
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return frozenset()
    if get_checkpoint_conversion_mapping(model_type) is None:
        return frozenset()
    mapping = _MOE_TARGET_MODULE_MAPPING.get(_MODEL_TO_CONVERSION_PATTERN.get(model_type, ""), {})
    return frozenset(mapping) - {"gate"}  # the router, never a target here


def expert_target_names(expert_leaves: set[str], targets: str | list[str] | tuple[str, ...]) -> list[str]:
    """The fused expert stacks (leaf names, e.g. gate_up_proj, down_proj) that `lora.targets` adapts: all of them
    for `all-linear` and `mlp`, none for the attention presets, the named ones for a list."""
    if isinstance(targets, str):
        return sorted(expert_leaves) if targets in EXPERT_PRESETS else []
    return sorted(set(targets) & expert_leaves)


def lora_target_names(
    linear_leaves: set[str],
    head_leaves: set[str],
    targets: str | list[str] | tuple[str, ...],
    expert_leaves: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """`lora.targets` (a preset or module names) resolved against a model's linear layer leaf names (`expert_leaves`:
    its fused expert stacks, which `expert_target_names` resolves); the one rule used by training
    (`qlora.model.lora`) and the profiler (`qlora.memory.inventory`)."""
    if targets == "all-linear":
        # peft's own 'all-linear' writes every full module path into adapter_config.json (hundreds for a 70B);
        # the leaf names say the same, stay readable and portable to other tools.
        return sorted(linear_leaves - head_leaves)
    if isinstance(targets, str):
        chosen = sorted(linear_leaves & PRESETS[targets])
        if not chosen and not expert_target_names(expert_leaves, targets):
            raise QLoraError(
                f"lora.targets: preset '{targets}' matches no linear layer of this model "
                f"(its linear layers: {', '.join(sorted(linear_leaves))}); list module names instead"
            )
        return chosen
    for name in targets:
        if name not in linear_leaves | expert_leaves:
            known = linear_leaves | expert_leaves
            raise QLoraError(f"lora.targets: this model has no linear layer named '{name}'{did_you_mean(name, known)}")
    return [name for name in targets if name in linear_leaves]
