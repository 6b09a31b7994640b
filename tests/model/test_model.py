"""Model loading: the 4-bit base, LoRA on every linear layer but the head, checkpointing, reload."""

from __future__ import annotations

import pytest
import torch

from qlora.config.errors import QLoraError
from qlora.config.recipe import recipe_from_mapping

LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def recipe_for(model_dir, *overrides, tmp="unused"):
    data = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"path": "d.jsonl"},
        "output_dir": tmp,
        "lora": {"r": 4, "alpha": 8},
    }
    return recipe_from_mapping(data, list(overrides))


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    from qlora.model.build import build_model

    torch.manual_seed(0)
    return build_model(recipe_for(tiny_llama))


def test_every_block_linear_is_nf4_double_quant_wrapped_by_lora(loaded):
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    seen = set()
    for name, module in loaded.model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in LLAMA_LINEARS and isinstance(module, LoraLayer):
            base = module.get_base_layer()
            assert isinstance(base, bnb.nn.Linear4bit), name
            assert base.weight.quant_type == "nf4"
            assert base.weight.quant_state.nested, f"{name} lacks the double-quant (nested) state"
            assert base.weight.dtype == torch.uint8
            seen.add(leaf)
    assert seen == LLAMA_LINEARS


@pytest.fixture(scope="module")
def loaded_bf16(tiny_llama):
    """The same model with a bf16 compute dtype: on CPU everything else is fp32, so only this shows an upcast."""
    from qlora.model.build import build_model

    torch.manual_seed(0)
    return build_model(recipe_for(tiny_llama, "quantization.compute_dtype=bfloat16"))


def test_head_and_embeddings_stay_in_the_compute_dtype_and_unwrapped(loaded_bf16):
    from peft.tuners.lora import LoraLayer

    inner = loaded_bf16.model.get_base_model()
    assert loaded_bf16.compute_dtype == torch.bfloat16
    assert type(inner.lm_head) is torch.nn.Linear and not isinstance(inner.lm_head, LoraLayer)
    assert inner.lm_head.weight.dtype == inner.model.embed_tokens.weight.dtype == torch.bfloat16


def test_no_frozen_weight_is_upcast_beyond_the_compute_dtype(loaded_bf16):
    frozen = {n: p.dtype for n, p in loaded_bf16.model.named_parameters() if not p.requires_grad}
    packed = {n for n, dtype in frozen.items() if dtype == torch.uint8}  # the 4-bit codes
    assert packed and all("_proj" in n for n in packed)
    assert {dtype for n, dtype in frozen.items() if n not in packed} == {torch.bfloat16}, frozen
    q_proj = loaded_bf16.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer
    assert q_proj.compute_dtype == torch.bfloat16


def test_only_adapters_require_grad(loaded):
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in loaded.model.named_parameters() if p.requires_grad)


def test_gradient_checkpointing_is_on_and_non_reentrant(loaded):
    inner = loaded.model.get_base_model()
    assert inner.config.use_cache is False
    layers = inner.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)
    checkpoint = layers[0]._gradient_checkpointing_func
    assert checkpoint.keywords == {"use_reentrant": False}  # a functools.partial of torch's checkpoint
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    for layer in layers:
        layer._gradient_checkpointing_func = counting
    try:
        loaded.model.train()
        loaded.model(input_ids=torch.randint(5, 300, (1, 8))).logits.float().sum().backward()
    finally:
        for layer in layers:
            layer._gradient_checkpointing_func = checkpoint
        loaded.model.zero_grad(set_to_none=True)
    assert len(calls) == len(layers)  # every layer's forward went through the non-reentrant checkpoint


def test_compute_dtype_is_fp32_on_cpu(loaded):
    assert loaded.compute_dtype == torch.float32
    assert loaded.model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.compute_dtype == torch.float32


def test_paged_optimizer_steps_lower_the_loss_on_a_fixed_batch(tiny_llama):
    import bitsandbytes as bnb

    from qlora.model.build import build_model

    torch.manual_seed(0)
    model = build_model(recipe_for(tiny_llama)).model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.PagedAdamW32bit(params, lr=1e-2)
    batch = torch.randint(5, 300, (4, 24))
    losses = []
    for _ in range(12):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[0] - losses[-1] > 0.4, losses


