"""The offline demo's tiny world: a synthetic English-like language, a base model pretrained on it, and datasets.

`corpus` generates the language and its pretraining text, `tokenizer` builds the byte-level BPE tokenizer,
`pretrain` trains the small Llama base model that `recipes/demo.yaml` fine-tunes, and `datasets` writes
the instruction and classification files. Everything is seeded, so the committed assets are reproducible.
"""
