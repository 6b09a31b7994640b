"""A model as `qlora train` builds it (4-bit base, LoRA, chunked loss, tiled MLP) is freed by `del` alone."""

from __future__ import annotations

import gc
import weakref

import torch

from qlora.config.recipe import recipe_from_mapping
from qlora.model.build import build_model
from qlora.ops.tiled_mlp import TiledMLP, decoder_mlps


def test_del_frees_a_built_model_without_the_garbage_collector(tiny_llama, alpaca_file):
    recipe = recipe_from_mapping({"model": {"name_or_path": str(tiny_llama)}, "data": {"path": str(alpaca_file)},
                                  "output_dir": "unused", "training": {"loss": "chunked", "mlp_tiles": 2}})
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
        recipe = recipe_from_mapping({"model": {"name_or_path": str(tiny_llama)}, "data": {"path": str(alpaca_file)},
                                      "output_dir": "unused", "lora": {"dropout": 0.0}, "training": {"gradient_checkpointing": setting}})
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
