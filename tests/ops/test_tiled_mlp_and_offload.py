"""Tiled MLP and offloaded checkpoints: same gradients and adapters as without them, and the keys' rules."""

from __future__ import annotations

import copy

import pytest
import torch

from qlora.config.errors import QLoraError
from qlora.config.long_context import mlp_tiles_for
from qlora.config.recipe import recipe_from_mapping
from qlora.model.build import enable_gradient_checkpointing
from qlora.ops.tiled_mlp import TiledMLP, decoder_mlps, tile_mlps
from qlora.training.auto import wants_offload

MINIMAL = {"model": {"name_or_path": "org/model"}, "data": {"path": "data.jsonl"}, "output_dir": "out"}
HIDDEN = 64


def lora_llama(dropout: float = 0.0, checkpointing: bool = False):
    """A tiny fp32 Llama with LoRA on gate/up/down (and q/v), its B matrices random so every gradient is non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=HIDDEN,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config)
    if checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    targets = ["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"]
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    model.train()
    return model


def gradients(model, ids, seed: int = 1):
    """Loss, the embeddings-output gradient and every LoRA gradient of one step."""
    torch.manual_seed(seed)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    loss = model(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    lora = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), embeds.grad, lora


def assert_same_gradients(expected, actual):
    (loss_a, input_a, lora_a), (loss_b, input_b, lora_b) = expected, actual
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(input_b, input_a, rtol=1e-5, atol=1e-5)
    assert lora_a.keys() == lora_b.keys() and any("up_proj.lora_A" in n for n in lora_a)
    for name in lora_a:
        assert lora_a[name].abs().sum() > 0, name
        torch.testing.assert_close(lora_b[name], lora_a[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_tiled_mlp_gradients_equal_the_untiled_ones(checkpointing):
    untiled = lora_llama(checkpointing=checkpointing)
    tiled = copy.deepcopy(untiled)
    calls = []
    tile_mlps(tiled, lambda tokens: calls.append(tokens) or 5)  # 5 uneven tiles of 2 x 23 tokens
    ids = torch.randint(0, 128, (2, 23), generator=torch.Generator().manual_seed(0))
    assert_same_gradients(gradients(untiled, ids), gradients(tiled, ids))
    # every layer runs tiled in forward (and again in checkpointing's recompute)
    assert calls == [46] * 2 * (2 if checkpointing else 1)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_tiled_mlp_replays_dropout_masks_in_backward(checkpointing):
    """With LoRA dropout each tile draws its own masks: backward must see those of the forward,
    i.e. give the gradients of the same tiles run with grad one after the other."""
    reference = lora_llama(dropout=0.3, checkpointing=checkpointing)
    tiled = copy.deepcopy(reference)
    for mlp in decoder_mlps(reference):
        forward = mlp.forward
        mlp.forward = lambda x, f=forward: torch.cat([f(t) for t in x.reshape(-1, HIDDEN).chunk(3)]).view(
            *x.shape[:-1], -1
        )
    tile_mlps(tiled, lambda tokens: 3)
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    assert_same_gradients(gradients(reference, ids), gradients(tiled, ids))


def test_one_tile_runs_the_mlp_untouched():
    model = lora_llama()
    tile_mlps(model, lambda tokens: 1)
    mlp = decoder_mlps(model)[0]
    x = torch.randn(1, 4, HIDDEN, requires_grad=True)
    assert mlp(x).grad_fn.name() != "TiledMLPFunctionBackward"
    assert len(decoder_mlps(model)) == 2 and isinstance(mlp, TiledMLP)
    assert "TiledMLP(" in repr(model)  # a module swapped in, not a patched forward


def test_auto_tiles_only_long_sequences():
    assert mlp_tiles_for("auto", 4096, hidden=4096) == 1
    assert mlp_tiles_for("auto", 4097, hidden=4096) == 2
    assert mlp_tiles_for("auto", 80_000, hidden=4096) == 20  # tiles of at most `hidden` tokens
    assert mlp_tiles_for("auto", 80_000, hidden=8192) == 10
    assert mlp_tiles_for("auto", 2048, hidden=256) == 1  # a small model: not below 4,096 tokens
    assert mlp_tiles_for("auto", 8192, hidden=256) == 2
    assert mlp_tiles_for(8, 80_000, hidden=4096) == 8
    assert mlp_tiles_for(8, 3, hidden=4096) == 3  # never more tiles than tokens


def recipe_for(folder, **training):
    return recipe_from_mapping(
        {
            **MINIMAL,
            "model": {"name_or_path": str(folder)},
            "lora": {"r": 4, "dropout": 0.0},
            "training": {"optimizer": "adamw_torch", **training},
        }
    )


def test_offloaded_checkpoints_give_identical_adapters(tiny_llama, monkeypatch):
    """Offload forced on a CPU runs the hooks (one tensor per layer: the checkpoint's kept input)
    and changes nothing in what is learnt."""
    from qlora.model.build import build_model

    packed = []
    real = torch.autograd.graph.save_on_cpu

    class Counting(real):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook
            self.pack_hook = lambda t: packed.append(tuple(t.shape)) or pack(t)

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", Counting)
    adapters = []
    for offload in (False, True):
        recipe = recipe_for(tiny_llama)
        torch.manual_seed(0)
        model = build_model(recipe, offload=offload).model.train()  # offload forced on a CPU: the same path
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert packed == [(2, 16, 64)] * 2 * 3  # two layers' inputs per step, nothing else
    assert all(value.abs().sum() > 0 for name, value in adapters[0].items() if "lora_B" in name)  # it learnt
    for name, value in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], value, rtol=0, atol=0, msg=name)


def test_offload_on_a_cpu_is_a_no_op_that_says_so(capsys):
    assert wants_offload(recipe_for("x", offload_checkpoints=True)) is False
    assert "no GPU" in capsys.readouterr().err
    assert wants_offload(recipe_for("x", offload_checkpoints="auto")) is False
    assert wants_offload(recipe_for("x")) is False
    assert capsys.readouterr().err == ""


def test_offload_hooks_replace_the_checkpoint_function():
    model = lora_llama(checkpointing=True)
    enable_gradient_checkpointing(model.get_base_model(), offload=True)
    layers = model.get_base_model().model.layers
    assert all(layer._gradient_checkpointing_func.__name__ == "checkpoint_on_host" for layer in layers)


@pytest.mark.parametrize(
    "override,message",
    [
        ("training.mlp_tiles=0", "training.mlp_tiles: expected auto or an integer >= 1, got 0"),
        ("training.mlp_tiles=many", "training.mlp_tiles: expected auto or an integer >= 1, got 'many'"),
        ("training.mlp_tiles=true", "training.mlp_tiles: expected"),
        (
            "training.offload_checkpoints=sometimes",
            "training.offload_checkpoints: expected false, true or auto, got 'sometimes'",
        ),
        ("training.offload_checkpoints=1", "training.offload_checkpoints: expected"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(QLoraError) as info:
        recipe_from_mapping(MINIMAL, [override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_offload_without_checkpointing_is_refused():
    with pytest.raises(
        QLoraError, match="^training.offload_checkpoints: true needs training.gradient_checkpointing=true"
    ):
        recipe_from_mapping(MINIMAL, ["training.offload_checkpoints=true", "training.gradient_checkpointing=false"])


def test_defaults_and_accepted_values():
    assert (
        recipe_from_mapping(MINIMAL).training.mlp_tiles,
        recipe_from_mapping(MINIMAL).training.offload_checkpoints,
    ) == ("auto", False)
    recipe = recipe_from_mapping(MINIMAL, ["training.mlp_tiles=8", "training.offload_checkpoints=auto"])
    assert (recipe.training.mlp_tiles, recipe.training.offload_checkpoints) == (8, "auto")
