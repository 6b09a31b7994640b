"""Bytes on disk: one checkpoint, the final adapter, a run's checkpoints at once, a merged model.

From the same inventory and the same trainable tensors and optimizer states as the memory estimate
(qlora.memory.estimate), so the profiler, `qlora train`'s space check and `qlora merge`'s agree:

    adapter     = trainable tensors in their dtype (fp32 LoRA A/B, a classifier head's copy)
                  + a safetensors header entry per tensor + peft's config and card + the tokenizer
    checkpoint  = adapter + optimizer states (torch.save: both AdamW moments of every trainable tensor,
                  8-bit ones with their scales) + the Trainer's files (RNG, scheduler, trainer state,
                  training arguments) + qlora's COMPLETE marker
    merged      = every parameter in the saved dtype + a header entry per tensor + config and tokenizer

The per-file terms are allowances measured on transformers 5.24 / peft 0.21 / torch 2.13 (a tiny Llama's
checkpoint: rng_state.pth 14 KiB, training_args.bin 5 KiB, scheduler.pt 1.5 KiB, peft's README 5 KiB,
~130 bytes of safetensors header and ~300 bytes of torch.save records per tensor), rounded up; a real
model's checkpoint is its tensors to within a fraction of a percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from qlora.config.precision import ADAPTER_DTYPE, DTYPES, optimizer_state_dtype, trainable_dtype
from qlora.memory.estimate import _head_tensors, _trainable_tensors, optimizer_bytes
from qlora.memory.inventory import Inventory
from qlora.memory.settings import Settings, compute_dtype
from qlora.memory.storage import MIN_8BIT_SIZE

SAFETENSORS_TENSOR_BYTES = 256  # one header entry (name, dtype, shape, offsets) and alignment; ~130 measured
TORCH_SAVE_TENSOR_BYTES = 512  # per tensor in optimizer.pt: its zip records and pickled keys (~300 measured)
ADAPTER_FILES_BYTES = 16 * 2**10  # adapter_config.json and peft's README.md (~6.5 KiB measured)
TRAINER_FILES_BYTES = 64 * 2**10  # rng_state.pth, scheduler.pt, training_args.bin, COMPLETE (~23 KiB measured)
LOG_ENTRY_BYTES = 512  # trainer_state.json grows by one log_history entry per logging step (~280 measured)
MODEL_FILES_BYTES = 64 * 2**10  # a merged model's config.json, generation_config.json, safetensors index
RESULTS_BYTES = 256 * 2**10  # metrics.json, recipe.yaml, training.png, baseline.json
# The profiler has no tokenizer: tokenizer.json holds about this much per vocabulary entry (token, id, merges;
# Llama 3.1: 9.1 MB for 128,256 entries, Qwen2.5: 7.0 MB for 151,665). Training measures its own.
TOKENIZER_BYTES_PER_TOKEN = 72


@dataclass(frozen=True)
class RunDisk:
    """What a training run writes to its output folder, in bytes."""

    adapter: int  # the final adapter folder (adapter/), also inside every checkpoint
    optimizer: int  # optimizer.pt of one checkpoint
    checkpoint: int  # one checkpoint-N/ folder, all of it
    checkpoints: int  # how many exist at once (save_total_limit + 1 while the newest is written)

    @property
    def total(self) -> int:
        return self.checkpoints * self.checkpoint + self.adapter + RESULTS_BYTES

    def to_dict(self) -> dict:
        return {
            "adapter_bytes": self.adapter,
            "checkpoint_bytes": self.checkpoint,
            "optimizer_bytes": self.optimizer,
            "checkpoints_at_once": self.checkpoints,
            "total_bytes": self.total,
        }


def trainable_tensors(inv: Inventory, method: str, settings: Settings) -> list[int]:
    """Element counts of the tensors training saves (LoRA A and B, a classifier head's copy; every weight for full)."""
    targets = () if method == "full" else inv.lora_targets(settings.targets)
    stacks = () if method == "full" else inv.expert_targets(settings.targets)  # expert LoRA (mixture of experts)
    head = [] if method == "full" else _head_tensors(inv)
    return _trainable_tensors(inv, method, targets, settings.rank, head, stacks)


def adapter_bytes(inv: Inventory, method: str, settings: Settings, tokenizer_bytes: int = 0) -> int:
    """The final adapter folder: the trained tensors in safetensors, peft's config and card, the tokenizer."""
    tensors = trainable_tensors(inv, method, settings)
    itemsize = trainable_dtype(method, compute_dtype(settings)).itemsize
    return sum(tensors) * itemsize + len(tensors) * SAFETENSORS_TENSOR_BYTES + ADAPTER_FILES_BYTES + tokenizer_bytes


def optimizer_state_bytes(inv: Inventory, method: str, settings: Settings) -> int:
    """optimizer.pt: the optimizer states the memory estimate counts (qlora.memory.estimate.optimizer_bytes),
    as torch.save stores them (on any device, step counters included), plus its records per tensor."""
    tensors = trainable_tensors(inv, method, settings)
    dtype = trainable_dtype(method, compute_dtype(settings))
    states = optimizer_bytes(settings.optimizer, tensors, dtype, "cpu")
    return (
        sum(states.values())
        + sum(saved_state_tensors(settings.optimizer, n) for n in tensors) * TORCH_SAVE_TENSOR_BYTES
    )


def saved_state_tensors(optimizer: str, numel: int) -> int:
    """Tensors optimizer.pt holds for one parameter: both moments; 8-bit ones (bitsandbytes) also their two
    absmax tensors; torch's AdamW its step count (bitsandbytes keeps the step as a plain number)."""
    if optimizer_state_dtype(optimizer, ADAPTER_DTYPE).itemsize == 1 and numel >= MIN_8BIT_SIZE:
        return 4
    return 3 if optimizer == "adamw_torch" else 2


def checkpoints_at_once(save_total_limit: int | None, saves: int, existing: int = 0) -> int:
    """New checkpoints the disk must hold at the run's fullest moment: qlora rotates (keeps `save_total_limit`)
    only after the newest is complete, so limit + 1 exist while it is written; `existing` are on disk already."""
    at_most = existing + max(saves, 0)
    peak = at_most if not save_total_limit or save_total_limit < 1 else min(save_total_limit + 1, at_most)
    return max(peak - existing, 0)


def run_disk_bytes(
    inv: Inventory, method: str, settings: Settings, checkpoints: int, tokenizer_bytes: int = 0, log_entries: int = 0
) -> RunDisk:
    """Bytes a run writes: `checkpoints` at once (see `checkpoints_at_once`) and the final adapter."""
    adapter = adapter_bytes(inv, method, settings, tokenizer_bytes)
    optimizer = optimizer_state_bytes(inv, method, settings)
    checkpoint = adapter + optimizer + TRAINER_FILES_BYTES + log_entries * LOG_ENTRY_BYTES
    return RunDisk(adapter=adapter, optimizer=optimizer, checkpoint=checkpoint, checkpoints=checkpoints)


def profile_disk(
    inv: Inventory, method: str, settings: Settings, save_total_limit: int | None, max_steps: int, save_steps: int
) -> dict:
    """What `qlora profile` reports beside memory: a run's checkpoints and adapter (`RunDisk.to_dict`) and the
    merged model (float16), with the tokenizer sized from the vocabulary. Without `max_steps` (epochs over data
    the profiler does not read) the run is taken to write at least `save_total_limit` + 1 checkpoints."""
    saves = saves_of(max_steps, save_steps) if max_steps > 0 else (save_total_limit or 0) + 1
    tokenizer = TOKENIZER_BYTES_PER_TOKEN * inv.dims.vocab
    needs = run_disk_bytes(inv, method, settings, checkpoints_at_once(save_total_limit, saves), tokenizer)
    return {**needs.to_dict(), "merged_float16_bytes": merged_model_bytes(inv, "float16", tokenizer)}


def saves_of(max_steps: int, save_steps: int) -> int:
    """Checkpoints a run of `max_steps` optimizer steps writes: every `save_steps`, and one at the end."""
    if max_steps <= 0 or save_steps <= 0:
        return 0
    return ceil(max_steps / save_steps)


def merged_model_bytes(inv: Inventory, save_dtype: str, tokenizer_bytes: int = 0) -> int:
    """`qlora merge`'s folder: every parameter of the model (a tied head once) in `save_dtype`, safetensors."""
    itemsize = DTYPES[save_dtype].itemsize
    tensors = len(inv.params) + sum(1 + bool(lin.bias) for lin in inv.linears)
    return inv.parameter_count() * itemsize + tensors * SAFETENSORS_TENSOR_BYTES + MODEL_FILES_BYTES + tokenizer_bytes
