"""What `qlora merge` needs on the GPU, and where it therefore runs (`--device auto|cuda|layers|cpu`).

A merge holds, at its peak, the whole dequantized model in the compute dtype plus one weight being
converted (an 8B model in fp16: ~15 GiB, more than a T4 has). Merging layer by layer keeps only the
4-bit model and one dense weight on the GPU (the merged model grows in CPU memory); merging on the
CPU needs no GPU at all. The sizes come from the profiler's inventory, so `qlora profile` and
`qlora merge` agree on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qlora.config.errors import QLoraError
from qlora.memory.estimate import weight_bytes
from qlora.memory.inventory import Inventory, load_inventory
from qlora.memory.overheads import cuda_overheads

PLACEMENTS = ("auto", "cuda", "layers", "cpu")
CHECK_POSITIONS = 256  # the merge check's prompts (a few dozen tokens each): their fp32 logits, with room


@dataclass(frozen=True)
class MergeMemory:
    """GPU bytes a merge needs: everything on the GPU (`full`) or one layer at a time (`layers`).

    Tensor bytes plus the allocator's slack; the CUDA context is extra (`context`), and already spent
    on a GPU that torch has initialised, which is what `free_gpu_bytes` sees."""

    full: int
    layers: int
    context: int

    def needs(self, placement: str) -> int:
        return {"cuda": self.full, "layers": self.layers, "cpu": 0}[placement]


def merge_memory_bytes(model, dtype: str = "bfloat16", bits: int | None = 4, double_quant: bool = True) -> MergeMemory:
    """The GPU memory a merge of `model` (catalog name, folder, config.json or `Inventory`) needs when its
    merge math runs in `dtype` (the run's compute dtype), for a base trained in `bits` (4, 8 or None)."""
    inv = model if isinstance(model, Inventory) else load_inventory(str(model), dtype)
    quantized = sum(weight_bytes(inv, bits, double_quant).values())
    dense = sum(weight_bytes(inv, None).values())
    converted = [lin for lin in inv.linears if lin.quantized and bits is not None]  # the head stays as it is
    largest = max((lin.in_features * lin.out_features * lin.itemsize for lin in converted), default=0)
    logits = CHECK_POSITIONS * inv.dims.vocab * 4
    # Everything on the GPU: the dequantized model while the last weight is being converted (the 4-bit
    # reference model is freed before); layer by layer: the 4-bit model and one weight, dense and cast.
    full = max(quantized, dense + largest) + logits
    layers = quantized + 2 * largest + logits
    context, allocator_slack = cuda_overheads()
    slack = 1 + allocator_slack
    return MergeMemory(full=int(full * slack), layers=int(layers * slack), context=context)


def free_gpu_bytes() -> int | None:
    """Free memory on the current GPU as the driver reports it (None without a GPU)."""
    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return int(free)


def choose_placement(requested: str, memory: MergeMemory, budget: int | None) -> str:
    """`cuda`, `layers` or `cpu` for `--device requested` with `budget` GPU bytes (None: no GPU).

    auto takes the fastest that fits: everything on the GPU, else layer by layer, else the CPU."""
    if requested not in PLACEMENTS:
        raise QLoraError(f"--device: unknown value '{requested}' (valid: {', '.join(PLACEMENTS)})")
    if requested == "cpu":
        return "cpu"
    if budget is None:
        if requested == "auto":
            return "cpu"
        raise QLoraError(f"--device {requested}: no CUDA GPU is available (use --device cpu or auto)")
    if requested != "auto":
        return requested
    for placement in ("cuda", "layers"):
        if memory.needs(placement) <= budget:
            return placement
    return "cpu"


def describe(memory: MergeMemory, placement: str, budget: int | None) -> str:
    """One line for the user: what each placement needs, what is free, which one runs."""
    gib = 2**30
    free = f"{budget / gib:.2f} GiB free on the GPU" if budget is not None else "no GPU"
    return (
        f"merge memory: {memory.full / gib:.2f} GiB on the GPU for the whole model, {memory.layers / gib:.2f} GiB "
        f"layer by layer (plus the CUDA context); {free}: merging on {placement}"
    )
