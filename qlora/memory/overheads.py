"""Measured values for the profiler's two named GPU assumptions: the CUDA context and allocator slack.

`make gpu-check` (benchmarks/gpu_check.py) measures both on the GPU it runs on and writes
`memory_reports/measured/cuda-<gpu>/overheads.json`:

    {"gpu": "NVIDIA H200", "cuda_context_bytes": 536870912, "allocator_slack": 0.031, ...}

When such files exist the profiler uses the largest value over all of them (a plan has to hold on
every measured GPU), else the named defaults below. The folder is the
repository's; `QLORA_MEASURED_DIR` points elsewhere (an installed package has no memory_reports/).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MEASURED_DIR = Path(__file__).resolve().parents[2] / "memory_reports" / "measured"
OVERHEADS_FILE = "overheads.json"


def measured_dir() -> Path:
    return Path(os.environ.get("QLORA_MEASURED_DIR") or MEASURED_DIR)


def measured_overheads(root: Path | None = None) -> list[dict]:
    """Every `cuda-*/overheads.json` under `root` that holds both figures (unreadable files are skipped)."""
    found = []
    for path in sorted((root or measured_dir()).glob(f"cuda-*/{OVERHEADS_FILE}")):
        try:
            data = json.loads(path.read_text())
            found.append({"cuda_context_bytes": int(data["cuda_context_bytes"]),
                          "allocator_slack": float(data["allocator_slack"]), "source": str(path)})
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a half-written or foreign file must not break every profile
    return found


def named_assumptions(context_default: int, slack_default: float, root: Path | None = None) -> tuple[int, float]:
    """(CUDA context bytes, allocator slack): the largest measured values, else the defaults."""
    found = measured_overheads(root)
    if not found:
        return context_default, slack_default
    return max(f["cuda_context_bytes"] for f in found), max(f["allocator_slack"] for f in found)


# What a CUDA process holds beyond its tensors. Not measurable on a CPU machine: named assumptions
# that `--measure` on a GPU reports against (torch.cuda.memory_reserved vs memory_allocated).
CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context, lazily loaded kernels, cuBLAS workspace (nvidia-smi shows 300-600 MiB on CUDA 12)
ALLOCATOR_SLACK = 0.05  # PyTorch's caching allocator: reserved-but-free blocks and 512 B / 2 MiB rounding above peak allocated
# `make gpu-check` measures both; its memory_reports/measured/cuda-*/overheads.json win when present.
CUDA_CONTEXT_BYTES, ALLOCATOR_SLACK = named_assumptions(CUDA_CONTEXT_BYTES, ALLOCATOR_SLACK)
MODEL_BUFFERS = "model buffers (RoPE tables)"


def slack(overhead: dict[str, int]) -> int:
    """The part of the overhead that is not a tensor (CUDA context, allocator slack)."""
    return sum(v for k, v in overhead.items() if k != MODEL_BUFFERS)


def overhead(device: str, tensors: int, buffers: int) -> dict[str, int]:
    """Memory besides the training state: the model's buffers, and on CUDA what is not a tensor."""
    parts = {MODEL_BUFFERS: buffers} if buffers else {}
    if device == "cuda":
        parts.update({"CUDA context": CUDA_CONTEXT_BYTES, f"allocator slack ({ALLOCATOR_SLACK * 100:g}%)": int((tensors + buffers) * ALLOCATOR_SLACK)})
    return parts
