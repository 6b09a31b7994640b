"""Shared fixtures: tiny offline models built from a config (nothing comes from the Hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TOKENIZER_TEXT = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:",
    "### Input:",
    "### Response:",
    "the quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine ten",
    "hello world, this is a tiny model for tests.",
    "a cat and a dog and a bird sat on the mat",
]


@pytest.fixture(autouse=True, scope="session")
def qlora_messages_on_stderr():
    """The library's messages on stderr as the CLI prints them, so that in-process tests read them with capsys."""
    from qlora.config.log import configure_logging

    configure_logging(0)


def make_tokenizer(save_dir: Path):
    """A small byte-level BPE tokenizer trained on a few lines, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    fast.save_pretrained(save_dir)
    return fast


def make_tiny_llama(save_dir: Path, **overrides) -> Path:
    """Save a tiny random Llama (GQA, untied head) + tokenizer to `save_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = make_tokenizer(save_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **overrides,
    )
    LlamaForCausalLM(config).save_pretrained(save_dir, safe_serialization=True)
    return save_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama folder shared by the whole session (read-only by convention)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def alpaca_file(tmp_path_factory) -> Path:
    """A small Alpaca-format JSONL dataset."""
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    rows = [
        {"instruction": "Say the next number.", "input": w, "output": words[(i + 1) % len(words)]}
        for i, w in enumerate(words * 4)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


# --- tiny configs for the profiler (it needs only a config.json, no weights) ---

# Llama family with grouped-query attention and an untied head.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
# Qwen2: biases on q/k/v and tied embeddings (the head stores nothing of its own).
TINY_QWEN2 = {**TINY_LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": True}


def make_trained_run(out_dir: Path, model_dir: Path, data_file: Path) -> Path:
    """A real `qlora train` run folder in a few seconds. The high learning rate makes the adapter
    change the model a lot, so tests that compare with and without it are not vacuous."""
    from qlora.config.recipe import recipe_from_mapping
    from qlora.training.run import train

    recipe = recipe_from_mapping(
        {
            "model": {"name_or_path": str(model_dir)},
            "data": {"path": str(data_file), "max_seq_len": 128},
            "lora": {"r": 4, "alpha": 8},
            "training": {
                "max_steps": 3,
                "batch_size": 4,
                "grad_accum": 1,
                "learning_rate": 0.05,
                "warmup_ratio": 0.0,
                "save_steps": 100,
            },
            "eval": {"metric": "exact_match", "max_examples": 2, "max_new_tokens": 2},
            "output_dir": str(out_dir),
        }
    )
    train(recipe)
    return out_dir


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_llama, alpaca_file) -> Path:
    """One real run folder per test session, shared by the tests that only read it (export, merge, generate, OOM)."""
    return make_trained_run(tmp_path_factory.mktemp("trained-run"), tiny_llama, alpaca_file)


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


# --- the profiler's input: a recipe (`qlora profile` builds one from its flags) ---


def profile_recipe(model, *overrides: str):
    """A recipe for the profiler (no data or output folder needed) from `key=value` overrides."""
    from qlora.config.recipe import recipe_from_mapping

    data = {
        "model": {"name_or_path": str(model)},
        **({"data": {"format": "classification"}} if "task=classification" in overrides else {}),
    }
    return recipe_from_mapping(data, list(overrides), for_training=False)


def prediction(model, method: str, *overrides: str, num_labels: int | None = None):
    """The profiler's estimate of `method` for this recipe on this machine's device (a CPU here)."""
    from qlora.config.precision import default_device
    from qlora.memory.estimate import estimate
    from qlora.memory.settings import from_recipe

    _, _, settings = from_recipe(profile_recipe(model, *overrides), num_labels, default_device())
    return estimate(str(model), method, settings)


def predicted_and_measured(model, method: str, *overrides: str, num_labels: int | None = None):
    """(prediction, measurement) of one recipe's step, as `qlora profile --measure` makes them."""
    from qlora.training.measure import measure

    return prediction(model, method, *overrides, num_labels=num_labels), measure(
        profile_recipe(model, *overrides), method, num_labels
    )


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) as a module, for tests of its functions."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
