"""Predicted peak memory of a run, component by component: the larger of its two phases.

The training step's peak is the larger of two moments (with gradient accumulation, as the recipes
train, gradients exist through every forward and backward):

    backward:       weights + adapters + gradients + optimizer states + activations
                    (the largest activation moment: the loss, or one layer's backward)
    optimizer step: weights + adapters + gradients + optimizer states + the step's temporaries
                    + the last micro-batch's token ids and labels (the trainer's loop still holds it)

The eval step (`training.eval_batch_size`, no gradients: the trainer frees them after each step,
optimizer states alive) is a no-grad forward: weights + adapters + optimizer states + its activations.
The components reported are those of the peak phase at its peak moment, so they add up to the total;
`phases` keeps both.
Dtypes come from `qlora.config.precision`, the module the trainer uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qlora.config.attention import choose_attention
from qlora.config.errors import QLoraError, did_you_mean
from qlora.config.long_context import mlp_tiles_for
from qlora.config.precision import (
    ADAPTER_DTYPE,
    dtype_name,
    optimizer_state_dtype,
    trainable_dtype,
    trainer_precision_flags,
)
from qlora.memory.activations import Step, activation_bytes, batch_bytes, checkpointed, eval_activation_bytes
from qlora.memory.flops import recompute_saved_pct
from qlora.memory.inventory import Inventory, load_inventory
from qlora.memory.overheads import overhead, slack
from qlora.memory.preference import eval_with_preference_head, with_preference_head
from qlora.memory.settings import METHODS, Settings, compute_dtype, from_recipe
from qlora.memory.sharding import per_gpu
from qlora.memory.storage import MIN_8BIT_SIZE, QMAP_BYTES, adamw_state_bytes, int8_weight_bytes, nf4_weight_bytes

COMPONENTS = ("weights", "adapters", "gradients", "optimizer", "activations", "overhead")
GIB = 2**30


@dataclass(frozen=True)
class Estimate:
    """Predicted bytes per component (at the peak moment) for one model and method."""

    model: str
    method: str
    settings: Settings
    bytes: dict[str, int]
    details: dict[str, dict[str, int]] = field(default_factory=dict)
    peak_moment: str = ""
    parameters: int = 0
    trainable: int = 0
    parameters_by_role: dict[str, int] = field(default_factory=dict)
    host_bytes: dict[str, int] = field(
        default_factory=dict
    )  # host RAM beside the GPU (offload, loading), not in `total`
    phases: dict[str, dict] = field(default_factory=dict)  # 'train' / 'eval' -> {bytes, total_bytes, allocated_bytes}
    phase: str = "train"  # the peak phase, whose bytes `bytes` are
    checkpointed_layers: int = 0  # decoder layers recomputed in backward (the first ones)
    recompute_saved_pct: float | None = (
        None  # with checkpointing: the share of an all-layers step's FLOPs not recomputed
    )

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    @property
    def allocated(self) -> int:
        """The tensors alone (the total less CUDA context and allocator slack): what
        `torch.cuda.max_memory_allocated` or a CPU tensor tracker measures."""
        return self.total - slack(self.details.get("overhead", {}))

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "bytes": dict(self.bytes),
            "total_bytes": self.total,
            "allocated_bytes": self.allocated,
            "peak_moment": self.peak_moment,
            "parameters": self.parameters,
            "parameters_by_role": dict(self.parameters_by_role),
            "trainable_parameters": self.trainable,
            "details": {k: dict(v) for k, v in self.details.items()},
            "host_bytes": dict(self.host_bytes),
            "host_ram_bytes": sum(self.host_bytes.values()),
            "phase": self.phase,
            **(
                {
                    "gradient_checkpointing_layers": self.checkpointed_layers,
                    "recompute_saved_pct": self.recompute_saved_pct,
                }
                if self.recompute_saved_pct is not None
                else {}
            ),
            "phases": {name: dict(phase, bytes=dict(phase["bytes"])) for name, phase in self.phases.items()},
        }


def settings_inventory(model: str | Inventory, settings: Settings) -> Inventory:
    """The inventory `settings` describe: loaded in their compute dtype, for their task."""
    if isinstance(model, Inventory):
        return model
    return load_inventory(model, dtype_name(compute_dtype(settings)), settings.task, settings.num_labels)


def estimate(model: str | Inventory, method: str, settings: Settings) -> Estimate:
    """Predict one training step of `method` on `model` (catalog name, Hub id, folder, config.json)."""
    if method not in METHODS:
        raise QLoraError(f"method: unknown value '{method}'{did_you_mean(method, METHODS)}")
    dtype = compute_dtype(settings)
    inv = settings_inventory(model, settings)
    attention, _ = choose_attention(
        inv.architecture, inv.attention, settings.attn_implementation, settings.device, check_installed=False
    )
    settings = settings.replace(attn_implementation=attention)  # what training runs (qlora.model.load decides alike)
    if inv.task != settings.task:
        raise ValueError(f"inventory of a {inv.task} model profiled as {settings.task}")
    targets = () if method == "full" else inv.lora_targets(settings.targets)
    stacks = () if method == "full" else inv.expert_targets(settings.targets)
    adapter_numel = sum(settings.rank * (lin.in_features + lin.out_features) for lin in targets)
    # expert LoRA in peft's ParamWrapper layout: A (experts·r, in) and B (out, r·experts) per stack
    expert_adapter_numel = sum(settings.rank * s.experts * (s.in_features + s.out_features) for s in stacks)
    adapter_numel += expert_adapter_numel
    head = [] if method == "full" else _head_tensors(inv)  # full FT counts the head with every weight
    head_numel = sum(head)
    train_itemsize = trainable_dtype(method, dtype).itemsize
    trainable = _trainable_tensors(inv, method, targets, settings.rank, head, stacks)
    weights = weight_bytes(inv, METHODS[method], settings.double_quant)
    states = optimizer_bytes(settings.optimizer, trainable, trainable_dtype(method, dtype), settings.device)
    step = Step(
        batch=settings.batch_size,
        seq=settings.seq_len,
        compute_bytes=dtype.itemsize,
        autocast=any(trainer_precision_flags(dtype, settings.device).values()),
        device=settings.device,
        checkpointing=settings.checkpointing,
        attention=settings.attn_implementation,
        method=method,
        checkpointed_layers=settings.checkpoint_layers if isinstance(settings.checkpoint_layers, int) else None,
        generate_tokens=settings.generate_tokens,
        rank=settings.rank,
        lora_dropout=settings.lora_dropout,
        lora_leaves=frozenset(lin.leaf for lin in targets),
        expert_leaves=frozenset(s.leaf for s in stacks),
        adapter_numel=adapter_numel,
        adapter_bytes=ADAPTER_DTYPE.itemsize,
        task=settings.task,
        num_labels=settings.num_labels,
        **long_context_step(inv, settings),
        loss="standard" if inv.chunked_loss_unsupported else settings.loss,  # as qlora.ops.loss falls back in training
        kernels=liger_kernels(settings),
        packed=settings.packing,
    )
    preference = settings.objective != "sft"  # TRL's step: chosen + rejected in one batch, its own log-prob head
    if preference:
        # TRL's trainer turns dropout off (DPOConfig.disable_dropout): LoRA's dropout saves nothing
        step = dataclasses.replace(step, batch=2 * settings.batch_size, loss="chunked", lora_dropout=0.0)
    acts = activation_bytes(inv, step)
    if preference:
        acts = with_preference_head(acts, inv, step, reference=not settings.precompute_ref)
    step_temps = optimizer_step_temporaries(
        settings.optimizer, settings.device, trainable, trainable_dtype(method, dtype)
    )
    at_step = step_temps + batch_bytes(step) > acts.total  # the last micro-batch is still alive at the step
    buffers = sum(b.numel * b.itemsize for b in inv.buffers)
    # a preference step keeps a frozen copy of the adapter as its reference (TRL's 'ref' adapter)
    copies = 2 if preference and method != "full" else 1
    resident = {
        "weights": sum(weights.values()),
        "adapters": (copies * adapter_numel + head_numel) * ADAPTER_DTYPE.itemsize,
    }
    train = {
        **resident,
        "gradients": sum(trainable) * train_itemsize,
        "optimizer": sum(states.values()) + (step_temps if at_step else 0),
        "activations": batch_bytes(step) if at_step else acts.total,
    }
    eval_step = dataclasses.replace(step, batch=(2 if preference else 1) * settings.eval_batch)
    eval_acts = eval_activation_bytes(inv, eval_step, batch_bytes(step))
    if preference:
        eval_acts = eval_with_preference_head(eval_acts, inv, eval_step)
    evaluation = {**resident, "gradients": 0, "optimizer": sum(states.values()), "activations": eval_acts.total}
    overheads = {}
    for name, phase in (("train", train), ("eval", evaluation)):
        overheads[name] = overhead(settings.device, sum(phase.values()), buffers)
        phase["overhead"] = sum(overheads[name].values())
    peak_phase = "eval" if sum(evaluation.values()) > sum(train.values()) else "train"
    details = {"weights": weights, "optimizer": states, "overhead": overheads[peak_phase]}
    if head_numel:
        details["adapters"] = {
            "LoRA A and B": adapter_numel * ADAPTER_DTYPE.itemsize,
            "classifier head (trained copy)": head_numel * ADAPTER_DTYPE.itemsize,
        }
    if peak_phase == "eval":
        details["activations"] = {**eval_acts.kept, **{f"eval: {k}": v for k, v in eval_acts.peak_terms().items()}}
        moment = f"eval step ({eval_acts.peak_moment})"
    elif at_step:
        details["optimizer"] = {**states, "step temporaries": step_temps}
        details["activations"] = {"token ids and labels (the last micro-batch)": batch_bytes(step)}
        moment = "optimizer step"
    else:
        details["activations"] = {**acts.kept, **acts.peak_terms()}
        moment = acts.peak_moment
    whole = Estimate(
        model=inv.name,
        method=method,
        settings=settings,
        bytes=train if peak_phase == "train" else evaluation,
        details=details,
        peak_moment=moment,
        parameters=inv.parameter_count(),
        trainable=sum(trainable),
        parameters_by_role=inv.counts_by_role(),
        phase=peak_phase,
        host_bytes=acts.host,
        checkpointed_layers=checkpointed(inv, step),
        recompute_saved_pct=recompute_saved_pct(inv, settings.seq_len, method, checkpointed(inv, step))
        if settings.checkpointing
        else None,
        phases={
            name: {
                "bytes": phase,
                "total_bytes": sum(phase.values()),
                "allocated_bytes": sum(phase.values()) - slack(overheads[name]),
            }
            for name, phase in (("train", train), ("eval", evaluation))
        },
    )
    return per_gpu(whole, inv, settings)


def estimate_recipe(recipe, num_labels: int | None = None) -> Estimate:
    """What `qlora train` would hold for `recipe` on the GPU it is planned for (its method and settings): the
    one answer to "what does this recipe cost", for training's `auto` keys, OOM advice, the model card and the CLI."""
    return estimate(*from_recipe(recipe, num_labels))


