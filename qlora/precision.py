"""The one place that decides dtypes, shared by the trainer and the memory profiler.

If training and profiling each chose dtypes on their own they would drift apart and the profiler's
numbers would stop describing what the trainer allocates; so both ask this module.

Policy (QLoRA paper, artidoro/qlora, peft defaults):
- compute dtype: bf16 on GPUs that support it, fp16 on older GPUs (T4, V100), fp32 on CPU, where
  bf16 matmuls are ~20x slower than fp32.
- frozen base weights that are not quantized (embeddings, norms, biases, lm_head; every weight in
  16-bit LoRA) are stored in the compute dtype; they are NOT upcast to fp32 (that costs GBs: bnb
  issue 1569, peft issue 1149).
- LoRA adapter weights are fp32 (peft's `autocast_adapter_dtype`), so are their grads, and the
  optimizer keeps fp32 states for them.
"""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ADAPTER_DTYPE = torch.float32


def default_device() -> str:
    """'cuda' when a CUDA GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_compute_dtype(requested: str = "auto", device: str | None = None, bf16_supported: bool | None = None) -> torch.dtype:
    """The matmul dtype for `device`; `bf16_supported` lets the profiler ask about a GPU it is not on."""
    if requested != "auto":
        return DTYPES[requested]
    device = device or default_device()
    if device == "cpu":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if bf16_supported else torch.float16


def base_weight_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of frozen, unquantized base weights: the compute dtype, never an fp32 upcast."""
    return compute_dtype


def trainer_precision_flags(compute_dtype: torch.dtype, device: str | None = None) -> dict[str, bool]:
    """`TrainingArguments` autocast flags: bf16/fp16 autocast on GPU only; CPU runs plain fp32."""
    on_gpu = (device or default_device()) != "cpu"
    return {"bf16": on_gpu and compute_dtype == torch.bfloat16, "fp16": on_gpu and compute_dtype == torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling used in recipes and reports."""
    return str(dtype).removeprefix("torch.")
