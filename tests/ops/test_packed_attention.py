"""qlora's sdpa: the same attention as transformers' masks give, without a tokens x tokens mask for packed
sequences and sliding windows."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoConfig, AutoModelForCausalLM

from qlora.ops.attention import band_mask, document_spans, install

SIZES = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 6},
    "gemma3_text": {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]},
    "qwen3": {},
}


def build(model_type: str, attn: str, **sizes):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{**SIZES, **FAMILIES[model_type], **sizes})
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).float()


def step(model, ids, positions):
    out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
    out.loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    return out.logits.detach(), grads


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "unpacked"])
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_the_same_logits_and_gradients_as_transformers_masked_sdpa(model_type, packed):
    ids = torch.randint(3, 100, (2, 40), generator=torch.Generator().manual_seed(1))
    positions = None
    if packed:  # three documents in row 0, two in row 1
        positions = torch.stack(
            [
                torch.cat([torch.arange(13), torch.arange(20), torch.arange(7)]),
                torch.cat([torch.arange(30), torch.arange(10)]),
            ]
        )
    ref = step(build(model_type, "sdpa"), ids, positions)
    out = step(build(model_type, install()), ids, positions)
    for a, b in zip(ref, out, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_documents_and_the_band():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert document_spans(positions, 2, 6) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    assert document_spans(torch.arange(6)[None], 2, 6) is None
    band = band_mask(3, torch.float32, "cpu") == 0  # query i sees keys i+1 .. i+3 of [previous window, own block]
    assert band.tolist() == [
        [False, True, True, True, False, False],
        [False, False, True, True, True, False],
        [False, False, False, True, True, True],
    ]


class LargestTensor(TorchDispatchMode):
    """The largest tensor any operator makes (elements)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("model_type", ["mistral"])
def test_a_packed_2048_token_training_step_builds_no_tokens_by_tokens_tensor(model_type):
    """Four packed documents (and Mistral's 512-token window): transformers' sdpa would build a 2,048 x 2,048 mask
    (4.2 M elements) and torch save it as fp32 per layer; here nothing is larger than a layer's activations."""
    tokens = 2048
    sizes = {"sliding_window": 512} if model_type == "mistral" else {}
    model = build(model_type, install(), max_position_embeddings=tokens, **sizes)
    ids = torch.randint(3, 100, (1, tokens), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(tokens).remainder(tokens // 4)[None]
    with LargestTensor() as seen:
        step(model, ids, positions)
    assert seen.largest < tokens * tokens // 8
    assert seen.largest == max(tokens * 100, tokens * 64)  # the logits or the MLP's intermediate activations
