"""`qlora merge OUT --to DIR [--dtype float16|bfloat16]`: the adapter folded into a plain 16-bit model.

Merging onto the original checkpoint is the known trap (peft issues 1080, 2105, 2321): the adapter
learned to correct the 4-bit weights, not the originals, so its deltas would land on the wrong base.
Here the base is loaded exactly as training loaded it, every 4-bit weight is dequantized in the
compute dtype training saw (transformers' `dequantize`, i.e. bitsandbytes' dequantize_4bit), peft
merges the adapter, and the saved model's logits are checked against the 4-bit base + adapter
before the folder is published. The merge math runs in the compute dtype (fp32 on CPU) and the
result is cast to `--dtype` only for saving.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from qlora.errors import QLoraError, run_cli
from qlora.export import TrainedRun, check_destination, read_run
from qlora.generate import format_prompt, load_adapted_model, load_run_base

SAVE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_RELATIVE_DIFF = 0.02  # of the logit scale (max |logit| of the 4-bit base + adapter)
MISMATCH_EXIT_CODE = 4
CHECK_INSTRUCTIONS = (
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in one sentence.",
)


@dataclass
class MergeCheck:
    """How far the merged model's logits are from those of the 4-bit base + adapter."""

    max_abs_diff: float
    logit_scale: float
    positions: int

    @property
    def relative(self) -> float:
        return self.max_abs_diff / self.logit_scale if self.logit_scale else float("inf")

    @property
    def ok(self) -> bool:
        return self.relative <= MAX_RELATIVE_DIFF


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


def compare(reference: list[torch.Tensor], candidate: list[torch.Tensor]) -> MergeCheck:
    return MergeCheck(
        max_abs_diff=max(float((r - c).abs().max()) for r, c in zip(reference, candidate)),
        logit_scale=max(float(r.abs().max()) for r in reference),
        positions=sum(r.shape[0] for r in reference),
    )


def dequantized_base(run: TrainedRun, compute_dtype: torch.dtype, tokenizer):
    """The base exactly as training loaded it, its quantized weights turned into plain Linears.

    Always a fresh load that has never run: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit
    weight into a CPU-only layout on its first inference forward, which dequantize_4bit misreads.
    """
    base = load_run_base(run, compute_dtype, tokenizer)
    if getattr(base, "is_quantized", False):
        base = base.dequantize(dtype=compute_dtype)
    return base


def merged_model(run: TrainedRun, compute_dtype: torch.dtype, save_dtype: str, tokenizer):
    """Dequantized base + adapter, merged (peft; a classifier's trained head replaces the new one) and
    cast to `save_dtype`."""
    from peft import PeftModel

    from qlora.model import quiet_peft_deprecations

    base = dequantized_base(run, compute_dtype, tokenizer)
    with quiet_peft_deprecations():
        model = PeftModel.from_pretrained(base, str(run.adapter_dir)).merge_and_unload()
    model = model.to(SAVE_DTYPES[save_dtype])
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise QLoraError(f"--dtype {save_dtype}: merged weights overflow {save_dtype}; use --dtype bfloat16")
    return model


def free_memory() -> None:
    """Return a deleted model's memory before loading the next, so the peak is one model, not two."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def auto_class(run: TrainedRun):
    """The transformers class a user loads the merged model with."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if run.label_names else AutoModelForCausalLM


def reload_saved(run: TrainedRun, folder: Path, save_dtype: str):
    """The saved folder as a user loads it: plain transformers, no peft, no quantization."""
    loader = auto_class(run)
    if torch.cuda.is_available():
        return loader.from_pretrained(folder, dtype=SAVE_DTYPES[save_dtype], device_map={"": torch.cuda.current_device()})
    return loader.from_pretrained(folder, dtype=torch.float32)  # CPU 16-bit matmuls are slow and lossy


def merge(run: TrainedRun, to: Path, save_dtype: str = "float16", overwrite: bool = False) -> MergeCheck:
    """Merge, save to a staging folder, check logits, and publish to `to` only when the check passes."""
    from qlora.io import publish_dir, staging_dir_for
    from qlora.precision import resolve_compute_dtype

    check_destination(to, run, overwrite)
    adapted, tokenizer = load_adapted_model(run)
    inputs = check_inputs(run, tokenizer)
    reference = logits_for(adapted, inputs)
    del adapted
    free_memory()
    staging = staging_dir_for(to)
    try:
        model = merged_model(run, resolve_compute_dtype(run.recipe.quantization.compute_dtype), save_dtype, tokenizer)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        del model
        free_memory()
        reloaded = reload_saved(run, staging, save_dtype)
        check = compare(reference, logits_for(reloaded.eval(), inputs))
        del reloaded
        free_memory()
        if check.ok:
            publish_dir(staging, to)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return check


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(prog="qlora merge", description="Merge a trained adapter into a plain 16-bit model.")
    parser.add_argument("run", help="a `qlora train` output folder")
    parser.add_argument("--to", type=Path, required=True, help="folder for the merged model")
    parser.add_argument("--dtype", choices=sorted(SAVE_DTYPES), default="float16", help="storage dtype (default float16)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --to folder")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    run = read_run(args.run)
    check = merge(run, args.to, args.dtype, args.overwrite)
    print(
        f"merge check: max |logit diff| {check.max_abs_diff:.4g}, logit scale (max |logit|) {check.logit_scale:.4g}: "
        f"{100 * check.relative:.3f} % (limit {100 * MAX_RELATIVE_DIFF:.0f} %) over {check.positions} positions "
        f"of {len(CHECK_INSTRUCTIONS)} prompts, merged {args.dtype} model vs 4-bit base + adapter"
    )
    if not check.ok:
        print(f"error: the merged model does not match the 4-bit base + adapter; nothing was written to {args.to}", file=sys.stderr)
        return MISMATCH_EXIT_CODE
    print(f"merged model -> {args.to} ({args.dtype}, safetensors); load it with {auto_class(run).__name__}.from_pretrained")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
