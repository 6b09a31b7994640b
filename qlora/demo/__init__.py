"""The offline demo's tiny world: a synthetic English-like language, a base model pretrained on it, and datasets.

`corpus` generates the language and its pretraining text, `tokenizer` builds the byte-level BPE tokenizer,
`pretrain` trains the small Llama base model that `demo.yaml` fine-tunes, and `datasets` writes
the instruction and classification files. Everything is seeded, so the committed assets are reproducible.

The recipes and `assets/` are package data: `qlora demo` (`__main__`) runs them from an installed wheel;
the checkout's `recipes/demo.yaml`, `recipes/demo-classify.yaml` and `recipes/demo-assets` link here.
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
ASSETS = HERE / "assets"  # the base model and the datasets (about 9.5 MB)
RECIPES = HERE  # demo.yaml (SFT) and demo-classify.yaml (classification)
