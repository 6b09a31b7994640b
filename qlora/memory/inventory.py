"""Every parameter and buffer of a model, by role, from its config alone.

The real transformers class is instantiated on the meta device (shapes, no memory, no weights), with
the dtype a real load would use, so what is counted is what `from_pretrained` builds: tied
embeddings once, non-persistent buffers (RoPE), biases, the head. Which linear layers bitsandbytes
would quantize is decided by transformers' own skip rules, called on that meta model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import should_convert_module

from qlora.config.architecture import (
    ATTENTION_NAMES,
    CLASSIFIER_HEADS,
    EXPERT_PARAMETER_NAMES,
    MLP_NAMES,
    PLAIN_HEAD,
    HeadTransform,
    chunked_loss_unsupported,
    expert_target_names,
    head_transform,
    lora_target_names,
    peft_remapped_names,
)
from qlora.config.attention import supported_attention
from qlora.config.errors import QLoraError
from qlora.memory.catalog import resolve

ROLES = ("embedding", "attention", "mlp", "experts", "norm", "bias", "lm_head", "classifier", "other")
HEAD_ROLES = ("lm_head", "classifier")  # output heads: LoRA never wraps them


@dataclass(frozen=True)
class Linear:
    """A linear layer; `quantized`: bitsandbytes would replace it (4- or 8-bit) in a quantized load."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    itemsize: int
    role: str
    quantized: bool

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class ExpertStack:
    """A fused (experts, out, in) weight of a mixture-of-experts layer (transformers 5): `experts` linears
    in one parameter, quantized by qlora (qlora.ops.experts) in a 4-bit load, adapted by expert LoRA."""

    name: str
    experts: int
    in_features: int
    out_features: int
    itemsize: int

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]

    @property
    def numel(self) -> int:
        return self.experts * self.in_features * self.out_features


@dataclass(frozen=True)
class Tensor:
    """A parameter outside the linear layers (embeddings, norms) or a buffer."""

    name: str
    numel: int
    itemsize: int
    role: str


