"""The chunked loss gives transformers' loss and gradients, without the full logits."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

from qlora.config.architecture import HeadTransform
from qlora.config.long_context import chunk_tokens
from qlora.config.recipe import LoraSpec, recipe_from_mapping
from qlora.model.build import install_loss
from qlora.model.lora import attach_lora
from qlora.ops.loss import chunked_causal_lm_loss

VOCAB = 97


def tiny(tied: bool = False, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        **overrides,
    )
    return LlamaForCausalLM(config).float()


def pair(tied: bool = False, lora: bool = True):
    """(standard, chunked): the same model twice (LoRA on every linear layer, or trained in full)."""
    models = []
    for loss in ("standard", "chunked"):
        model = tiny(tied)
        if lora:
            torch.manual_seed(1)
            model = attach_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0, targets="all-linear"))
            for (
                name,
                param,
            ) in model.named_parameters():  # peft starts lora_B at zero: give the adapters a real gradient path
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        assert install_loss(model, loss_recipe(loss)) == loss
        models.append(model)
    return models


def loss_recipe(loss: str):
    return recipe_from_mapping({"model": {"name_or_path": "unused"}, "training": {"loss": loss}}, for_training=False)


def batches():
    """Two micro-batches: a prompt-masked one and a right-padded one (pads ignored, attention mask)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    masked = ids.clone()
    masked[:, :5] = -100  # prompt tokens: no loss
    padded_ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(padded_ids)
    mask[1, 7:] = 0
    mask[2, 10:] = 0
    padded_labels = padded_ids.masked_fill(mask == 0, -100)
    return [
        {"input_ids": ids, "labels": masked},
        {"input_ids": padded_ids, "attention_mask": mask, "labels": padded_labels},
    ]


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def accumulate(model, micro_batches, num_items=None) -> float:
    """One accumulated step as Trainer runs it: each micro-batch's loss over the whole step's items."""
    total = 0.0
    for batch in micro_batches:
        loss = model(**batch, **({"num_items_in_batch": num_items} if num_items is not None else {})).loss
        (loss if num_items is not None else loss / len(micro_batches)).backward()
        total += loss.item()
    return total


def assert_same(standard, chunked, micro_batches, num_items=None):
    ref, out = accumulate(standard, micro_batches, num_items), accumulate(chunked, micro_batches, num_items)
    assert out == pytest.approx(ref, rel=1e-6)
    ref_grads, out_grads = grads(standard), grads(chunked)
    assert ref_grads.keys() == out_grads.keys() and ref_grads
    for name, grad in ref_grads.items():
        torch.testing.assert_close(out_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    return ref_grads


def test_ignore_index_padding_and_grad_accumulation_with_num_items_in_batch():
    standard, chunked = pair()
    micro = batches()
    num_items = torch.tensor(sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro))
    ref_grads = assert_same(standard, chunked, micro, num_items)
    assert any("lora_A" in n for n in ref_grads) and not any("lm_head" in n for n in ref_grads)  # the head is frozen


def test_plain_mean_without_num_items_in_batch():
    standard, chunked = pair()
    assert_same(standard, chunked, batches())


def test_packed_batch_with_position_ids():
    """Two examples packed into one row: positions restart, the boundary token is not a target."""
    standard, chunked = pair()
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, 9] = -100  # the second example's first token is not predicted from the first example
    positions = torch.cat([torch.arange(9), torch.arange(7)]).unsqueeze(0)
    assert_same(standard, chunked, [{"input_ids": ids, "labels": labels, "position_ids": positions}])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_trained_head_gets_the_same_gradient(tied):
    """Full fine-tuning: the head (or the embeddings it is tied to) trains; its gradient is made chunk by chunk."""
    standard, chunked = pair(tied=tied, lora=False)
    ref_grads = assert_same(standard, chunked, batches(), torch.tensor(40))
    assert ("model.embed_tokens.weight" in ref_grads) and (("lm_head.weight" in ref_grads) != tied)


def test_tied_embeddings_with_lora():
    standard, chunked = pair(tied=True)
    assert_same(standard, chunked, batches(), torch.tensor(40))


