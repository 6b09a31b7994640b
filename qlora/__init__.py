"""qlora: 4-bit QLoRA fine-tuning on one consumer GPU, with an exact memory profiler.

Importing the package is cheap (no torch import) and changes nothing in the process: the entry points set
what a training process needs (qlora.config.environment).
"""

__version__ = "0.1.0"