@dataclass(frozen=True)
class Dims:
    """The sizes the activation model needs (text model of the config)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int  # the longest sequence the model was trained for (the planner searches up to it)
    experts: int = 0  # mixture of experts: routed experts per MoE layer (0: dense)
    top_k: int = 0  # experts each token is routed to
    expert_intermediate: int = 0  # one expert's intermediate size
    moe_layers: int = 0  # decoder layers with routed experts (the others are dense)
    shared_intermediate: int = 0  # the shared experts' MLP beside the routed ones (GLM-4.5, DeepSeek-V3)
    residual_scaled: bool = False  # Granite: each residual branch is multiplied (residual_multiplier) before the sum
    sliding_window: int | None = None  # the window of the sliding-window layers (Mistral, Gemma 2/3), None: none
    rope_tables: int = 1  # rotary cos/sin tables per forward: Gemma 3 has one per layer type (local and global)
    attention_kinds: int = 1  # layer types with their own mask (Gemma 2/3: full and sliding)
    scores_capped: bool = False  # Gemma 2 soft-caps the attention scores (eager keeps their tanh)
    parallel_layer_norm: bool = False  # GPT-NeoX: two LayerNorms of the layer input, attention and MLP in parallel
    rotary_dim: int | None = None  # rotated dimensions per head where only part rotates (GPT-NeoX's rotary_pct)


@dataclass(frozen=True)
class Inventory:
    name: str
    architecture: str
    dims: Dims
    tied_embeddings: bool
    linears: tuple[Linear, ...]
    params: tuple[Tensor, ...]
    buffers: tuple[Tensor, ...]
    layer_prefix: str  # e.g. 'model.layers.0.': the linears of one decoder layer start with it
    task: str = "causal_lm"
    chunked_loss_unsupported: str | None = (
        None  # why qlora.ops.loss falls back to the standard loss here (an unknown head transform)
    )
    experts: tuple[ExpertStack, ...] = ()  # fused expert stacks (mixture of experts)
    model_type: str = ""
    head: HeadTransform = PLAIN_HEAD  # the logits' scaling and soft-capping (qlora.ops.loss applies them per chunk)
    attention: tuple[str, ...] | None = None  # the attention implementations transformers supports for this class

    def parameter_count(self) -> int:
        return (
            sum(t.numel for t in self.params)
            + sum(lin.in_features * lin.out_features + (lin.out_features if lin.bias else 0) for lin in self.linears)
            + sum(stack.numel for stack in self.experts)
        )

    def counts_by_role(self) -> dict[str, int]:
        counts = dict.fromkeys(ROLES, 0)
        for t in self.params:
            counts[t.role] += t.numel
        for stack in self.experts:
            counts["experts"] += stack.numel
        for lin in self.linears:
            counts[lin.role] += lin.in_features * lin.out_features
            counts["bias"] += lin.out_features if lin.bias else 0
        return counts

    def layer_linears(self) -> dict[str, Linear]:
        """Leaf name -> linear layer, for one decoder layer (all layers have the same shapes)."""
        return {lin.leaf: lin for lin in self.linears if lin.name.startswith(self.layer_prefix)}

    def qk_norms(self) -> tuple[int, int] | None:
        """The widths of one layer's query and key norms (Qwen3, Gemma 3: per head; OLMo 2: the whole projection),
        None for a family without them."""
        widths = {
            t.name.rsplit(".", 2)[-2]: t.numel
            for t in self.params
            if t.name.startswith(self.layer_prefix) and t.name.endswith(("q_norm.weight", "k_norm.weight"))
        }
        return (widths["q_norm"], widths["k_norm"]) if len(widths) == 2 else None

    def sandwich_norms(self) -> bool:
        """Whether each sub-layer's output is normalized before the residual sum (Gemma 2 and 3's four norms)."""
        return any(t.name.startswith(self.layer_prefix) and "pre_feedforward_layernorm" in t.name for t in self.params)

    def post_norms(self) -> bool:
        """Whether the norms come after each sub-layer and none before (OLMo 2)."""
        names = [t.name for t in self.params if t.name.startswith(self.layer_prefix)]
        return any("post_feedforward_layernorm" in n for n in names) and not any("input_layernorm" in n for n in names)

    def lora_targets(self, targets: str | tuple[str, ...]) -> tuple[Linear, ...]:
        """The linear layers LoRA wraps: `lora_target_names`, the rule training applies to a real model."""
        heads = {lin.leaf for lin in self.linears if lin.role in HEAD_ROLES}
        experts = {stack.leaf for stack in self.experts}
        names = set(lora_target_names({lin.leaf for lin in self.linears}, heads, targets, experts))
        if self.experts:  # as qlora.model.lora drops them (peft's remapping); peft is imported for MoE models only
            names -= peft_remapped_names(self.model_type)
        return tuple(lin for lin in self.linears if lin.leaf in names and lin.role not in HEAD_ROLES)

    def expert_targets(self, targets: str | tuple[str, ...]) -> tuple[ExpertStack, ...]:
        """The expert stacks LoRA adapts (`expert_target_names`, the rule training applies)."""
        names = set(expert_target_names({stack.leaf for stack in self.experts}, targets))
        return tuple(stack for stack in self.experts if stack.leaf in names)

    def classifier_head(self) -> tuple[Linear, ...]:
        """A classifier's new head (trained in full next to LoRA); empty for a causal LM."""
        return tuple(lin for lin in self.linears if lin.role == "classifier")


def load_inventory(
    source: str, dtype_name: str = "bfloat16", task: str = "causal_lm", num_labels: int = 2
) -> Inventory:
    """The inventory of a catalog name, Hub id, model folder or config.json, as loaded in `dtype_name`
    for `task` (a causal LM, or a sequence classifier with `num_labels` outputs)."""
    model_source = resolve(source)
    return _inventory(str(model_source.config_path), model_source.name, dtype_name, task, num_labels)


