"""qlora: 4-bit QLoRA fine-tuning on one consumer GPU, with an exact memory profiler.

Importing the package stays cheap (no torch import) so that the CLI can answer `--help`
and report user mistakes instantly.
"""

import logging

__version__ = "0.1.0"

# bitsandbytes warns on every CPU import that it could not download an optional matmul kernel from
# the Hub. qlora never fetches code from the Hub, and the line would precede every one-line error.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
