"""model.attn_implementation: auto picks what the family supports; an unsupported choice is one line."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from qlora.config.attention import choose_attention, model_class, supported_attention
from qlora.config.errors import QLoraError
from qlora.memory.estimate import estimate
from qlora.memory.settings import Settings


def family(model_type: str):
    cls = model_class(AutoConfig.for_model(model_type))
    return cls.__name__, supported_attention(cls)


# transformers 5.24 refuses sdpa for Gemma 2 (its soft-capped scores); 5.7 (the floor) still allows it, and qlora's
# auto follows whatever the installed release says. The cases about the refusal need a release that refuses.
gemma2_refuses_sdpa = pytest.mark.skipif(
    "sdpa" in family("gemma2")[1], reason="this transformers release still lets Gemma 2 run sdpa"
)


@gemma2_refuses_sdpa
def test_transformers_flags_say_what_each_family_supports():
    assert family("gemma2") == (
        "Gemma2ForCausalLM",
        ("flex_attention", "flash_attention_2", "flash_attention_3", "eager"),
    )
    assert family("llama")[1] == ("sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "eager")


@pytest.mark.parametrize(
    "model_type, device, chosen, why",
    [
        ("llama", "cpu", "sdpa", "the fused kernel LlamaForCausalLM supports"),
        ("gemma3_text", "cuda", "sdpa", "the fused kernel Gemma3ForCausalLM supports"),
        pytest.param(
            "gemma2", "cuda", "flex_attention", "Gemma2ForCausalLM does not support sdpa", marks=gemma2_refuses_sdpa
        ),
        pytest.param(
            "gemma2",
            "cpu",
            "eager",
            "Gemma2ForCausalLM does not support sdpa; flex attention has no backward on the CPU",
            marks=gemma2_refuses_sdpa,
        ),
    ],
)
def test_auto_picks_the_first_fused_kernel_the_family_and_device_train_with(model_type, device, chosen, why):
    assert choose_attention(*family(model_type), "auto", device, check_installed=False) == (chosen, why)


@pytest.mark.parametrize(
    "model_type, requested, device, message",
    [
        pytest.param(
            "gemma2",
            "sdpa",
            "cuda",
            "model.attn_implementation: Gemma2ForCausalLM does not support 'sdpa' in transformers (it supports "
            "flex_attention, flash_attention_2, flash_attention_3, eager); use auto or one of those",
            marks=gemma2_refuses_sdpa,
        ),
        (
            "llama",
            "flex_attention",
            "cpu",
            "model.attn_implementation: 'flex_attention' cannot train here: flex attention has no backward on the CPU;"
            " use auto or sdpa",
        ),
        (
            "llama",
            "flash_attention_2",
            "cpu",
            "model.attn_implementation: 'flash_attention_2' cannot train here: flash_attention_2 needs a CUDA GPU;"
            " use auto or sdpa",
        ),
    ],
)
def test_an_explicit_choice_the_family_or_device_cannot_run_is_one_line(model_type, requested, device, message):
    with pytest.raises(QLoraError) as err:
        choose_attention(*family(model_type), requested, device)
    assert str(err.value) == message


@gemma2_refuses_sdpa
def test_the_profiler_counts_what_training_runs(tmp_path):
    """Gemma 2 on the CPU trains with eager attention (its scores kept): the profiler decides the same."""
    config = AutoConfig.for_model(
        "gemma2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    ).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(config))
    cpu = estimate(str(tmp_path), "qlora", Settings(device="cpu", seq_len=256))
    gpu = estimate(str(tmp_path), "qlora", Settings(device="cuda", seq_len=256))
    assert (cpu.settings.attn_implementation, gpu.settings.attn_implementation) == ("eager", "flex_attention")
    eager = estimate(str(tmp_path), "qlora", Settings(device="cpu", seq_len=256, attn_implementation="eager"))
    assert cpu.total == eager.total
    with pytest.raises(QLoraError, match="does not support 'sdpa'"):
        estimate(str(tmp_path), "qlora", Settings(attn_implementation="sdpa"))
