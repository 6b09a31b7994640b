"""GPT-2's `Conv1D` layers (a linear layer with its weight stored transposed) are linear layers to the LoRA
target rule, as to peft's all-linear, and to the profiler's inventory."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from qlora.config.recipe import LoraSpec
from qlora.memory.inventory import linear_features
from qlora.model.lora import attach_lora, linear_leaf_names, lora_target_modules


@pytest.fixture
def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=128)
    return GPT2LMHeadModel(config).eval()


def test_conv1d_layers_are_linear_leaves_and_all_linear_targets_them(gpt2):
    assert {"c_attn", "c_proj", "c_fc"} <= linear_leaf_names(gpt2)
    assert lora_target_modules(gpt2, "all-linear") == ["c_attn", "c_fc", "c_proj"]  # the tied lm_head is the head
    assert lora_target_modules(gpt2, "attention") == ["c_attn", "c_proj"]
    assert lora_target_modules(gpt2, "mlp") == ["c_fc"]


def test_lora_on_conv1d_starts_as_the_base_and_trains(gpt2):
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = gpt2(input_ids=ids).logits
    model = attach_lora(gpt2, LoraSpec(r=4, alpha=8, dropout=0.0, targets="all-linear"))
    wrapped = [name for name, m in model.named_modules() if hasattr(m, "lora_A") and isinstance(m.base_layer, Conv1D)]
    assert len(wrapped) == 2 * 4  # per block: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    assert model.peft_config["default"].fan_in_fan_out
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)  # LoRA's B starts at zero
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_the_inventory_reads_conv1d_features_as_a_linear_layer(gpt2):
    block = gpt2.transformer.h[0]
    assert linear_features(block.attn.c_attn) == (32, 96)  # in, out: the weight is stored (in, out)
    assert linear_features(block.mlp.c_fc) == (32, 128)
    assert linear_features(torch.nn.Linear(3, 5)) == (3, 5)
    assert linear_features(block.ln_1) is None
