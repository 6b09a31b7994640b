"""Measured values for the profiler's two named GPU assumptions: the CUDA context and allocator slack.

`make gpu-check` (benchmarks/gpu_check.py) measures both on the GPU it runs on and writes
`overheads.json`, which belongs in this package's `measured/cuda-<gpu>/` (package data, so an installed
wheel profiles exactly as a checkout does; read with importlib.resources):

    {"gpu": "NVIDIA H200", "cuda_context_bytes": 800653312, "allocator_slack": 0.031, ...}

(either figure may be missing: a file with the context alone leaves the slack at its named default)

When such files exist the profiler uses the largest value over all of them (a plan has to hold on
every measured GPU), else the named defaults below. `QLORA_MEASURED_DIR` points at another folder.
"""

from __future__ import annotations

import functools
import json
import os
from importlib import resources
from pathlib import Path

MEASURED_PACKAGE = "measured"  # qlora/memory/measured/cuda-<gpu>/overheads.json: package data
OVERHEADS_FILE = "overheads.json"


def measured_dir():
    """`QLORA_MEASURED_DIR`, else the package's `measured/` (a Path, or a zip's Traversable)."""
    override = os.environ.get("QLORA_MEASURED_DIR")
    return Path(override) if override else resources.files("qlora.memory").joinpath(MEASURED_PACKAGE)


def overhead_files(root) -> list:
    """`cuda-*/overheads.json` under `root` (a Path or a Traversable), sorted by GPU folder."""
    if not root.is_dir():
        return []
    folders = sorted((f for f in root.iterdir() if f.name.startswith("cuda-") and f.is_dir()), key=lambda f: f.name)
    return [f / OVERHEADS_FILE for f in folders if (f / OVERHEADS_FILE).is_file()]


def measured_overheads(root: Path | None = None) -> list[dict]:
    """Every `cuda-*/overheads.json` under `root` with at least one of the two figures (unreadable files are
    skipped). A file may hold only the context: the slack stays the named assumption until it is measured."""
    found = []
    for path in overhead_files(root or measured_dir()):
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