def liger_kernels(settings: Settings) -> bool:
    """Whether the step runs Liger Kernel's RMSNorm, SwiGLU, RoPE and fused loss: `training.kernels: auto` on CUDA
    (Triton kernels; a GPU install brings Liger, and training turns `auto` into `none` where it is missing)."""
    return settings.kernels == "auto" and settings.device == "cuda"


def long_context_step(inv: Inventory, settings: Settings) -> dict:
    """The Step fields of `training.mlp_tiles` and `training.offload_checkpoints`, resolved as the
    trainer resolves them (`qlora.config.long_context`). Offload acts on a GPU only and needs checkpointing;
    `auto` is resolved against a GPU size by the planner (here, without one: no offload)."""
    tokens = settings.batch_size * settings.seq_len
    offload = settings.offload_checkpoints is True and settings.checkpointing and settings.device == "cuda"
    return {
        # qlora.ops.tiled_mlp leaves mixture-of-experts blocks untiled (a dense first layer is counted as routed)
        "mlp_tiles": 1
        if inv.dims.moe_layers
        else mlp_tiles_for(settings.mlp_tiles, tokens, inv.dims.hidden, settings.strategy),
        "offload": offload,
    }


def _linear_tensors(linears) -> list[int]:
    """Element counts of the weight (and bias) of each linear layer."""
    sizes = []
    for lin in linears:
        sizes.append(lin.in_features * lin.out_features)
        if lin.bias:
            sizes.append(lin.out_features)
    return sizes