def test_saved_adapter_reloads_onto_a_fresh_4bit_base_with_identical_logits(tiny_llama, tmp_path):
    from peft import PeftModel

    from qlora.model.build import build_model
    from qlora.model.load import load_base_model

    recipe = recipe_for(tiny_llama)
    torch.manual_seed(0)
    loaded = build_model(recipe)
    with torch.no_grad():  # give lora_B non-zero values so the adapter changes the output
        for name, param in loaded.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    loaded.model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "adapter_model.safetensors").exists() and not (tmp_path / "adapter_model.bin").exists()
    ids = torch.randint(5, 300, (2, 16))
    loaded.model.eval()
    with torch.no_grad():
        expected = loaded.model(input_ids=ids).logits
        fresh = PeftModel.from_pretrained(load_base_model(recipe, loaded.compute_dtype), tmp_path).eval()
        got = fresh(input_ids=ids).logits
        with fresh.disable_adapter():
            without = fresh(input_ids=ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(without, expected), "the adapter should change the logits"
    q_proj = fresh.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"  # reloaded onto the 4-bit base, not a 16-bit one


@pytest.mark.parametrize(
    ("targets", "expected"),
    [
        ("attention", ["k_proj", "o_proj", "q_proj", "v_proj"]),
        ("qv", ["q_proj", "v_proj"]),
        ("mlp", ["down_proj", "gate_proj", "up_proj"]),
    ],
)
def test_target_presets_resolve_to_module_names(tiny_llama, targets, expected):
    from qlora.model.load import load_base_model
    from qlora.model.lora import lora_target_modules

    base = load_base_model(recipe_for(tiny_llama), torch.float32)
    assert lora_target_modules(base, targets) == expected


def test_unknown_target_module_is_a_clear_error(tiny_llama):
    from qlora.model.load import load_base_model
    from qlora.model.lora import lora_target_modules

    base = load_base_model(recipe_for(tiny_llama), torch.float32)
    with pytest.raises(QLoraError, match=r"no linear layer named 'q_prj' \(did you mean 'q_proj'\?\)"):
        lora_target_modules(base, ["q_prj"])


def test_eight_bit_and_sixteen_bit_bases(tiny_llama):
    import bitsandbytes as bnb

    from qlora.model.load import load_base_model

    eight = load_base_model(recipe_for(tiny_llama, "quantization.bits=8"), torch.float32)
    assert isinstance(eight.model.layers[0].mlp.down_proj, bnb.nn.Linear8bitLt)
    sixteen = load_base_model(
        recipe_for(tiny_llama, "quantization.bits=none", "quantization.compute_dtype=bfloat16"), torch.bfloat16
    )
    assert type(sixteen.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert sixteen.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/nonexistent/model", "model.name_or_path: folder not found: /nonexistent/model"),
        ("./also/missing", "model.name_or_path: folder not found"),
    ],
)
def test_missing_model_folder(name, message):
    from qlora.config.recipe import ModelSpec
    from qlora.model.load import check_model_source

    with pytest.raises(QLoraError, match=message):
        check_model_source(ModelSpec(name_or_path=name))


def test_folder_without_config(tmp_path):
    from qlora.config.recipe import ModelSpec
    from qlora.model.load import check_model_source

    with pytest.raises(QLoraError, match="has no config.json"):
        check_model_source(ModelSpec(name_or_path=str(tmp_path)))


def test_unreachable_hub_name_is_a_clear_error():
    from qlora.config.recipe import ModelSpec
    from qlora.model.load import load_tokenizer

    with pytest.raises(QLoraError, match="'nobody/no-such-model' is not a local folder and the Hub cannot be reached"):
        load_tokenizer(ModelSpec(name_or_path="nobody/no-such-model"))  # this machine has no Hub access


@pytest.mark.parametrize(
    ("error", "message"),
    [
        ("RepositoryNotFoundError", "is not a local folder nor a model on the Hub"),
        ("GatedRepoError", "is gated on the Hub: accept its license there and log in"),
    ],
)
def test_hub_answers_become_clear_errors(monkeypatch, error, message):
    import huggingface_hub
    from huggingface_hub import errors

    from qlora.model.load import check_hub_model

    def model_info(self, name, **kwargs):
        cls = getattr(errors, error)
        exc = cls.__new__(cls)  # its __init__ wants a live HTTP response
        Exception.__init__(exc, "404 Client Error")
        raise exc

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    with pytest.raises(QLoraError, match=f"model.name_or_path: 'org/model' {message}"):
        check_hub_model("org/model", None)


def test_offline_hub_name_outside_the_cache_is_refused_without_a_request(monkeypatch):
    import huggingface_hub

    from qlora.model.load import check_hub_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("no request when offline"))
    with pytest.raises(QLoraError, match="not a local folder nor in the Hub cache, and HF_HUB_OFFLINE is set"):
        check_hub_model("org/model", None)
