"""Write benchmarks/configs/<family>/config.json: one tiny config per dense family, built by transformers' own
config class (`AutoConfig.for_model`), for `qlora profile --model DIR --measure` at 2,048 tokens on a CPU (seconds
each) and the profiler's per-family test (tests/memory/test_family_profiles.py).

    python benchmarks/families/make_configs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "configs"
SIZES = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
WINDOW = 512  # a sliding window smaller than the 2,048 profiled tokens
# folder -> (model_type, what differs from the sizes above)
FAMILIES = {
    "llama": ("llama", {}),
    "mistral-sliding": ("mistral", {"sliding_window": WINDOW}),
    "gemma2": ("gemma2", {"sliding_window": WINDOW, "final_logit_softcapping": 30.0}),
    "gemma3": ("gemma3_text", {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]}),
    "granite": ("granite", {"logits_scaling": 8.0}),
    "gpt-neox": ("gpt_neox", {"rotary_pct": 0.25}),
    "qwen3": ("qwen3", {}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
}


def family_config(model_type: str, extra: dict, sizes: dict = SIZES):
    """transformers' config object of `model_type` at `sizes` (GPT-NeoX names no key-value heads or head_dim)."""
    from transformers import AutoConfig

    sizes = dict(sizes)
    if model_type == "gpt_neox":
        sizes.pop("num_key_value_heads")
        sizes.pop("head_dim")
    return AutoConfig.for_model(model_type, **sizes, **extra)


def main() -> int:
    for folder, (model_type, extra) in FAMILIES.items():
        config = family_config(model_type, extra).to_diff_dict()
        config.pop("transformers_version", None)
        (ROOT / folder).mkdir(parents=True, exist_ok=True)
        (ROOT / folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        print(ROOT / folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
