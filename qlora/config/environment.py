"""Process settings that must be in the environment before a library reads them (at its import or first use)."""

from __future__ import annotations

import os


def keep_deepspeed_off_stdout() -> None:
    """DeepSpeed (optional, for zero3), once installed, is imported by transformers and accelerate; on a
    machine without CUDA it then announces on stdout that it falls back to its CPU accelerator, a line
    that corrupts `--format json`. Naming that accelerator up front skips the detection and the line."""
    import torch  # here: this module is read by every CLI, most of which never need torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
