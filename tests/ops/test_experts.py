"""qlora.ops.experts: fused expert stacks in NF4, the frozen expert matmul, split LoRA on the routed tokens."""

from __future__ import annotations

import pytest
import torch

from qlora.ops.experts import (
    ExpertLora,
    expert_linear,
    experts_forward,
    finish_quantized_experts,
    quantized_state,
    quantizing_experts,
)


def tiny_experts(family: str):
    """One experts module of `family` with random weights (fp32), and its config."""
    from transformers import AutoConfig

    sizes = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
    if family == "qwen3_moe":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts

        config = AutoConfig.for_model(family, moe_intermediate_size=48, num_experts=6, **sizes)
    else:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Experts

        config = AutoConfig.for_model(family, num_local_experts=6, **sizes)
    torch.manual_seed(0)
    experts = Experts(config)
    for param in experts.parameters():
        torch.nn.init.normal_(param, std=0.1)
    return experts.requires_grad_(False)


def routing(tokens=20, experts=6, top_k=2):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(tokens, experts, generator=generator)
    weights, index = torch.topk(logits.softmax(-1), top_k)
    return index, weights


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_forward_matches_transformers_eager_experts(family):
    experts = tiny_experts(family)
    experts.config._experts_implementation = "eager"
    x = torch.randn(20, 32)
    index, weights = routing()
    expected = experts(x, index, weights)
    assert torch.allclose(experts_forward(experts, x, index, weights), expected, atol=1e-5)


def test_input_gradient_matches_dense_autograd_and_backward_saves_no_weight():
    experts = tiny_experts("qwen3_moe")
    experts.config._experts_implementation = "eager"
    index, weights = routing()
    x = torch.randn(20, 32, requires_grad=True)
    experts(x, index, weights).square().sum().backward()
    expected = x.grad.clone()
    x.grad = None
    stack = experts.gate_up_proj.numel()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = experts_forward(experts, x, index, weights)
    out.square().sum().backward()
    assert torch.allclose(x.grad, expected, atol=1e-5)
    assert max(saved) < stack // 4  # the routed rows and their activations, never a weight stack


def test_split_lora_equals_the_peft_delta_weight():
    """A then B on each expert's rows gives x @ (W_e + scaling B_e A_e)^T, peft's ParamWrapper delta layout."""
    experts = tiny_experts("qwen3_moe")
    E, out_dim, in_dim, r = 6, 96, 32, 4
    a, b = torch.randn(E * r, in_dim), torch.randn(out_dim, r * E)
    experts.__dict__["expert_lora"] = {"gate_up_proj": lambda: [ExpertLora(a, b, 0.5)]}
    counts = [3, 0, 5, 2, 6, 4]
    x = torch.randn(sum(counts), in_dim)
    delta = torch.einsum("o r e, e r i -> e o i", b.view(out_dim, r, E), a.view(E, r, in_dim)) * 0.5
    weight = experts.gate_up_proj + delta
    expected = torch.cat([rows @ weight[e].t() for e, rows in enumerate(x.split(counts))])
    assert torch.allclose(expert_linear(experts.eval(), "gate_up_proj", x, counts), expected, atol=1e-5)


def test_stacks_quantized_as_loaded_read_back_as_nf4_double_quant():
    import bitsandbytes.functional as bnbf

    experts = tiny_experts("qwen3_moe")
    dense = experts.gate_up_proj.detach().clone()
    with quantizing_experts("nf4", double_quant=True):
        experts.gate_up_proj = torch.nn.Parameter(dense.clone())  # as transformers' loader sets a weight
    assert experts._parameters["gate_up_proj"].dtype == torch.uint8
    assert finish_quantized_experts(experts) == 1
    packed, state = quantized_state(experts, "gate_up_proj")
    assert packed.numel() == dense.numel() // 2 and state.nested and state.quant_type == "nf4"
    reference = bnbf.dequantize_4bit(*bnbf.quantize_4bit(dense, compress_statistics=True, quant_type="nf4"))
    assert torch.equal(experts.gate_up_proj, reference)  # the parameter reads as bitsandbytes' own round trip
    assert quantized_state(experts, "down_proj") is None  # set outside the block: left as it was
