"""Tiny random models of the dense families, built by transformers' own config classes (`AutoConfig.for_model`)
with the demo's tokenizer: what a new user gets with `qlora train recipes/demo.yaml --set model.name_or_path=…`."""

from __future__ import annotations

from pathlib import Path

DEMO_MODEL = Path(__file__).resolve().parents[1] / "recipes" / "demo-assets" / "base-model"
WINDOW = 16  # a sliding window smaller than the demo's 64-token sequences
# model_type -> what differs from the tiny sizes (the family's distinctive head or attention)
FAMILIES = {
    "gemma2": {"final_logit_softcapping": 30.0, "sliding_window": WINDOW},
    "gemma3_text": {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
    "mistral": {"sliding_window": WINDOW},
    "granite": {"logits_scaling": 8.0},
    "phi3": {},
    "qwen3": {},
}


def save_tiny_family(model_type: str, folder: Path) -> Path:
    """A tiny random `model_type` causal LM and the demo tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **FAMILIES[model_type],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