def _head_tensors(inv: Inventory) -> list[int]:
    """A classifier's head, which peft trains as a full copy (`modules_to_save`) next to LoRA; none for a causal LM."""
    return _linear_tensors(inv.classifier_head())


def _trainable_tensors(inv: Inventory, method: str, targets, rank: int, head: list[int], stacks=()) -> list[int]:
    """Element counts of the tensors the optimizer updates: every weight for full FT; LoRA A and B (on
    linears and expert `stacks`) and the classifier head's copy (`head`) otherwise."""
    if method != "full":
        lora = [n for lin in targets for n in (rank * lin.in_features, rank * lin.out_features)]
        experts = [n for s in stacks for n in (rank * s.experts * s.in_features, rank * s.experts * s.out_features)]
        return lora + experts + head
    return [t.numel for t in inv.params] + _linear_tensors(inv.linears) + [s.numel for s in inv.experts]


def weight_bytes(inv: Inventory, bits: int | None, double_quant: bool = True) -> dict[str, int]:
    """Stored bytes of the base model's parameters by kind: what `from_pretrained` holds for 16-, 8- or 4-bit.

    Buffers (RoPE frequencies) are not weights: they are counted with the overhead.
    """
    parts = {"embeddings": 0, "norms and other": 0, "linear layers (16-bit)": 0, "biases": 0}
    for t in inv.params:
        parts["embeddings" if t.role == "embedding" else "norms and other"] += t.numel * t.itemsize
    for lin in inv.linears:
        numel = lin.in_features * lin.out_features
        parts["biases"] += lin.out_features * lin.itemsize if lin.bias else 0
        if bits is None or not lin.quantized:
            parts["linear layers (16-bit)"] += numel * lin.itemsize
            continue
        layout = (
            nf4_weight_bytes(numel, double_quant)
            if bits == 4
            else int8_weight_bytes(lin.in_features, lin.out_features)
        )
        for name, size in layout.items():
            parts[name] = parts.get(name, 0) + size
    for stack in inv.experts:  # qlora quantizes fused expert stacks in a 4-bit load only (qlora.ops.experts)
        if bits != 4:
            parts["expert stacks (16-bit)"] = parts.get("expert stacks (16-bit)", 0) + stack.numel * stack.itemsize
            continue
        for name, size in nf4_weight_bytes(stack.numel, double_quant).items():
            parts[f"experts: {name}"] = parts.get(f"experts: {name}", 0) + size
    return {k: v for k, v in parts.items() if v}


