"""`qlora init`'s arithmetic: the recipe that fits a model and a dataset on one GPU, sized by the planner.

The data fixes the sequence length (the 99th percentile of its token lengths, rounded up to a multiple
of 64); then, from the fastest setting to the most frugal, the first that fits: the largest per-device
batch that divides the target global batch (the rest is gradient accumulation), with
`gradient_checkpointing: auto` (the fewest layers that fit), then checkpointed inputs offloaded to host
RAM, the 8-bit paged optimizer, a lower rank; only then a shorter sequence (the share of examples it
truncates is said). Every candidate is a recipe, predicted as `qlora profile --recipe` predicts it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from qlora.config.errors import QLoraError
from qlora.config.recipe import recipe_from_mapping
from qlora.data.lengths import Lengths
from qlora.memory.estimate import GIB, Estimate, settings_inventory
from qlora.memory.planner import largest, predict
from qlora.memory.settings import from_recipe

TARGET_GLOBAL_BATCH = 16  # sequences per optimizer step (the QLoRA paper's 7B-13B runs use 16)
PERCENTILE = 99  # data.max_seq_len holds this share of the examples whole
SEQ_MULTIPLE = 64
MIN_SEQ = 64
RANK = 16
METHOD_BITS = {"qlora": 4, "lora-8bit": 8, "lora": "none"}
# From the fastest to the most frugal: (optimizer, offload checkpointed inputs, rank)
LADDER = (
    ("paged_adamw_32bit", False, RANK),
    ("paged_adamw_32bit", True, RANK),
    ("paged_adamw_8bit", True, RANK),
    ("paged_adamw_8bit", True, 8),
    ("paged_adamw_8bit", True, 4),
)


@dataclass(frozen=True)
class Sizing:
    """The chosen recipe (plain data, as YAML will hold it) and what it was chosen from."""

    recipe: dict
    estimate: Estimate
    gpu_bytes: int
    layers: int
    wanted_seq: int  # what the data asked for (percentile, rounded)
    lengths: Lengths


def round_up(n: int, multiple: int = SEQ_MULTIPLE) -> int:
    return max(MIN_SEQ, -(-n // multiple) * multiple)


def merged(base: dict, **sections) -> dict:
    """`base` with each section's keys updated (a deep copy)."""
    out = copy.deepcopy(base)
    for name, keys in sections.items():
        out.setdefault(name, {}).update(keys)
    return out


def base_recipe(model: str, data_path: str, data_format: str, method: str, gpu: str, output_dir: str) -> dict:
    task = "classification" if data_format == "classification" else "causal_lm"
    return {
        "model": {"name_or_path": model},
        "quantization": {"bits": METHOD_BITS[method]},
        "lora": {"r": RANK, "alpha": 2 * RANK, "dropout": 0.05, "targets": "all-linear"},
        "task": task,
        "data": {"path": data_path, "format": data_format},
        "training": {"gradient_checkpointing": "auto"},
        "target_gpu": gpu,
        "output_dir": output_dir,
    }


def candidate(base: dict, seq: int, batch: int, optimizer: str, offload: bool, rank: int) -> dict:
    return merged(
        base,
        lora={"r": rank, "alpha": 2 * rank},
        data={"max_seq_len": seq},
        training={
            "batch_size": batch,
            "grad_accum": TARGET_GLOBAL_BATCH // batch,
            "optimizer": optimizer,
            "offload_checkpoints": offload,
        },
    )


def predicted(data: dict, inv, gpu_bytes: int, bf16: bool, num_labels: int | None) -> Estimate:
    """The peak `qlora profile --recipe` predicts for the recipe `data` on its target GPU."""
    recipe = recipe_from_mapping(data, for_training=False)
    _, method, settings = from_recipe(recipe, num_labels=num_labels)
    return predict(inv, method, settings.replace(native_bf16=bf16), gpu_bytes)


def size_recipe(
    base: dict, lengths: Lengths, gpu_bytes: int, bf16: bool = True, num_labels: int | None = None
) -> Sizing:
    """The first candidate that fits (see the module's docstring); a QLoraError with the reason when none does."""
    recipe = recipe_from_mapping(base, for_training=False)
    _, method, settings = from_recipe(recipe, num_labels=num_labels)  # a classifier's labels, counted once
    num_labels = settings.num_labels
    inv = settings_inventory(recipe.model.name_or_path, settings.replace(native_bf16=bf16))
    limit = inv.dims.max_positions
    wanted = min(round_up(lengths.percentile(PERCENTILE)), limit)
    fits = lambda data: predicted(data, inv, gpu_bytes, bf16, num_labels)
    batches = [b for b in (16, 8, 4, 2, 1) if TARGET_GLOBAL_BATCH % b == 0]
    for optimizer, offload, rank in LADDER:
        for batch in batches:
            data = candidate(base, wanted, batch, optimizer, offload, rank)
            est = fits(data)
            if est.total <= gpu_bytes:
                return Sizing(data, est, gpu_bytes, inv.dims.layers, wanted, lengths)
    optimizer, offload, rank = LADDER[-1]  # the most frugal setting, at the longest sequence that fits
    within = lambda n: fits(candidate(base, n, 1, optimizer, offload, rank)).total <= gpu_bytes
    longest = largest(within, wanted) // SEQ_MULTIPLE * SEQ_MULTIPLE
    if longest >= MIN_SEQ:
        data = candidate(base, longest, 1, optimizer, offload, rank)
        return Sizing(data, fits(data), gpu_bytes, inv.dims.layers, wanted, lengths)
    floor = fits(candidate(base, MIN_SEQ, 1, optimizer, offload, rank))
    raise QLoraError(
        f"nothing fits: {inv.name} {method} needs {floor.total / GIB:.2f} GiB of the GPU's {gpu_bytes / GIB:.2f} GiB "
        f"even at batch 1, {MIN_SEQ} tokens, rank {rank}, 8-bit paged AdamW and every layer checkpointed "
        f"(the weights alone: {floor.bytes['weights'] / GIB:.2f} GiB); use a GPU with more memory, several (qlora "
        f"profile --model {recipe.model.name_or_path} --gpu {base['target_gpu']} --gpus auto) or a smaller model"
    )
