"""qlora: 4-bit QLoRA fine-tuning on one consumer GPU, with an exact memory profiler.

Importing the package is cheap (no torch import) and changes nothing in the process: the entry points set
what a training process needs (qlora.config.environment).
"""

__version__ = "0.1.0"

# The distribution's name on the package index (`pip install qlora-kit`): `qlora` there is an unrelated project.
# The import package, the `qlora` command and `python -m qlora.<command>` keep the name qlora.
DISTRIBUTION = "qlora-kit"