@lru_cache(maxsize=32)
def _inventory(config_path: str, name: str, dtype_name: str, task: str, num_labels: int) -> Inventory:
    model = meta_model(Path(config_path), getattr(torch, dtype_name), task, num_labels)
    return _describe(model, name, task)


def load_config(config_path: Path):
    """transformers' config object for a config.json, with one-line errors for unusable files."""
    try:
        return AutoConfig.from_pretrained(str(config_path))
    except (OSError, ValueError, KeyError) as exc:
        raise QLoraError(f"cannot read model config {config_path}: {str(exc).splitlines()[0]}") from None


def meta_model(config_path: Path, dtype, task: str = "causal_lm", num_labels: int = 2):
    """The config's causal-LM (or sequence-classification) class, built on the meta device in `dtype`
    (as `from_pretrained` would)."""
    config = load_config(config_path)
    loader, what = AutoModelForCausalLM, "causal language model"
    if task == "classification":
        config.num_labels = num_labels
        loader, what = AutoModelForSequenceClassification, "sequence classifier"
    try:
        with torch.device("meta"):
            return loader.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise QLoraError(f"{config_path}: not a {what} transformers can build: {str(exc).splitlines()[0]}") from None


def linear_features(module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer: `nn.Linear`, or GPT-2's `Conv1D` (the same matmul, its weight
    stored transposed; peft's all-linear counts it too). None for any other module."""
    if type(module) is torch.nn.Linear:
        return module.in_features, module.out_features
    if type(module) is Conv1D:
        return module.nx, module.nf
    return None


def _describe(model, name: str, task: str = "causal_lm") -> Inventory:
    skip = HfQuantizer.get_modules_to_not_convert(model, None, model._keep_in_fp32_modules)
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    linears, params, claimed = [], [], set()
    for mod_name, module in model.named_modules():
        features = linear_features(module)
        if features is not None and not (tied and module is head):  # a tied head stores nothing of its own
            leaf = mod_name.rsplit(".", 1)[-1]
            role = (
                "lm_head"
                if module is head
                else "classifier"
                if task == "classification" and mod_name in CLASSIFIER_HEADS
                else "attention"
                if leaf in ATTENTION_NAMES
                else "mlp"
                if leaf in MLP_NAMES
                else "other"
            )
            linears.append(
                Linear(
                    mod_name,
                    *features,
                    module.bias is not None,
                    module.weight.element_size(),
                    role,
                    should_convert_module(mod_name, skip),
                )
            )
            claimed.update(id(p) for p in module.parameters())
    experts = []
    for mod_name, module in model.named_modules():
        if not hasattr(module, "is_transposed"):  # transformers' fused-experts modules (use_experts_implementation)
            continue
        for leaf, param in module.named_parameters(recurse=False):
            if leaf in EXPERT_PARAMETER_NAMES and param.ndim == 3:
                count, first, second = param.shape
                inputs, outputs = (first, second) if module.is_transposed else (second, first)
                experts.append(ExpertStack(f"{mod_name}.{leaf}", count, inputs, outputs, param.element_size()))
                claimed.add(id(param))
    for param_name, param in model.named_parameters():  # deduplicated: a tied weight is listed once
        if id(param) in claimed:
            continue
        owner = model.get_submodule(param_name.rsplit(".", 1)[0]) if "." in param_name else model
        role = (
            "embedding"
            if isinstance(owner, torch.nn.Embedding)
            else "norm"
            if "norm" in type(owner).__name__.lower()
            else "other"
        )
        params.append(Tensor(param_name, param.numel(), param.element_size(), role))
    buffers = tuple(Tensor(n, b.numel(), b.element_size(), "buffer") for n, b in model.named_buffers())
    return Inventory(
        name=name,
        architecture=type(model).__name__,
        dims=_dims(model.config.get_text_config()),
        tied_embeddings=tied,
        linears=tuple(linears),
        params=tuple(params),
        buffers=buffers,
        layer_prefix=_first_layer_prefix(model),
        task=task,
        chunked_loss_unsupported=chunked_loss_unsupported(model) if task == "causal_lm" else None,
        experts=tuple(experts),
        model_type=model.config.model_type,
        head=head_transform(model.config),
        attention=supported_attention(type(model)),
    )


DIM_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _dims(config) -> Dims:
    """The decoder's sizes; a one-line error for what the activation model does not describe."""
    missing = [key for key in DIM_KEYS if getattr(config, key, None) is None]
    if missing:
        raise QLoraError(
            f"{config.model_type}: not a Llama-style decoder the profiler models (Llama, Mistral, Qwen2, "
            f"Gemma, Phi-3, …): its config has no {', '.join(missing)}"
        )
    heads = config.num_attention_heads
    return Dims(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab=config.vocab_size,
        max_positions=getattr(config, "max_position_embeddings", None) or 4096,  # 4096 when the config does not say
        residual_scaled=getattr(config, "residual_multiplier", None) is not None,  # multiplied even by 1.0
        sliding_window=_sliding_window(config),
        rope_tables=_rope_tables(config),
        attention_kinds=len(set(getattr(config, "layer_types", None) or ["one"])),
        scores_capped=bool(getattr(config, "attn_logit_softcapping", None)),
        parallel_layer_norm=config.model_type == "gpt_neox" and bool(getattr(config, "use_parallel_residual", False)),
        rotary_dim=_rotary_dim(config, getattr(config, "head_dim", None) or config.hidden_size // heads),
        **_moe_dims(config),
    )


def _moe_dims(config) -> dict[str, int]:
    """The routed-experts sizes of a mixture-of-experts config (none for a dense one)."""
    experts = next((getattr(config, key) for key in EXPERT_KEYS if getattr(config, key, None)), 0)
    if not experts:
        return {}
    dense_first = getattr(config, "first_k_dense_replace", 0) or 0
    dense_only = len(getattr(config, "mlp_only_layers", None) or ())
    shared = getattr(config, "n_shared_experts", 0) or 0
    expert_intermediate = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    return {
        "experts": experts,
        "top_k": config.num_experts_per_tok,
        "expert_intermediate": expert_intermediate,
        "moe_layers": config.num_hidden_layers - dense_first - dense_only,
        "shared_intermediate": shared * expert_intermediate,
    }


def _rotary_dim(config, head_dim: int) -> int | None:
    """Rotated dimensions per head when the config rotates only part of each head (None: all of it)."""
    rope = getattr(config, "rope_parameters", None) or {}
    share = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    share = share or getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None)
    return int(head_dim * share) if share and share < 1 else None


def _rope_tables(config) -> int:
    """Rotary tables a forward makes: one per layer type with its own rope parameters (Gemma 3), else one."""
    rope = getattr(config, "rope_parameters", None)
    layer_types = set(getattr(config, "layer_types", None) or ())
    if isinstance(rope, dict) and layer_types and layer_types <= set(rope):
        return len(layer_types)
    return 1


def _sliding_window(config) -> int | None:
    """The window of the config's sliding-window layers (transformers' `layer_types`, or every layer where a window
    is set and not switched off by `use_sliding_window`)."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    return window if layer_types is None or "sliding_attention" in layer_types else None


def _first_layer_prefix(model) -> str:
    """'model.layers.0.': the first module of the ModuleList that holds the decoder layers."""
    layers = model.config.get_text_config().num_hidden_layers
    for mod_name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layers:
            return f"{mod_name}.0."
    raise QLoraError(f"{type(model).__name__}: cannot find its {layers} decoder layers")
