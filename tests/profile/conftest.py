"""Tiny model configs for the profiler tests: the profiler needs only a config.json (no weights)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# Llama family with grouped-query attention and an untied head.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 160,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
    "max_position_embeddings": 256, "tie_word_embeddings": False,
}
# Qwen2: biases on q/k/v and tied embeddings (the head stores nothing of its own).
TINY_QWEN2 = {**TINY_LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True}


def write_config(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def llama_config(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("tiny-llama-config"), TINY_LLAMA)


@pytest.fixture(scope="session")
def qwen2_config(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("tiny-qwen2-config"), TINY_QWEN2)


# A vocabulary large enough that the loss, not a layer, is the step's largest moment (as at 128k in real models).
@pytest.fixture(scope="session")
def big_vocab_llama_config(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("tiny-llama-8k-vocab"), {**TINY_LLAMA, "vocab_size": 8192})


@pytest.fixture(scope="session")
def big_vocab_qwen2_config(tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("tiny-qwen2-8k-vocab"), {**TINY_QWEN2, "vocab_size": 8192})
