"""Process settings that must be in the environment before a library reads them (at its import or first use).

None of this runs on `import qlora`: a notebook or a program importing the package keeps its own settings.
The entry points (`qlora <command>`, `python -m qlora.<command>`, the notebook) call `prepare_process()`
first; DeepSpeed's accelerator is named when a zero3 run starts.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version

EXPANDABLE_SEGMENTS = "expandable_segments:True"


def allocator_variable() -> str:
    """The allocator's environment variable: PYTORCH_ALLOC_CONF from torch 2.10 on (the old name is deprecated)."""
    try:
        major, minor = (int(part) for part in version("torch").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return "PYTORCH_CUDA_ALLOC_CONF"
    return "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 10) else "PYTORCH_CUDA_ALLOC_CONF"


def use_expandable_segments() -> None:
    """Expandable segments, set before CUDA initialises (PyTorch reads the variable then): without them the
    caching allocator's fragmented segments held 1.28x the tensors at 80k tokens on the H200; torchtune,
    axolotl and Unsloth set the same. A user's own allocator setting is left alone."""
    if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
        os.environ[allocator_variable()] = EXPANDABLE_SEGMENTS


def prepare_process() -> None:
    """What every qlora command sets first, in its own process (and so in every torchrun worker)."""
    use_expandable_segments()
    # bitsandbytes warns on every CPU import that it could not download an optional matmul kernel from the
    # Hub. qlora never fetches code from the Hub, and the line would precede every one-line error.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def keep_deepspeed_off_stdout() -> None:
    """DeepSpeed (optional, for zero3), imported by transformers and accelerate for a zero3 run, announces on
    stdout, on a machine without CUDA, that it falls back to its CPU accelerator. Naming that accelerator up
    front skips the detection and the line."""
    import torch  # here: this module is read by every CLI, most of which never need torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
