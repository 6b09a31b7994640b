"""`qlora merge OUT --to DIR [--dtype float16|bfloat16] [--device auto|cuda|layers|cpu]`: the adapter
folded into a plain 16-bit model.

Merging onto the original checkpoint is the known trap (peft issues 1080, 2105, 2321): the adapter
learned to correct the 4-bit weights, not the originals, so its deltas would land on the wrong base.
Here the base is loaded exactly as training loaded it, every 4-bit weight is dequantized in the
compute dtype training saw (transformers' `dequantize`, i.e. bitsandbytes' dequantize_4bit), peft
merges the adapter, and the saved model's logits are checked against the 4-bit base + adapter
before the folder is published. The merge math runs in the compute dtype (fp32 on CPU) and the
result is cast to `--dtype` only for saving. Where it runs (the whole model on the GPU, one layer at
a time, or the CPU) follows from what it needs (qlora.memory.merge) and what the GPU has free.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import bitsandbytes as bnb
import psutil
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.integrations.bitsandbytes import dequantize_bnb_weight

from qlora.config.disk import DiskFull, check_free_space, writing
from qlora.config.errors import QLoraError
from qlora.config.io import publish_dir, staging_dir_for
from qlora.config.precision import resolve_compute_dtype
from qlora.memory.disk import merged_model_bytes
from qlora.memory.inventory import load_inventory
from qlora.memory.merge import PLACEMENTS, MergeMemory, choose_placement, describe, free_gpu_bytes, merge_memory_bytes
from qlora.model.lora import quiet_peft_deprecations
from qlora.model.release import free_memory, release
from qlora.ops.experts import dequantize_experts
from qlora.post.export import TrainedRun, check_destination, tokenizer_files_bytes
from qlora.post.generate import format_prompt, load_adapted_model, load_run_base

log = logging.getLogger(__name__)

SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# Of what the adapter changes (max |logits of 4-bit base + adapter - logits of 4-bit base|). A right merge
# differs from the 4-bit base + adapter only by rounding to --dtype (0.04 % fp16, 0.2 % bf16 on the tests'
# tiny run); a merge onto the original, unquantized weights lands at 3 % there, and further on real models,
# whose quantization error moves logits about as much as a short fine-tune does.
MAX_RELATIVE_DIFF = 0.01
# On a GPU the check's two sides run different 16-bit kernels, and rounding alone can pass 1 % of what a short
# fine-tune changes (H200, bf16: 1.85 %). So the check also measures that rounding on the base alone (the
# dequantized base stored in --dtype against the 4-bit base, same kernels): a merge within FLOOR_MULTIPLE times
# that floor is rounding too. The wrong base differs by the quantization error, tens of times the floor.
FLOOR_MULTIPLE = 3.0
CHECK_INSTRUCTIONS = (
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in one sentence.",
)


@dataclass
class MergeCheck:
    """How far the merged model's logits are from those of the 4-bit base + adapter, measured against how
    far the adapter moves them (a logit-scale measure cannot tell a wrong base from rounding)."""

    max_abs_diff: float
    adapter_change: float
    logit_scale: float
    positions: int
    placement: str = ""
    floor: float = 0.0  # what rounding alone does: the dequantized base in --dtype against the 4-bit base
    finite: bool = True  # every logit of the merged model, on every prompt

    @property
    def relative(self) -> float:
        if self.adapter_change:
            return self.max_abs_diff / self.adapter_change
        return 0.0 if self.max_abs_diff == 0 else float("inf")  # an adapter that changes nothing

    @property
    def ok(self) -> bool:
        return self.finite and (self.relative <= MAX_RELATIVE_DIFF or self.max_abs_diff <= FLOOR_MULTIPLE * self.floor)


def check_inputs(run: TrainedRun, tokenizer) -> list[torch.Tensor]:
    """Token ids of a few prompts in the run's format (BOS included), one tensor per prompt."""
    texts = [format_prompt(run, tokenizer, text) for text in CHECK_INSTRUCTIONS]
    return [tokenizer(t, add_special_tokens=False, return_tensors="pt")["input_ids"] for t in texts]