def test_many_chunks_and_a_bias_match_the_full_logits():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight, bias = torch.randn(50, 16, requires_grad=True), torch.randn(50, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    ref = ForCausalLMLoss(hidden @ weight.T + bias, labels, 50, num_items_in_batch=torch.tensor(11))
    out = chunked_causal_lm_loss(
        hidden, weight, bias, labels, num_items_in_batch=torch.tensor(11), chunk=4
    )  # 4 chunks
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(
        torch.autograd.grad(3 * ref, (hidden, weight, bias)), torch.autograd.grad(3 * out, (hidden, weight, bias))
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_eval_uses_the_same_loss_without_logits_and_generation_keeps_them():
    standard, chunked = pair()
    batch = batches()[1]
    with torch.no_grad():
        ref, out = standard(**batch), chunked(**batch)
        plain = chunked(input_ids=batch["input_ids"])
    assert out.logits is None and out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    assert plain.logits.shape == (3, 12, VOCAB)  # no labels: the original forward (generation)
    prompt = batch["input_ids"][:1, :4]
    torch.testing.assert_close(
        chunked.generate(prompt, max_new_tokens=3, do_sample=False),
        standard.generate(prompt, max_new_tokens=3, do_sample=False),
    )


def test_a_deep_copy_keeps_its_own_forward():
    import copy

    _, chunked = pair()
    clone = copy.deepcopy(chunked)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(0.5)
        ids = torch.tensor([[3, 4, 5, 6]])
        assert not torch.allclose(
            clone(input_ids=ids).logits, chunked(input_ids=ids).logits
        )  # not the original's weights
        assert clone(input_ids=ids, labels=ids).loss.item() != chunked(input_ids=ids, labels=ids).loss.item()


HEADS = {  # a family per head transform, its value made large enough to change the loss
    "gemma2": {"final_logit_softcapping": 0.5, "attn_implementation": "eager"},  # softcap * tanh(logits / softcap)
    "granite": {"logits_scaling": 4.0},  # logits / logits_scaling
    "cohere": {"logit_scale": 3.0},  # logits * logit_scale
}


def family_pair(model_type: str, lora: bool):
    """(standard, chunked): a tiny `model_type` causal LM twice (LoRA on every linear layer, or trained in full)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    options = dict(HEADS[model_type])
    attn = options.pop("attn_implementation", "sdpa")
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    models = []
    for loss in ("standard", "chunked"):
        torch.manual_seed(0)
        config = AutoConfig.for_model(model_type, num_key_value_heads=2, head_dim=8, **sizes, **options)
        config._attn_implementation = attn
        model = AutoModelForCausalLM.from_config(config).float()
        if lora:
            torch.manual_seed(1)
            model = attach_lora(model, LoraSpec(r=4, alpha=8, dropout=0.0, targets="all-linear"))
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        assert install_loss(model, loss_recipe(loss)) == loss
        models.append(model)
    return models


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("model_type", sorted(HEADS))
def test_soft_capped_and_scaled_heads_take_the_chunked_loss_with_the_same_loss_and_gradients(model_type, lora, capsys):
    standard, chunked = family_pair(model_type, lora)
    assert "standard loss" not in capsys.readouterr().err  # no fallback any more
    with torch.no_grad():
        batch = batches()[0]
        plain = standard(input_ids=batch["input_ids"]).logits
    assert plain.abs().max() < (HEADS[model_type].get("final_logit_softcapping") or float("inf"))
    assert_same(standard, chunked, batches(), torch.tensor(40))


def test_soft_capping_and_scaling_over_many_chunks_with_a_bias():
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight, bias = torch.randn(50, 16, requires_grad=True), torch.randn(50, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    labels[0, :3] = -100
    cap, scale = 2.0, 0.7
    logits = cap * torch.tanh((hidden @ weight.T + bias) * scale / cap)
    ref = ForCausalLMLoss(logits, labels, 50, num_items_in_batch=torch.tensor(11))
    out = chunked_causal_lm_loss(
        hidden, weight, bias, labels, num_items_in_batch=torch.tensor(11), chunk=4, transform=HeadTransform(scale, cap)
    )
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    for a, b in zip(
        torch.autograd.grad(3 * ref, (hidden, weight, bias)), torch.autograd.grad(3 * out, (hidden, weight, bias))
    ):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_a_head_the_chunked_loss_cannot_reproduce_falls_back_to_the_standard_loss_with_one_line(capsys):
    model = tiny(output_multiplier_scale=2.0)
    forward = model.forward
    assert install_loss(model, loss_recipe("chunked")) == "standard"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "training.loss: chunked cannot reproduce this model's logits (its config sets output_multiplier_scale=2.0); "
        "using the standard loss"
    ]
    assert model.forward == forward


def test_chunk_size_is_a_byte_budget():
    assert chunk_tokens(128256) == 512  # 256 MiB of fp32 logits, rounded down to a multiple of 64
    assert chunk_tokens(32000) == 2048
    assert chunk_tokens(512) * 512 * 4 <= 2**28


@pytest.mark.parametrize("loss", ["chunked", "standard"])
def test_build_model_installs_the_recipe_loss(tiny_llama, alpaca_file, loss):
    from qlora.config.recipe import recipe_from_mapping
    from qlora.model.build import build_model

    recipe = recipe_from_mapping(
        {
            "model": {"name_or_path": str(tiny_llama)},
            "data": {"path": str(alpaca_file)},
            "training": {"loss": loss},
            "output_dir": "unused",
        }
    )
    loaded = build_model(recipe)
    assert loaded.loss == loss
    out = loaded.model(input_ids=torch.tensor([[1, 5, 9, 4]]), labels=torch.tensor([[1, 5, 9, 4]]))
    assert (out.logits is None) == (loss == "chunked")


def test_recipe_keys_are_checked_and_reach_the_trainer(tmp_path, alpaca_file):
    from qlora.config.errors import QLoraError
    from qlora.config.recipe import recipe_from_mapping
    from qlora.training.run import training_arguments

    base = {
        "model": {"name_or_path": str(tmp_path)},
        "data": {"path": str(alpaca_file)},
        "output_dir": str(tmp_path / "out"),
    }
    with pytest.raises(QLoraError, match="training.loss: unknown value 'chunky'"):
        recipe_from_mapping(base, ["training.loss=chunky"])
    with pytest.raises(QLoraError, match="training.eval_batch_size: must be >= 1"):
        recipe_from_mapping(base, ["training.eval_batch_size=0"])
    recipe = recipe_from_mapping(base, ["training.batch_size=2"])
    args = training_arguments(recipe, torch.float32, tmp_path / "ckpt", has_eval=True)
    assert args.per_device_eval_batch_size == 2 and args.prediction_loss_only  # the training batch, not max(batch, 8)
    recipe = recipe_from_mapping(
        base,
        ["training.batch_size=2", "training.eval_batch_size=6", "task=classification", "data.format=classification"],
    )
    args = training_arguments(recipe, torch.float32, tmp_path / "ckpt", has_eval=True)
    assert (
        args.per_device_eval_batch_size == 6 and not args.prediction_loss_only
    )  # a classifier's metrics need its logits


@pytest.mark.slow
def test_qlora_train_gives_the_same_adapter_and_eval_loss_with_either_loss(tiny_llama, alpaca_file, tmp_path):
    """Through Trainer: gradient accumulation (num_items_in_batch), padded batches with prompt-masked
    labels, the eval before and after training: the chunked loss trains the adapter the standard one does."""
    from safetensors.torch import load_file

    from qlora.config.recipe import recipe_from_mapping
    from qlora.training.run import train

    runs = {}
    for loss in ("standard", "chunked"):
        recipe = recipe_from_mapping(
            {
                "model": {"name_or_path": str(tiny_llama)},
                "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                "data": {"path": str(alpaca_file), "max_seq_len": 200, "eval_size": 8},
                "training": {
                    "max_steps": 2,
                    "batch_size": 2,
                    "grad_accum": 2,
                    "learning_rate": 1e-3,
                    "save_steps": 100,
                    "loss": loss,
                    "eval_batch_size": 3,
                },
                "output_dir": str(tmp_path / loss),
            }
        )
        metrics = train(recipe)
        runs[loss] = metrics, load_file(tmp_path / loss / "adapter" / "adapter_model.safetensors")
    (m_std, a_std), (m_chk, a_chk) = runs["standard"], runs["chunked"]
    assert m_chk["eval_loss_before"] == pytest.approx(m_std["eval_loss_before"], rel=1e-6)
    assert m_chk["eval_loss_after"] == pytest.approx(m_std["eval_loss_after"], rel=1e-5)
    assert m_chk["train_loss"] == pytest.approx(m_std["train_loss"], rel=1e-5)
    assert a_std.keys() == a_chk.keys()
    for name, tensor in a_std.items():
        torch.testing.assert_close(a_chk[name], tensor, rtol=1e-4, atol=1e-6, msg=name)


def test_the_fused_kernel_is_looked_up_once_and_its_absence_on_a_gpu_is_one_line(monkeypatch, capsys):
    import qlora.ops.loss
    import qlora.training.auto
    from qlora.training.auto import resolve_kernels

    qlora.ops.loss._liger.cache_clear()
    for _ in range(3):
        qlora.ops.loss.fused_kernel_installed()
    assert qlora.ops.loss._liger.cache_info().misses == 1  # one import attempt, not one per forward
    recipe = loss_recipe("chunked")
    monkeypatch.setattr(qlora.training.auto.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(qlora.training.auto, "fused_kernel_installed", lambda: True)
    assert resolve_kernels(recipe) is recipe and capsys.readouterr().err == ""  # installed: Liger runs, as predicted
    monkeypatch.setattr(qlora.training.auto, "fused_kernel_installed", lambda: False)
    assert resolve_kernels(recipe).training.kernels == "none"  # what runs, so the profiler's answers model it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Liger Kernel is not installed" in err[0] and "pip install 'qlora-kit[kernels]'" in err[0]


def test_liger_runs_where_its_memory_is_the_smaller_the_torch_path_beyond():
    """Liger's chunk grows with the sequence (its code's rule); past a few ten thousand tokens of an 8B the torch
    chunked loss holds less, so it runs there, and the profiler's torch terms stay an upper bound."""
    from qlora.config.long_context import fused_loss_chunk_tokens, fused_loss_is_smaller

    assert [fused_loss_chunk_tokens(n, 128256, 4096) for n in (2047, 16383, 79999)] == [64, 512, 4096]
    assert fused_loss_chunk_tokens(10, 128256, 4096) == 1 and fused_loss_chunk_tokens(3, 32, 4096) == 3
    assert fused_loss_is_smaller(2047, 2048, 128256, 4096, 2) and fused_loss_is_smaller(16383, 16384, 128256, 4096, 2)
    assert not fused_loss_is_smaller(79999, 80000, 128256, 4096, 2)  # the long-context recipe: the torch path
