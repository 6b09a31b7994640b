"""The profiler's view of a recipe: the settings that change a training step's memory.

A `Recipe` is the one schema (`qlora.config.recipe`, which validates every value); `from_recipe` derives
this view from it, in this one place. `qlora profile`'s flags become recipe overrides before that. The
planner varies the view (`replace`) to ask what a change would cost. Kept free of torch so that
`--help` stays instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qlora.config.errors import QLoraError, did_you_mean
from qlora.config.precision import resolve_compute_dtype
from qlora.data.prepare import count_labels

# Method -> bits of the frozen base (None: 16-bit). 'full' trains every weight, the others train LoRA adapters.
METHODS = {"full": None, "lora": None, "lora-8bit": 8, "qlora": 4}
DEFAULT_METHODS = ("full", "lora", "qlora")


@dataclass(frozen=True)
class Settings:
    """Everything besides the model that changes a training step's memory.

    `device` says which machine the numbers describe: 'cuda' (a GPU being planned for: bf16 autocast,
    CUDA context and allocator overhead) or 'cpu' (what `--measure` checks on a machine without one).
    """

    seq_len: int = 512
    batch_size: int = 1
    rank: int = 64
    targets: str | tuple[str, ...] = "all-linear"
    lora_dropout: float = 0.05
    optimizer: str = "paged_adamw_32bit"
    checkpointing: bool = True
    checkpoint_layers: int | str | None = (
        None  # with checkpointing: the first N decoder layers, 'auto' (the planner's), None (all)
    )
    attn_implementation: str = "auto"  # model.attn_implementation; resolved per family (qlora.config.attention)
    compute_dtype: str = "auto"
    double_quant: bool = True
    device: str = "cuda"
    task: str = "causal_lm"  # or 'classification': a sequence classifier, its new head trained in full
    num_labels: int = 2  # classification only: the head has one output per label
    mlp_tiles: int | str = "auto"  # training.mlp_tiles: tiles of the sequence-tiled MLP (qlora.config.long_context)
    offload_checkpoints: bool | str = False  # training.offload_checkpoints: kept layer inputs in host RAM (GPU only)
    gpus: int = 1  # > 1: the numbers are one GPU's share under `strategy` (qlora.memory.sharding)
    strategy: str = "ddp"  # ddp | fsdp | zero3, as the recipe's distributed.strategy
    offload: str = "none"  # none | cpu, as distributed.offload
    loss: str = (
        "chunked"  # causal LM: 'chunked' (qlora.ops.loss, no full logits) or 'standard'; a classifier ignores it
    )
    eval_batch_size: int | None = None  # the eval step's batch (None: batch_size)
    generate_tokens: int = (
        0  # eval.metric exact_match: greedy generation of this many tokens at the eval batch (KV cache)
    )
    kernels: str = "auto"  # training.kernels: 'auto' = Liger Kernel's RMSNorm, SwiGLU, RoPE and fused loss on CUDA (a GPU install brings it); 'none'
    packing: bool = False  # data.packing: documents packed into each sequence (position ids restart)
    native_bf16: bool = (
        True  # the planned GPU computes bf16 (compute capability >= 8.0); fp16 below (T4, V100): same bytes
    )

    @property
    def eval_batch(self) -> int:
        return self.eval_batch_size or self.batch_size

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["targets"] = self.targets if isinstance(self.targets, str) else list(self.targets)
        return data


def parse_methods(text: str) -> tuple[str, ...]:
    """'full,lora,qlora' -> ('full', 'lora', 'qlora'), each checked."""
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    if not methods:
        raise QLoraError("--methods: give at least one of " + ", ".join(METHODS))
    for method in methods:
        if method not in METHODS:
            raise QLoraError(f"--methods: unknown value '{method}'{did_you_mean(method, METHODS)}")
    return methods


def from_recipe(recipe, num_labels: int | None = None, device: str = "cuda") -> tuple[str, str, Settings]:
    """(model source, method, settings) of what `qlora train` would run for `recipe`, on `device`.

    A classifier's label count (`num_labels` when given) is read from the recipe's data when it is local;
    for a Hub dataset, which cannot be read offline, two labels are assumed (the head is hidden × labels,
    a few KB per label).
    """
    if recipe.task == "classification" and num_labels is None:
        num_labels = count_labels(recipe)
    targets = recipe.lora.targets if isinstance(recipe.lora.targets, str) else tuple(recipe.lora.targets)
    # quant_type is left out on purpose: fp4 and nf4 store the same layout (4-bit codes, one absmax per block).
    settings = Settings(
        seq_len=recipe.data.max_seq_len,
        batch_size=recipe.training.batch_size,
        rank=recipe.lora.r,
        targets=targets,
        lora_dropout=recipe.lora.dropout,
        optimizer=recipe.training.optimizer,
        checkpointing=recipe.training.gradient_checkpointing not in (False, 0),
        checkpoint_layers=None
        if isinstance(recipe.training.gradient_checkpointing, bool)
        else recipe.training.gradient_checkpointing,
        attn_implementation=recipe.model.attn_implementation,
        compute_dtype=recipe.quantization.compute_dtype,
        double_quant=recipe.quantization.double_quant,
        task=recipe.task,
        num_labels=num_labels or 2,
        device=device,
        mlp_tiles=recipe.training.mlp_tiles,
        offload_checkpoints=recipe.training.offload_checkpoints,
        gpus=recipe.distributed.gpus or 1,  # the GPUs it is sized for; `--gpus N` plans for another number
        strategy=recipe.distributed.strategy or "ddp",
        offload=recipe.distributed.offload,
        loss=recipe.training.loss,
        kernels=recipe.training.kernels,
        packing=recipe.data.packing,
        eval_batch_size=recipe.training.eval_batch_size,
        generate_tokens=recipe.eval.max_new_tokens
        if recipe.eval.metric == "exact_match" and recipe.task == "causal_lm"
        else 0,
    )
    return recipe.model.name_or_path, recipe.method, settings


def compute_dtype(settings: Settings):
    """The compute dtype the trainer would pick on the settings' device (a GPU with bf16 when planning)."""
    return resolve_compute_dtype(settings.compute_dtype, settings.device, bf16_supported=settings.native_bf16)
