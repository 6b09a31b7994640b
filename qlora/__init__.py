"""qlora: 4-bit QLoRA fine-tuning on one consumer GPU, with an exact memory profiler.

Importing the package stays cheap (no torch import) so that the CLI can answer `--help`
and report user mistakes instantly.
"""

__version__ = "0.1.0"
