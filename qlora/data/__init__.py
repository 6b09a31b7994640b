"""Examples in, token sequences out: files -> formats -> tokenize -> mask the prompt -> pack / collate."""