@torch.no_grad()
def logits_for(model, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """fp32 logits of each input, one input at a time (no padding to mask): (positions, vocabulary) for a
    causal LM, (1, labels) for a classifier."""
    outputs = [model(ids.to(model.device)).logits for ids in inputs]
    return [logits.reshape(-1, logits.shape[-1]).float().cpu() for logits in outputs]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The largest |a - b| over every prompt; NaN when any is NaN (Python's max skips NaN after the first item)."""
    return float(torch.stack([(x - y).abs().max() for x, y in zip(a, b)]).max())


def compare(
    reference: list[torch.Tensor], candidate: list[torch.Tensor], base: list[torch.Tensor], floor: float = 0.0
) -> MergeCheck:
    """`candidate` vs `reference` (4-bit base + adapter), against `reference` vs `base` (4-bit base alone) and
    the rounding `floor`."""
    return MergeCheck(
        max_abs_diff=max_diff(reference, candidate),
        adapter_change=max_diff(reference, base),
        logit_scale=max(float(r.abs().max()) for r in reference),
        positions=sum(r.shape[0] for r in reference),
        floor=floor,
        finite=all(bool(torch.isfinite(c).all()) for c in candidate),
    )


def reference_logits(run: TrainedRun, inputs_for, device: str | None, compute_dtype: torch.dtype):
    """(inputs, logits of the 4-bit base + adapter, logits of the 4-bit base alone, tokenizer)."""
    adapted, tokenizer = load_adapted_model(run, device, compute_dtype)
    inputs = inputs_for(run, tokenizer)
    with_adapter = logits_for(adapted, inputs)
    with adapted.disable_adapter():
        base_only = logits_for(adapted, inputs)
    release(adapted)
    del adapted
    free_memory()
    return inputs, with_adapter, base_only, tokenizer


def dequantize_layer_by_layer(model, dtype: torch.dtype, to: str = "cpu"):
    """Replace each bitsandbytes Linear by a plain one on `to`, one at a time, then move the rest there.

    transformers' `dequantize` converts in place, so the whole dense model ends up on the GPU; here the
    GPU holds the quantized model and one dense weight at a time (the same bitsandbytes dequantization).
    """
    for name, module in list(model.named_modules()):
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        weight = dequantize_bnb_weight(module.weight, getattr(module, "state", None)).to(to, dtype)
        with torch.device("meta"):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        dense.weight = torch.nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            dense.bias = torch.nn.Parameter(module.bias.detach().to(to, dtype), requires_grad=False)
        model.set_submodule(name, dense)
        release(module)  # the replaced 4-bit layer is freed here, not at the next collection
        del module, weight
        free_memory()
    dequantize_experts(model, dtype, to)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    return model.to(to)


def dequantized_base(run: TrainedRun, compute_dtype: torch.dtype, tokenizer, placement: str = "cuda"):
    """The base exactly as training loaded it, its quantized weights turned into plain Linears (on the GPU
    for `cuda`, on the CPU for `cpu` and `layers`).

    Always a fresh load that has never run: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit
    weight into a CPU-only layout on its first inference forward, which dequantize_4bit misreads.
    """
    base = load_run_base(run, compute_dtype, tokenizer, "cpu" if placement == "cpu" else None)
    if not getattr(base, "is_quantized", False):
        return base if placement == "cuda" else base.to("cpu")
    if placement == "layers":
        return dequantize_layer_by_layer(base, compute_dtype, to="cpu")
    base = base.dequantize(dtype=compute_dtype)
    dequantize_experts(base, compute_dtype)  # fused expert stacks: qlora's own 4-bit, not bitsandbytes Linears
    return base


def merged_model(run: TrainedRun, compute_dtype: torch.dtype, save_dtype: str, tokenizer, placement: str = "cuda"):
    """Dequantized base + adapter, merged (peft; a classifier's trained head replaces the new one) and
    cast to `save_dtype`."""
    base = dequantized_base(run, compute_dtype, tokenizer, placement)
    with quiet_peft_deprecations():
        model = PeftModel.from_pretrained(base, str(run.adapter_dir)).merge_and_unload()
    model = model.to(SAVE_DTYPES[save_dtype])
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise QLoraError(f"--dtype {save_dtype}: merged weights overflow {save_dtype}; use --dtype bfloat16")
    return model


def rounding_floor(
    run: TrainedRun,
    compute_dtype: torch.dtype,
    save_dtype: str,
    tokenizer,
    placement: str,
    inputs: list[torch.Tensor],
    base_only: list[torch.Tensor],
) -> float:
    """max |logits of the dequantized base stored in `save_dtype` - logits of the 4-bit base|: what rounding to
    --dtype (and the other kernels) does without any adapter, run the way the saved model is checked."""
    base = dequantized_base(run, compute_dtype, tokenizer, placement).to(SAVE_DTYPES[save_dtype])
    if placement != "cuda" or not torch.cuda.is_available():
        base = base.float()  # as reload_saved runs a saved model off the GPU
    floor = max_diff(base_only, logits_for(base.eval(), inputs))
    del base
    free_memory()
    return floor


def auto_class(run: TrainedRun):
    """The transformers class a user loads the merged model with."""
    return AutoModelForSequenceClassification if run.label_names else AutoModelForCausalLM


def reload_saved(run: TrainedRun, folder: Path, save_dtype: str, placement: str = "cuda", budget: int | None = None):
    """The saved folder as a user loads it: plain transformers, no peft, no quantization. Layer by layer,
    accelerate keeps what does not fit `budget` on the CPU and runs it on the GPU a layer at a time."""
    loader = auto_class(run)
    if placement == "cuda" and torch.cuda.is_available():
        return loader.from_pretrained(
            folder, dtype=SAVE_DTYPES[save_dtype], device_map={"": torch.cuda.current_device()}
        )
    if placement == "layers" and torch.cuda.is_available():
        max_memory = {torch.cuda.current_device(): int(budget or 0), "cpu": psutil.virtual_memory().available}
        return loader.from_pretrained(folder, dtype=SAVE_DTYPES[save_dtype], device_map="auto", max_memory=max_memory)
    return loader.from_pretrained(folder, dtype=torch.float32)  # CPU 16-bit matmuls are slow and lossy


def run_inventory(run: TrainedRun, dtype: str):
    """The profiler's inventory of the run's base (meta device: nothing is loaded)."""
    return load_inventory(run.recipe.model.name_or_path, dtype, run.recipe.task, len(run.label_names or []) or 2)


def merged_bytes(run: TrainedRun, save_dtype: str) -> int:
    """What the merged folder will hold: every weight in `save_dtype` (qlora.memory.disk) and the tokenizer."""
    return merged_model_bytes(run_inventory(run, save_dtype), save_dtype, tokenizer_files_bytes(run))


def check_merge_space(run: TrainedRun, to: Path, save_dtype: str, skip: bool = False) -> int | None:
    """Refuse (one line, exit 6) a merge whose folder would not fit the free space at `to`, before anything
    loads; returns the bytes it will write (None when the base cannot be sized: a note says so)."""
    try:
        needed = merged_bytes(run, save_dtype)
    except Exception as exc:  # no config to size it from: the merge itself may still work
        log.warning(f"note: disk space not checked (the merged model's size is unknown: {exc})")
        return None
    check_free_space(f"the merged model ({save_dtype})", to, needed, skip, advice="free space or choose another --to")
    return needed


def choose_merge_placement(run: TrainedRun, compute_dtype: torch.dtype, device: str, gpu_memory: int | None):
    """(placement, GPU budget, the line saying why): `--device` resolved against what the merge needs."""
    if device not in PLACEMENTS:
        raise QLoraError(f"--device: unknown value '{device}' (valid: {', '.join(PLACEMENTS)})")
    free = free_gpu_bytes()
    budget = min(free, gpu_memory) if (free is not None and gpu_memory) else free
    q, dtype = run.recipe.quantization, str(compute_dtype).removeprefix("torch.")
    try:
        memory = merge_memory_bytes(run_inventory(run, dtype), dtype, q.bits, q.double_quant)
    except Exception as exc:  # no config to size it from: auto keeps the old behaviour (the GPU when there is one)
        placement = choose_placement(device, MergeMemory(0, 0, 0), budget)
        return placement, budget, f"merge memory: not estimated ({exc}); merging on {placement}"
    placement = choose_placement(device, memory, budget)
    return placement, budget, describe(memory, placement, budget)


def merge(
    run: TrainedRun,
    to: Path,
    save_dtype: str = "float16",
    overwrite: bool = False,
    device: str = "auto",
    gpu_memory: int | None = None,
    skip_space_check: bool = False,
) -> MergeCheck:
    """Merge, save to a staging folder, check logits, and publish to `to` only when the check passes.

    `device`: auto | cuda | layers | cpu (see qlora.memory.merge); `gpu_memory`: a GPU budget in bytes
    below what is free. The free space at `to` is checked first (`skip_space_check`: not), and a full
    disk while saving is `DiskFull`, with nothing left at `to`."""
    check_destination(to, run, overwrite)
    needed = check_merge_space(run, to, save_dtype, skip_space_check)
    compute_dtype = resolve_compute_dtype(run.recipe.quantization.compute_dtype)
    placement, budget, why = choose_merge_placement(run, compute_dtype, device, gpu_memory)
    log.info(why)
    if placement == "cpu":  # `auto` is fp32 on a CPU whatever GPU the host has (bf16 matmuls there are slow and lossy)
        compute_dtype = resolve_compute_dtype(run.recipe.quantization.compute_dtype, "cpu")
    inputs, reference, base_only, tokenizer = reference_logits(
        run, check_inputs, "cpu" if placement == "cpu" else None, compute_dtype
    )
    floor = rounding_floor(run, compute_dtype, save_dtype, tokenizer, placement, inputs, base_only)
    staging = staging_dir_for(to)
    try:
        model = merged_model(run, compute_dtype, save_dtype, tokenizer, placement)
        with writing("the merged model", to, needed):
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        del model
        free_memory()
        reloaded = reload_saved(run, staging, save_dtype, placement, budget)
        check = compare(reference, logits_for(reloaded.eval(), inputs), base_only, floor)
        check.placement = placement
        del reloaded
        free_memory()
        if check.ok:
            with writing("the merged model", to, needed):
                publish_dir(staging, to)
    except DiskFull as full:
        shutil.rmtree(staging, ignore_errors=True)
        full.measure_free()
        full.kept = f"partial files removed, nothing was written to {to}; free space, then run qlora merge again"
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check
