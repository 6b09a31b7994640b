"""A model as `qlora train` builds it (4-bit base, LoRA, chunked loss, tiled MLP) is freed by `del` alone."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from qlora.config.recipe import recipe_from_mapping
from qlora.model.build import build_model
from qlora.ops.tiled_mlp import TiledMLP, decoder_mlps


def test_del_frees_a_built_model_without_the_garbage_collector(tiny_llama, alpaca_file):
    recipe = recipe_from_mapping(
        {
            "model": {"name_or_path": str(tiny_llama)},
            "data": {"path": str(alpaca_file)},
            "output_dir": "unused",
            "training": {"loss": "chunked", "mlp_tiles": 2},
        }
    )
    loaded = build_model(recipe)
    assert loaded.loss == "chunked" and all(isinstance(m, TiledMLP) for m in decoder_mlps(loaded.model))
    ids = torch.tensor([[1, 5, 9, 4, 7, 3]])
    loaded.model(input_ids=ids, labels=ids).loss.backward()  # the hooks and the tiles have run
    model = weakref.ref(loaded.model)
    gc.disable()  # a reference cycle would keep the model until a collection: none may run here
    try:
        del loaded
        assert model() is None
    finally:
        gc.enable()


def test_checkpointing_the_first_layers_only_gives_the_gradients_of_checkpointing_all(tiny_llama, alpaca_file):
    """`training.gradient_checkpointing: 1` recomputes the first decoder layer only; what is learnt is the same."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    grads = {}
    for setting, expected in ((True, [True, True]), (1, [True, False]), (False, [False, False])):
        recipe = recipe_from_mapping(
            {
                "model": {"name_or_path": str(tiny_llama)},
                "data": {"path": str(alpaca_file)},
                "output_dir": "unused",
                "lora": {"dropout": 0.0},
                "training": {"gradient_checkpointing": setting},
            }
        )
        torch.manual_seed(0)
        model = build_model(recipe).model.train()
        flags = [m.gradient_checkpointing for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert flags == expected
        ids = torch.tensor([[1, 5, 9, 4, 7, 3, 8, 2]])
        model(input_ids=ids, labels=ids).loss.backward()
        grads[str(setting)] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in grads["True"].items():
        torch.testing.assert_close(grads["1"][name], grad, rtol=0, atol=1e-6, msg=name)
        torch.testing.assert_close(grads["False"][name], grad, rtol=0, atol=1e-6, msg=name)


def test_decoder_kernels_are_liger_families_swapped_before_building_on_cuda_only(
    monkeypatch, tiny_llama, alpaca_file, capsys
):
    import sys
    import types

    import qlora.model.build
    import qlora.ops.kernels

    recipe = recipe_from_mapping(
        {"model": {"name_or_path": str(tiny_llama)}, "data": {"path": str(alpaca_file)}, "output_dir": "unused"}
    )
    assert qlora.model.build.use_decoder_kernels(recipe) is False  # no GPU here: nothing to swap
    calls = []

    def apply_liger_kernel_to_llama(
        rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True, swiglu=True, model=None
    ):
        calls.append(
            dict(
                rope=rope,
                cross_entropy=cross_entropy,
                fused_linear_cross_entropy=fused_linear_cross_entropy,
                rms_norm=rms_norm,
                swiglu=swiglu,
                model=model,
            )
        )

    fake = types.ModuleType("liger_kernel.transformers.monkey_patch")
    fake.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_liger_kernel_to_llama}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", fake)
    monkeypatch.setattr(qlora.model.build.torch.cuda, "is_available", lambda: True)
    qlora.ops.kernels.apply_decoder_kernels.cache_clear()
    try:
        assert qlora.model.build.use_decoder_kernels(recipe) and qlora.model.build.use_decoder_kernels(recipe)
        none = recipe_from_mapping(
            {
                "model": {"name_or_path": str(tiny_llama)},
                "data": {"path": str(alpaca_file)},
                "output_dir": "unused",
                "training": {"kernels": "none"},
            }
        )
        assert qlora.model.build.use_decoder_kernels(none) is False
    finally:
        qlora.ops.kernels.apply_decoder_kernels.cache_clear()
    # once per process, before any model exists, the loss left to qlora's chunked loss
    assert calls == [
        dict(rope=True, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True, swiglu=True, model=None)
    ]


def test_compiled_decoder_layers_give_the_eager_gradients(tiny_llama, alpaca_file):
    """`training.compile: true` over the 4-bit LoRA layers, where the compiler runs (a C compiler on a CPU)."""
    import shutil

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile needs a C compiler on a CPU")
    grads = []
    for compiled in (False, True):
        recipe = recipe_from_mapping(
            {
                "model": {"name_or_path": str(tiny_llama)},
                "data": {"path": str(alpaca_file)},
                "output_dir": "unused",
                "lora": {"dropout": 0.0},
                "training": {"compile": compiled},
            }
        )
        torch.manual_seed(0)
        model = build_model(recipe).model.train()
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        assert len(layers) == 2 and all(
            (getattr(m, "_compiled_call_impl", None) is not None) == compiled for m in layers
        )
        ids = torch.tensor([[1, 5, 9, 4, 7, 3, 8, 2]])
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
