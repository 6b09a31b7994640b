"""The model as a recipe trains it: the loaded base, gradient checkpointing (offloaded or not), LoRA, the
chosen loss and the tiled MLP. `qlora train` and the profiler's measured mode both build it here.

Every value arrives decided: `auto` keys are resolved by training (which asks the profiler) before loading.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from qlora.config.architecture import chunked_loss_unsupported
from qlora.config.long_context import checkpointed_layers, mlp_tiles_for
from qlora.config.precision import resolve_compute_dtype
from qlora.config.recipe import SHARDED_STRATEGIES, Recipe
from qlora.model.load import load_base_model, load_model_config, load_tokenizer
from qlora.model.lora import adapter_folder, attach_lora, continue_adapter
from qlora.ops.kernels import apply_decoder_kernels
from qlora.ops.loss import install_chunked_loss
from qlora.ops.offload import offloaded
from qlora.ops.tiled_mlp import tile_mlps

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """What training needs from loading: the peft model, its tokenizer, its compute dtype and the loss it uses."""

    model: Any
    tokenizer: Any
    compute_dtype: torch.dtype
    loss: str = "standard"


def enable_gradient_checkpointing(
    model, reentrant: bool = False, offload: bool = False, layers: int | None = None
) -> None:
    """Recompute each layer in backward instead of keeping its activations (transformers' checkpointing);
    `layers`: only the first so many decoder layers (the rest keep theirs, and are not recomputed).

    `reentrant` for ZeRO-3 and FSDP: ZeRO-3's partitioned weights are gathered by module hooks, which
    the non-reentrant recompute does not re-run (it finds empty weights and stops with a CheckpointError);
    FSDP-QLoRA is documented (peft) with reentrant checkpointing. `offload`: the checkpoint function chosen
    here keeps each layer's input in host RAM (qlora.ops.offload), in either mode.
    """
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 (the old name warns there)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if offload:
        chosen = next(
            m._gradient_checkpointing_func for m in model.modules() if getattr(m, "gradient_checkpointing", False)
        )
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=offloaded(chosen))
    if layers is not None:  # transformers' own flag per layer (its every_n_layers sets the same one)
        for index, layer in enumerate(m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)):
            layer.gradient_checkpointing = index < layers
    model.enable_input_require_grads()
    model.config.use_cache = False


def install_loss(model, recipe: Recipe) -> str:
    """`training.loss` on a causal LM (qlora.ops.loss); a classifier keeps its own small loss. Returns the loss."""
    if recipe.task != "causal_lm" or recipe.training.loss != "chunked":
        return "standard"
    if recipe.training.objective != "sft":  # TRL's preference trainers score tokens with their own chunked head
        return "standard"
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    reason = chunked_loss_unsupported(causal_lm)
    if reason:
        log.info(f"training.loss: chunked cannot reproduce this model's logits ({reason}); using the standard loss")
        return "standard"
    install_chunked_loss(model, fused=recipe.training.kernels == "auto")
    return "chunked"


def prepare_for_training(base, recipe: Recipe, lora: bool = True, offload: bool = False):
    """(model, loss): `base` with checkpointing, LoRA (unless full fine-tuning), the loss and the tiled MLP."""
    t = recipe.training
    layers = checkpointed_layers(t.gradient_checkpointing, base.config.get_text_config().num_hidden_layers)
    if layers:
        enable_gradient_checkpointing(
            base, reentrant=recipe.distributed.strategy in SHARDED_STRATEGIES, offload=offload, layers=layers
        )
    adapter = adapter_folder(recipe.model, announce=False) if lora else None
    if adapter is not None:  # model.adapter: its own LoRA settings, trained further
        model = continue_adapter(base, adapter, recipe.task)
    else:
        model = attach_lora(base, recipe.lora, recipe.task) if lora else base
    loss = install_loss(model, recipe)
    if t.mlp_tiles != 1:
        hidden = base.config.get_text_config().hidden_size
        tile_mlps(
            base, functools.partial(mlp_tiles_for, t.mlp_tiles, hidden=hidden, strategy=recipe.distributed.strategy)
        )
    if t.compile:  # each layer's call compiled; the layers share one graph (their weights are its inputs)
        for layer in (m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)):
            layer.compile()
    return model, loss


def use_decoder_kernels(recipe: Recipe) -> bool:
    """`training.kernels: auto` on CUDA: Liger's fused decoder kernels, swapped in before the model is built."""
    if recipe.training.kernels != "auto" or not torch.cuda.is_available():
        return False
    return apply_decoder_kernels(load_model_config(recipe.model).model_type)


def build_model(
    recipe: Recipe,
    label_names: list[str] | None = None,
    device: str | None = None,
    tokenizer=None,
    offload: bool = False,
) -> LoadedModel:
    """Tokenizer + quantized base + LoRA (+ checkpointing, loss, tiles), all as the recipe says; `offload`:
    training's decision for `training.offload_checkpoints`."""
    compute_dtype = resolve_compute_dtype(recipe.quantization.compute_dtype, device)
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    use_decoder_kernels(recipe)
    base = load_base_model(recipe, compute_dtype, label_names, announce=True, pad_token_id=tokenizer.pad_token_id)
    model, loss = prepare_for_training(base, recipe, offload=offload)
    return LoadedModel(model=model, tokenizer=tokenizer, compute_dtype=compute_dtype, loss=loss)
