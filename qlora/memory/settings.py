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
from qlora.config.recipe import default_of, key_field, value_at
from qlora.data.prepare import count_labels

# Method -> bits of the frozen base (None: 16-bit). 'full' trains every weight, the others train LoRA adapters.
METHODS = {"full": None, "lora": None, "lora-8bit": 8, "qlora": 4}
DEFAULT_METHODS = ("full", "lora", "qlora")


def from_key(dotted: str, **kwargs: Any) -> Any:
    """A setting that is the recipe key `dotted` as it stands: its default is the schema's, `from_recipe` copies it."""
    return dataclasses.field(default=default_of(key_field(dotted)), metadata={"recipe_key": dotted}, **kwargs)


def derived_from(dotted: str, default: Any) -> Any:
    """A setting `from_recipe` computes from the recipe key `dotted` (which the planner's advice names)."""
    return dataclasses.field(default=default, metadata={"recipe_key": dotted, "derived": True})


@dataclass(frozen=True)
class Settings:
    """Everything besides the model that changes a training step's memory.

    Most fields are a recipe key as it stands (`from_key`: name, default and values are the schema's); the
    rest are derived from one (`derived_from`) or describe the machine, not the recipe. `device` says which
    machine the numbers describe: 'cuda' (a GPU being planned for: bf16 autocast, CUDA context and allocator
    overhead) or 'cpu' (what `--measure` checks on a machine without one).
    """

    seq_len: int = from_key("data.max_seq_len")
    batch_size: int = from_key("training.batch_size")
    rank: int = from_key("lora.r")
    targets: str | tuple[str, ...] = from_key("lora.targets")
    lora_dropout: float = from_key("lora.dropout")
    optimizer: str = from_key("training.optimizer")
    checkpointing: bool = derived_from("training.gradient_checkpointing", True)
    # with checkpointing: the first N decoder layers, 'auto' (the planner's), None (all)
    checkpoint_layers: int | str | None = derived_from("training.gradient_checkpointing", None)
    attn_implementation: str = from_key("model.attn_implementation")  # resolved per family (config.attention)
    compute_dtype: str = from_key("quantization.compute_dtype")
    double_quant: bool = from_key("quantization.double_quant")
    device: str = "cuda"
    task: str = from_key("task")
    num_labels: int = 2  # classification only: the head has one output per label (read from the data)
    mlp_tiles: int | str = from_key("training.mlp_tiles")
    offload_checkpoints: bool | str = from_key("training.offload_checkpoints")
    gpus: int = derived_from("distributed.gpus", 1)  # > 1: one GPU's share under `strategy` (qlora.memory.sharding)
    strategy: str = derived_from("distributed.strategy", "ddp")  # a recipe's null: one process, or DDP
    offload: str = from_key("distributed.offload")
    loss: str = from_key("training.loss")
    eval_batch_size: int | None = from_key("training.eval_batch_size")
    # eval.metric exact_match: greedy generation of this many tokens at the eval batch (KV cache)
    generate_tokens: int = derived_from("eval.max_new_tokens", 0)
    kernels: str = from_key("training.kernels")
    packing: bool = from_key("data.packing")  # documents packed into each sequence (position ids restart)
    objective: str = from_key("training.objective")  # 'dpo': TRL's preference step (chosen + rejected, a reference)
    precompute_ref: bool = from_key("dpo.precompute_ref_log_probs")  # no reference forward in the step
    # the planned GPU computes bf16 (compute capability >= 8.0); fp16 below (T4, V100): the same bytes
    native_bf16: bool = True

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
    # quant_type is left out on purpose: fp4 and nf4 store the same layout (4-bit codes, one absmax per block).
    copied = {
        f.name: _hashable(value_at(recipe, f.metadata["recipe_key"]))
        for f in dataclasses.fields(Settings)
        if "recipe_key" in f.metadata and not f.metadata.get("derived")
    }
    checkpointing = recipe.training.gradient_checkpointing
    settings = Settings(
        **copied,
        checkpointing=checkpointing not in (False, 0),
        checkpoint_layers=None if isinstance(checkpointing, bool) else checkpointing,
        gpus=recipe.distributed.gpus or 1,  # the GPUs it is sized for; `--gpus N` plans for another number
        strategy=recipe.distributed.strategy or "ddp",
        generate_tokens=recipe.eval.max_new_tokens
        if recipe.eval.metric == "exact_match" and recipe.task == "causal_lm"
        else 0,
        num_labels=num_labels or 2,
        device=device,
    )
    return recipe.model.name_or_path, recipe.method, settings


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def compute_dtype(settings: Settings):
    """The compute dtype the trainer would pick on the settings' device (a GPU with bf16 when planning)."""
    return resolve_compute_dtype(settings.compute_dtype, settings.device, bf16_supported=settings.native_bf16)
