"""Measured values for the profiler's two named GPU assumptions: the CUDA context and allocator slack.

`make gpu-check` (benchmarks/gpu_check.py) measures both on the GPU it runs on and writes
`memory_reports/measured/cuda-<gpu>/overheads.json`:

    {"gpu": "NVIDIA H200", "cuda_context_bytes": 800653312, "allocator_slack": 0.031, ...}

(either figure may be missing: a file with the context alone leaves the slack at its named default)

When such files exist the profiler uses the largest value over all of them (a plan has to hold on
every measured GPU), else the named defaults below. The folder is the
repository's; `QLORA_MEASURED_DIR` points elsewhere (an installed package has no memory_reports/).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

MEASURED_DIR = Path(__file__).resolve().parents[2] / "memory_reports" / "measured"
OVERHEADS_FILE = "overheads.json"


def measured_dir() -> Path:
    return Path(os.environ.get("QLORA_MEASURED_DIR") or MEASURED_DIR)


def measured_overheads(root: Path | None = None) -> list[dict]:
    """Every `cuda-*/overheads.json` under `root` with at least one of the two figures (unreadable files are
    skipped). A file may hold only the context: the slack stays the named assumption until it is measured."""
    found = []
    for path in sorted((root or measured_dir()).glob(f"cuda-*/{OVERHEADS_FILE}")):
        try:
            data = json.loads(path.read_text())
            entry = {"source": str(path)}
            if data.get("cuda_context_bytes") is not None:
                entry["cuda_context_bytes"] = int(data["cuda_context_bytes"])
            if data.get("allocator_slack") is not None:
                entry["allocator_slack"] = float(data["allocator_slack"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # a half-written or foreign file must not break every profile
        if len(entry) > 1:
            found.append(entry)
    return found


def named_assumptions(context_default: int, slack_default: float, root: Path | None = None) -> tuple[int, float]:
    """(CUDA context bytes, allocator slack): the largest measured value of each, else its default."""
    found = measured_overheads(root)
    contexts = [f["cuda_context_bytes"] for f in found if "cuda_context_bytes" in f]
    slacks = [f["allocator_slack"] for f in found if "allocator_slack" in f]
    return max(contexts, default=context_default), max(slacks, default=slack_default)


# What a CUDA process holds beyond its tensors. Not measurable on a CPU machine: named assumptions
# that `--measure` on a GPU reports against (torch.cuda.memory_reserved vs memory_allocated).
# CUDA context, lazily loaded kernels (cuBLAS, SDPA forward and backward, bitsandbytes' 4-bit matmul): 764 MiB measured
# alone in a fresh process on an H200 (CUDA 13.0, torch 2.11, bitsandbytes 0.50.2;
# memory_reports/measured/cuda-nvidia-h200).
CUDA_CONTEXT_BYTES = 800_653_312
# PyTorch's caching allocator: reserved-but-free blocks and rounding above peak allocated. A named assumption:
# qlora turns on expandable segments (qlora.config.environment), under which it has not been measured yet.
ALLOCATOR_SLACK = 0.05
MODEL_BUFFERS = "model buffers (RoPE tables)"


@functools.cache
def cuda_overheads() -> tuple[int, float]:
    """(CUDA context bytes, allocator slack) the profiler uses: `make gpu-check`'s measured overheads.json
    files win over the named defaults above. Read on first use, not at import, once per process."""
    return named_assumptions(CUDA_CONTEXT_BYTES, ALLOCATOR_SLACK)


def slack(overhead: dict[str, int]) -> int:
    """The part of the overhead that is not a tensor (CUDA context, allocator slack)."""
    return sum(v for k, v in overhead.items() if k != MODEL_BUFFERS)


def overhead(device: str, tensors: int, buffers: int) -> dict[str, int]:
    """Memory besides the training state: the model's buffers, and on CUDA what is not a tensor."""
    parts = {MODEL_BUFFERS: buffers} if buffers else {}
    if device == "cuda":
        context, allocator_slack = cuda_overheads()
        parts.update(
            {
                "CUDA context": context,
                f"allocator slack ({allocator_slack * 100:g}%)": int((tensors + buffers) * allocator_slack),
            }
        )
    return parts
