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
