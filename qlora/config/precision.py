"""The one place that decides dtypes, shared by the trainer and the memory profiler.

If training and profiling each chose dtypes on their own they would drift apart and the profiler's
numbers would stop describing what the trainer allocates; so both ask this module.

Policy (QLoRA paper, artidoro/qlora, peft defaults):
- compute dtype: bf16 on GPUs with native bf16 (compute capability >= 8.0: A100, A10G, L4, RTX 30xx/40xx,
  H100), fp16 below it (T4 sm_75, V100 sm_70), fp32 on CPU, where bf16 matmuls are ~20x slower than fp32.
  Not `torch.cuda.is_bf16_supported()`: since torch 2.3 it defaults to `including_emulation=True` and
  answers True on a T4, whose bf16 is emulated (slow, and no bf16 tensor cores for bitsandbytes).
- frozen base weights that are not quantized (embeddings, norms, biases, lm_head; every weight in
  16-bit LoRA) are stored in the compute dtype; they are NOT upcast to fp32 (that costs GBs: bnb
  issue 1569, peft issue 1149).
- LoRA adapter weights are fp32 (peft's `autocast_adapter_dtype`), and so is a classifier's new,
  fully trained head (peft copies it in the base's dtype; `qlora.model.load.upcast_trainable` casts it);
  so are their grads, and the optimizer keeps fp32 states for them.
- full fine-tuning (profiled and measured, not a `qlora train` method) loads the model exactly like
  16-bit LoRA's base, in the compute dtype, and trains those weights: weights and gradients in the
  compute dtype (bf16 on GPU), no fp32 master copy.
- optimizer states: torch's AdamW keeps both moments in the parameter's dtype; bitsandbytes' 32-bit
  AdamW (paged or not) keeps them in fp32 whatever the parameter's dtype; the 8-bit AdamWs keep them
  as uint8 with per-block scales. So full FT with paged_adamw_32bit on GPU is bf16 weights + bf16
  grads + fp32 Adam states (12 bytes per parameter), with adamw_torch 8 bytes per parameter.
"""

from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ADAPTER_DTYPE = torch.float32


def default_device() -> str:
    """'cuda' when a CUDA GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_compute_dtype(
    requested: str = "auto", device: str | None = None, bf16_supported: bool | None = None
) -> torch.dtype:
    """The matmul dtype for `device`; `bf16_supported` lets the profiler ask about a GPU it is not on."""
    if requested != "auto":
        return DTYPES[requested]
    device = device or default_device()
    if device == "cpu":
        return torch.float32
    if bf16_supported is None:
        bf16_supported = native_bf16()
    return torch.bfloat16 if bf16_supported else torch.float16


def native_bf16() -> bool:
    """Whether the current CUDA GPU computes bf16 natively: compute capability 8.0 or above (ROCm: torch's answer)."""
    if not torch.cuda.is_available():
        return False
    if torch.version.hip:
        return torch.cuda.is_bf16_supported()
    major, _minor = torch.cuda.get_device_capability()
    return major >= 8


def trainer_precision_flags(compute_dtype: torch.dtype, device: str | None = None) -> dict[str, bool]:
    """`TrainingArguments` autocast flags: bf16/fp16 autocast on GPU only; CPU runs plain fp32."""
    on_gpu = (device or default_device()) != "cpu"
    return {"bf16": on_gpu and compute_dtype == torch.bfloat16, "fp16": on_gpu and compute_dtype == torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the spelling used in recipes and reports."""
    return str(dtype).removeprefix("torch.")


def trainable_dtype(method: str, compute_dtype: torch.dtype) -> torch.dtype:
    """Dtype of what trains: the loaded weights for 'full', fp32 adapters (and head) for the LoRA methods."""
    return compute_dtype if method == "full" else ADAPTER_DTYPE


def optimizer_state_dtype(optimizer: str, param_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the two AdamW moments for a parameter of `param_dtype` (see the module docstring)."""
    if optimizer.endswith("8bit"):
        return torch.uint8
    if optimizer.endswith("32bit"):
        return torch.float32
    return param_dtype
