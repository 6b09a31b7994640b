"""Liger Kernel's memory (`training.kernels: auto` on CUDA), modelled from its code (0.8.5): RMSNorm saves its
input as it is and an fp32 rstd, SwiGLU saves gate and up only, the fused loss holds its named terms."""

from __future__ import annotations

from dataclasses import replace

import pytest

from qlora.config.long_context import fused_loss_terms
from qlora.memory.activations import Step, activation_bytes, chunked_loss_terms, layer_saved
from qlora.memory.estimate import estimate, settings_inventory
from qlora.memory.settings import Settings

BF16, FP32 = 2, 4


def step(inv, seq: int, **changes) -> Step:
    base = Step(batch=1, seq=seq, compute_bytes=BF16, autocast=True, device="cuda", checkpointing=True, attention="sdpa",
                method="qlora", rank=16, lora_dropout=0.0, lora_leaves=frozenset(inv.layer_linears()), adapter_numel=0,
                adapter_bytes=FP32, loss="chunked")
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
    assert torch_saved["attention"] == liger_saved["attention"]  # RoPE rotates q and k in place: attention saves the same


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
    short, long = chunked_loss_terms(inv, step(inv, 2048, kernels=True), grads=True), chunked_loss_terms(inv, step(inv, 80000, kernels=True), grads=True)
    liger = {f"Liger fused loss: {k}": v for k, v in fused_loss_terms(2047, inv.dims.vocab, inv.dims.hidden, BF16).items()}
    assert liger.items() <= short.items() and "Liger fused loss: one chunk's logits (64 tokens)" in short
    assert "loss chunk" not in short and "hidden-state gradient" not in short  # its input gradient covers the labelled rows
    assert "loss chunk" in long and not any(k.startswith("Liger") for k in long)  # 80,000 tokens: its chunk would pass a GiB
    assert chunked_loss_terms(inv, step(inv, 2048), grads=True) == chunked_loss_terms(inv, step(inv, 2048, kernels=False), grads=True)


def test_liger_is_predicted_on_a_gpu_only_and_holds_less_there():
    def total(**changes):
        settings = Settings(seq_len=2048, rank=16, **changes)
        return estimate(settings_inventory("llama-3.1-8b", settings), "qlora", settings)

    assert total(device="cpu", kernels="auto").bytes == total(device="cpu", kernels="none").bytes  # Triton: CUDA only
    liger, plain = total(kernels="auto"), total(kernels="none")
    assert liger.total < plain.total and liger.bytes["weights"] == plain.bytes["weights"]
