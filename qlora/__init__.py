"""qlora: 4-bit QLoRA fine-tuning on one consumer GPU, with an exact memory profiler.

Importing the package stays cheap (no torch import) so that the CLI can answer `--help`
and report user mistakes instantly.
"""

import logging
import os
from importlib.metadata import PackageNotFoundError, version

__version__ = "0.1.0"

# bitsandbytes warns on every CPU import that it could not download an optional matmul kernel from
# the Hub. qlora never fetches code from the Hub, and the line would precede every one-line error.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def allocator_variable() -> str:
    """The allocator's environment variable: PYTORCH_ALLOC_CONF from torch 2.10 on (the old name is deprecated)."""
    try:
        major, minor = (int(part) for part in version("torch").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return "PYTORCH_CUDA_ALLOC_CONF"
    return "PYTORCH_ALLOC_CONF" if (major, minor) >= (2, 10) else "PYTORCH_CUDA_ALLOC_CONF"


# Expandable segments before CUDA initialises, in every entry point and worker (they all import qlora first):
# without them the caching allocator's fragmented segments held 1.28x the tensors at 80k tokens on the H200;
# torchtune, axolotl and Unsloth set the same. A user's own allocator setting is left alone.
if not (os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF")):
    os.environ[allocator_variable()] = "expandable_segments:True"
