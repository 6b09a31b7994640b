"""Bytes that bitsandbytes stores for a quantized weight and for optimizer states.

Written by hand because no library exposes them without allocating: bitsandbytes computes these
layouts inside `quantize_4bit`, `Int8Params` and `Optimizer2State.init_state`. The formulas below
follow bitsandbytes 0.50 (functional.py, nn/modules.py, optim/optimizer.py); tests check them
against the storage of real quantized models and real optimizer states.
"""

from __future__ import annotations

from math import ceil

NF4_BLOCKSIZE = 64  # Params4bit's default blocksize
NESTED_BLOCKSIZE = 256  # double quant: the absmax values are themselves quantized in blocks of 256
FP32 = 4

OPTIMIZER_BLOCKSIZE = 256  # 8-bit optimizers: one fp32 absmax per 256 values, per state
MIN_8BIT_SIZE = 4096  # bnb keeps 32-bit states for tensors with fewer elements
QMAP_BYTES = 2 * 256 * FP32  # the signed and unsigned 8-bit code tables, one pair per optimizer


def nf4_weight_bytes(numel: int, double_quant: bool = True) -> dict[str, int]:
    """A 4-bit weight: two codes per byte, one absmax per 64-block, the 16-entry code table.

    Double quant stores each absmax as uint8 and adds, per weight, the fp32 absmax of every 256 of
    those, the 256-entry fp32 code of the 8-bit quantizer and the fp32 mean subtracted first.
    """
    blocks = ceil(numel / NF4_BLOCKSIZE)
    parts = {"packed 4-bit data": ceil(numel / 2), "4-bit code table": 16 * FP32}
    if double_quant:
        parts["absmax (8-bit)"] = blocks
        parts["double-quant state"] = ceil(blocks / NESTED_BLOCKSIZE) * FP32 + 256 * FP32 + FP32
    else:
        parts["absmax (fp32)"] = blocks * FP32
    return parts


def int8_weight_bytes(in_features: int, out_features: int) -> dict[str, int]:
    """An LLM.int8() weight: int8 values and one fp32 scale per output row (`SCB`)."""
    return {"int8 data": in_features * out_features, "row scales": out_features * FP32}


def adamw_state_bytes(numel: int, state_itemsize: int) -> int:
    """Both AdamW moments of one tensor; 8-bit states add per-block scales and fall back to fp32 when small."""
    if state_itemsize == 1:
        if numel < MIN_8BIT_SIZE:
            return 2 * numel * FP32
        return 2 * numel + 2 * ceil(numel / OPTIMIZER_BLOCKSIZE) * FP32
    return 2 * numel * state_itemsize