def optimizer_bytes(optimizer: str, trainable: list[int], param_dtype, device: str = "cuda") -> dict[str, int]:
    """AdamW's two moments per trainable tensor, in the dtype `qlora.config.precision` says the optimizer keeps.

    bitsandbytes makes its 8-bit code tables with the first tensor large enough for 8-bit states;
    torch's AdamW keeps each tensor's step count as an fp32 scalar tensor, on the CPU even when
    training on a GPU (so it counts only on a CPU).
    """
    itemsize = optimizer_state_dtype(optimizer, param_dtype).itemsize
    parts = {"Adam moments": sum(adamw_state_bytes(n, itemsize) for n in trainable)}
    if itemsize == 1 and any(n >= MIN_8BIT_SIZE for n in trainable):
        parts["8-bit code tables"] = QMAP_BYTES
    if optimizer == "adamw_torch" and device == "cpu":
        parts["step counters"] = len(trainable) * 4
    return parts


def optimizer_step_temporaries(optimizer: str, device: str, trainable: list[int], param_dtype) -> int:
    """Scratch tensors `optimizer.step()` allocates, from each implementation's code.

    CUDA: bitsandbytes' update kernels are fused (none); torch AdamW's default multi-tensor path
    allocates sqrt(v) for every tensor at once. CPU: updates go tensor by tensor; torch AdamW keeps
    sqrt(v) and its scaled copy (2), bitsandbytes' 32-bit update the scaled gradient, sqrt(v) and
    the denominator (3), its 8-bit update also both moments dequantized to fp32 (5).
    """
    if not trainable:
        return 0
    itemsize = optimizer_state_dtype(optimizer, param_dtype).itemsize
    if optimizer == "adamw_torch":
        return sum(trainable) * itemsize if device == "cuda" else 2 * max(trainable) * itemsize
    if device == "cuda":
        return 0
    fp32 = 4
    if itemsize == 1:
        return max((5 if n >= MIN_8BIT_SIZE else 3) * n * fp32 for n in trainable)
    return 3 * max(trainable) * fp32
