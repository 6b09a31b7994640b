"""Liger Kernel's memory (`training.kernels: auto` on CUDA), modelled from its code (0.8.5): RMSNorm saves its
input as it is and an fp32 rstd, SwiGLU saves gate and up only, the fused loss holds its named terms."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qlora.config.long_context import fused_loss_terms
from qlora.memory.activations import Step, activation_bytes, chunked_loss_terms, layer_saved
from qlora.memory.estimate import estimate, settings_inventory
from qlora.memory.settings import Settings

BF16, FP32 = 2, 4


def step(inv, seq: int, **changes) -> Step:
    base = Step(
        batch=1,
        seq=seq,
        compute_bytes=BF16,
        autocast=True,
        device="cuda",
        checkpointing=True,
        attention="sdpa",
        method="qlora",
        rank=16,
        lora_dropout=0.0,
        lora_leaves=frozenset(inv.layer_linears()),
        adapter_numel=0,
        adapter_bytes=FP32,
        loss="chunked",
    )
    return replace(base, **changes)


@pytest.fixture(scope="module")
def inv():
    return settings_inventory("llama-3.1-8b", Settings())


def test_a_layer_saves_the_norm_inputs_as_they_are_and_two_mlp_intermediates(inv):
    d, T = inv.dims, 2048
    torch_saved, liger_saved = layer_saved(inv, step(inv, T)), layer_saved(inv, step(inv, T, kernels=True))
    assert torch_saved["norms"] == 2 * T * d.hidden * FP32 + 2 * T * FP32  # two fp32 copies (bf16 inputs), two rsqrt
    assert liger_saved["norms"] == T * d.hidden * BF16 + 2 * T * FP32  # the residual sum as it is, two rstd
    assert (torch_saved["mlp"], liger_saved["mlp"]) == (3 * T * d.intermediate * BF16, 2 * T * d.intermediate * BF16)
    assert (
        torch_saved["attention"] == liger_saved["attention"]
    )  # RoPE rotates q and k in place: attention saves the same


def test_unchecked_layers_save_exactly_what_the_kernels_drop(inv):
    d, T, L = inv.dims, 2048, inv.dims.layers
    unchecked = {k: activation_bytes(inv, step(inv, T, checkpointing=False, kernels=k)).kept for k in (False, True)}
    key = "everything the layers save"
    # per layer: the fp32 norm copies (8 bytes per hidden element) become the two inputs themselves (the layer input
    # now saved by the first norm), one intermediate-sized tensor less; the first layer's norm saves nothing (LoRA, no
    # checkpointing: nothing asks for the embeddings' gradient), its fp32 copy or its bf16 input
    per_layer = T * d.hidden * (2 * FP32 - 2 * BF16) + T * d.intermediate * BF16
    assert unchecked[False][key] - unchecked[True][key] == L * per_layer - T * d.hidden * (FP32 - BF16)


def test_the_fused_loss_holds_its_own_terms_where_it_runs_and_the_torch_path_beyond(inv):
    short, long = (
        chunked_loss_terms(inv, step(inv, 2048, kernels=True), grads=True),
        chunked_loss_terms(inv, step(inv, 80000, kernels=True), grads=True),
    )
    liger = {
        f"Liger fused loss: {k}": v for k, v in fused_loss_terms(2047, inv.dims.vocab, inv.dims.hidden, BF16).items()
    }
    assert liger.items() <= short.items() and "Liger fused loss: one chunk's logits (64 tokens)" in short
    assert (
        "loss chunk" not in short and "hidden-state gradient" not in short
    )  # its input gradient covers the labelled rows
    assert "loss chunk" in long and not any(
        k.startswith("Liger") for k in long
    )  # 80,000 tokens: its chunk would pass a GiB
    assert chunked_loss_terms(inv, step(inv, 2048), grads=True) == chunked_loss_terms(
        inv, step(inv, 2048, kernels=False), grads=True
    )


def test_liger_is_predicted_on_a_gpu_only_and_holds_less_there():
    def total(**changes):
        settings = Settings(seq_len=2048, rank=16, **changes)
        return estimate(settings_inventory("llama-3.1-8b", settings), "qlora", settings)

    assert total(device="cpu", kernels="auto").bytes == total(device="cpu", kernels="none").bytes  # Triton: CUDA only
    liger, plain = total(kernels="auto"), total(kernels="none")
    assert liger.total < plain.total and liger.bytes["weights"] == plain.bytes["weights"]


# --- the same contracts measured on a CPU ---------------------------------------------------------------
# Liger's Triton kernels need CUDA. These stand-ins keep exactly what its autograd functions keep (0.8.5):
# SwiGLU saves gate and up and writes their gradients over them; RMSNorm saves its input and an fp32 rstd and
# turns the output's gradient into the input's in place. They work in blocks of rows, so that, like one fused
# kernel, they make no full-size temporaries. Measured against the profiler, they check how the model of those
# contracts composes with the rest of a step (checkpointing, LoRA, the tiled MLP).

ROWS = 8


def _blocks(n: int):
    return (slice(i, i + ROWS) for i in range(0, n, ROWS))


class _SiLUMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        a2, b2 = a.view(-1, a.shape[-1]), b.view(-1, b.shape[-1])
        c = torch.empty_like(a)
        for rows in _blocks(a2.shape[0]):
            c.view(-1, a.shape[-1])[rows] = torch.nn.functional.silu(a2[rows]) * b2[rows]
        ctx.save_for_backward(a, b)
        return c

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        a2, b2, dc2 = a.view(-1, a.shape[-1]), b.view(-1, b.shape[-1]), dc.reshape(-1, a.shape[-1])
        for rows in _blocks(a2.shape[0]):
            sig = torch.sigmoid(a2[rows])
            silu = a2[rows] * sig
            da = dc2[rows] * b2[rows] * (sig + silu * (1 - sig))
            b2[rows] = dc2[rows] * silu
            a2[rows] = da
        return a, b


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = x.view(-1, x.shape[-1])
        rstd = torch.empty(x2.shape[0], dtype=torch.float32)
        y = torch.empty_like(x)
        for rows in _blocks(x2.shape[0]):
            rstd[rows] = x2[rows].float().pow(2).mean(-1).add(eps).rsqrt()
            y.view(-1, x.shape[-1])[rows] = x2[rows] * rstd[rows, None] * weight
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        assert not ctx.needs_input_grad[1], "the stand-in has no weight gradient (LoRA keeps norms frozen)"
        x, weight, rstd = ctx.saved_tensors
        x2, dy2 = x.view(-1, x.shape[-1]), dy.view(-1, x.shape[-1])
        for rows in _blocks(x2.shape[0]):
            normed = x2[rows] * rstd[rows, None]
            g = dy2[rows] * weight
            dy2[rows] = rstd[rows, None] * (g - normed * (g * normed).mean(-1, keepdim=True))
        return dy, None, None


class LigerLikeRMSNorm(torch.nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight, self.variance_epsilon = torch.nn.Parameter(torch.ones(hidden_size)), eps

    def forward(self, x):
        return _RMSNorm.apply(x, self.weight, self.variance_epsilon)


class LigerLikeSwiGLUMLP(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj, self.up_proj = (
            torch.nn.Linear(hidden, inner, bias=False),
            torch.nn.Linear(hidden, inner, bias=False),
        )
        self.down_proj = torch.nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(_SiLUMul.apply(self.gate_proj(x), self.up_proj(x)))


@pytest.fixture
def liger_like(monkeypatch):
    """The stand-ins swapped into transformers' Llama classes, as Liger swaps its own; the profiler told they run."""
    from transformers.models.llama import modeling_llama

    import qlora.memory.activations
    import qlora.memory.estimate

    monkeypatch.setattr(modeling_llama, "LlamaRMSNorm", LigerLikeRMSNorm)
    monkeypatch.setattr(modeling_llama, "LlamaMLP", LigerLikeSwiGLUMLP)
    monkeypatch.setattr(qlora.memory.estimate, "liger_kernels", lambda settings: True)
    monkeypatch.setattr(qlora.memory.activations, "fused_loss_is_smaller", lambda *a: False)  # the CPU's loss: torch's


@pytest.mark.parametrize(
    "changes",
    [(), ("training.gradient_checkpointing=false",), ("training.mlp_tiles=2",)],
    ids=["checkpointed", "unchecked", "tiled-mlp"],
)
def test_the_kernels_memory_contracts_compose_as_measured(liger_like, llama_config, changes):
    from conftest import predicted_and_measured

    keys = ("data.max_seq_len=64", "training.batch_size=2", "lora.r=4", "lora.dropout=0", *changes)
    predicted, measured = predicted_and_measured(llama_config, "qlora", *keys)
    assert predicted.allocated == pytest.approx(measured.peak, rel=0.01)
    assert predicted.bytes["activations"] == pytest.approx(measured.bytes["activations"], rel=0.01)
