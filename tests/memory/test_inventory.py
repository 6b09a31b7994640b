"""The inventory and weight bytes against what bitsandbytes and transformers really store."""

from __future__ import annotations

import json
import re

import pytest
import torch

from qlora.memory.estimate import COMPONENTS, estimate, weight_bytes
from qlora.memory.inventory import load_inventory
from qlora.memory.settings import Settings
from qlora.memory.storage import adamw_state_bytes, nf4_weight_bytes

LLAMA_2_7B_QLORA_WEIGHTS = 3_865_836_416  # bnb 0.50.2, NF4 + double quant, bf16 embeddings/head/norms


def load_real(config_path, folder, bits, double_quant=True):
    """Random weights from the config, loaded in bf16 as the trainer loads them (4-, 8- or 16-bit)."""
    from transformers import AutoModelForCausalLM

    from qlora.config.recipe import ModelSpec, QuantizationSpec, Recipe
    from qlora.memory.inventory import load_config
    from qlora.model.load import load_base_model

    AutoModelForCausalLM.from_config(load_config(config_path)).save_pretrained(folder)
    recipe = Recipe(
        model=ModelSpec(name_or_path=str(folder)),
        quantization=QuantizationSpec(bits=bits, double_quant=double_quant, compute_dtype="bfloat16"),
    )
    return load_base_model(recipe, torch.bfloat16)


def stored_bytes(model, kinds=("frozen", "trainable")) -> int:
    """Bytes of every distinct storage the loaded model holds (tied weights once)."""
    from qlora.training.measure import model_tensors

    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t, kind in model_tensors(model)
        if kind in kinds
    }
    return sum(storages.values())


@pytest.mark.parametrize(
    "bits,double_quant", [(4, True), (4, False), (8, True), (None, True)], ids=["nf4-dq", "nf4", "int8", "bf16"]
)
@pytest.mark.parametrize("config", ["llama_config", "qwen2_config"])
def test_weight_bytes_equal_the_storage_of_a_really_loaded_model(config, bits, double_quant, request, tmp_path):
    config_path = request.getfixturevalue(config)
    model = load_real(config_path, tmp_path, bits, double_quant)
    inv = load_inventory(str(config_path), "bfloat16")
    assert sum(weight_bytes(inv, bits, double_quant).values()) == stored_bytes(model)
    assert sum(b.numel * b.itemsize for b in inv.buffers) == stored_bytes(model, kinds=("buffer",)) > 0


def test_inventory_counts_tied_embeddings_once_and_finds_biases(llama_config, qwen2_config):
    llama, qwen = load_inventory(str(llama_config)), load_inventory(str(qwen2_config))
    assert not llama.tied_embeddings and qwen.tied_embeddings
    assert [lin.role for lin in llama.linears].count("lm_head") == 1
    assert [lin.role for lin in qwen.linears].count("lm_head") == 0  # the tied head is the embedding
    assert llama.parameter_count() - qwen.parameter_count() == 512 * 64 - qwen.counts_by_role()["bias"]
    assert qwen.counts_by_role()["bias"] == 2 * (64 + 32 + 32)  # q, k, v biases in 2 layers (GQA: k, v are 32 wide)
    assert {lin.leaf for lin in llama.lora_targets("all-linear")} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_a_classifier_has_a_16bit_score_head_and_no_lm_head(llama_config, qwen2_config, tmp_path):
    """As `qlora train` loads it: the new head stays 16-bit (transformers skips it), LoRA never wraps it,
    and the weights are the bytes a real 4-bit load of the classifier stores."""
    from transformers import AutoModelForSequenceClassification

    from qlora.config.recipe import ModelSpec, QuantizationSpec, Recipe
    from qlora.memory.inventory import load_config
    from qlora.model.load import load_base_model

    for config_path in (llama_config, qwen2_config):
        causal, classifier = (
            load_inventory(str(config_path)),
            load_inventory(str(config_path), "bfloat16", "classification", 5),
        )
        head = classifier.classifier_head()
        assert [(lin.name, lin.out_features, lin.quantized, lin.itemsize) for lin in head] == [("score", 5, False, 2)]
        assert classifier.counts_by_role()["lm_head"] == 0 and classifier.task == "classification"
        assert classifier.parameter_count() == causal.parameter_count() - causal.counts_by_role()["lm_head"] + 5 * 64
        assert "score" not in {lin.leaf for lin in classifier.lora_targets("all-linear")}
    config = load_config(llama_config)
    config.num_labels = 5
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path)
    recipe = Recipe(
        task="classification",
        model=ModelSpec(name_or_path=str(tmp_path)),
        quantization=QuantizationSpec(bits=4, compute_dtype="bfloat16"),
    )
    real = load_base_model(recipe, torch.bfloat16, [str(i) for i in range(5)])
    llama = load_inventory(str(llama_config), "bfloat16", "classification", 5)
    assert sum(weight_bytes(llama, 4).values()) == stored_bytes(real)


@pytest.mark.parametrize("numel", [64 * 300 + 17, 4096, 1])
@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_layout_matches_bitsandbytes_quantize_4bit(numel, double_quant):
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(
        torch.randn(numel, dtype=torch.bfloat16), blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    tensors = [packed, state.absmax, state.code] + (
        [state.offset, state.state2.absmax, state.state2.code] if double_quant else []
    )
    assert sum(nf4_weight_bytes(numel, double_quant).values()) == sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("numel", [100, 5000])
def test_8bit_adamw_state_bytes_match_bitsandbytes(numel):
    import bitsandbytes as bnb

    param = torch.nn.Parameter(torch.randn(numel))
    optimizer = bnb.optim.AdamW8bit([param])
    param.grad = torch.randn(numel)
    optimizer.step()
    moments = [v for k, v in optimizer.state[param].items() if k in ("state1", "state2", "absmax1", "absmax2")]
    assert adamw_state_bytes(numel, 1) == sum(t.untyped_storage().nbytes() for t in moments)


def test_llama_2_7b_qlora_weights_are_byte_exact():
    assert estimate("llama-2-7b", "qlora", Settings()).bytes["weights"] == LLAMA_2_7B_QLORA_WEIGHTS


@pytest.mark.parametrize("name", ["llama-3.1-8b", "qwen2.5-14b", "qwen2.5-0.5b", "smollm2-135m"])
def test_catalog_models_order_full_lora_qlora_and_add_up(name):
    """GQA with a 128k vocabulary, biases, tied embeddings (Qwen2 and Llama)."""
    results = [estimate(name, method, Settings()) for method in ("full", "lora", "qlora")]
    assert results[0].total > results[1].total > results[2].total
    for result in results:
        assert set(result.bytes) == set(COMPONENTS)
        assert all(isinstance(v, int) and v >= 0 for v in result.bytes.values())
        assert sum(result.bytes.values()) == result.total
    full, lora, qlora = results
    assert full.bytes["weights"] == lora.bytes["weights"] == 2 * full.parameters  # bf16, every parameter once
    assert lora.bytes["adapters"] == qlora.bytes["adapters"] > 0 == full.bytes["adapters"]


@pytest.mark.parametrize(
    "config,message",
    [
        (
            {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 512},
            "gpt2: not a Llama-style decoder the profiler models (Llama, Mistral, Qwen2, Gemma, Phi-3, …): its config "
            "has no intermediate_size",
        ),
    ],
    ids=["gpt2"],
)
def test_architectures_outside_the_model_of_memory_are_one_line_errors(config, message, tmp_path):
    from qlora.config.errors import QLoraError

    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(QLoraError, match=f"^{re.escape(message)}"):
        load_inventory(str(tmp_path / "config.json"))


MIXTRAL = {
    "model_type": "mixtral",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
}


@pytest.mark.parametrize("bits,double_quant", [(4, True), (4, False), (None, True)], ids=["nf4-dq", "nf4", "bf16"])
def test_moe_weight_bytes_equal_a_loaded_model_with_4bit_experts(bits, double_quant, tmp_path):
    """Fused expert stacks (experts, out, in): NF4 with their statistics in a 4-bit load (qlora.ops.experts)."""
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(MIXTRAL), encoding="utf-8")
    model = load_real(config_path, tmp_path / "model", bits, double_quant)
    inv = load_inventory(str(config_path), "bfloat16")
    assert [(s.leaf, s.experts, s.in_features, s.out_features) for s in inv.experts[:2]] == [
        ("gate_up_proj", 8, 64, 256),
        ("down_proj", 8, 128, 64),
    ]
    assert inv.dims.experts == 8 and inv.dims.top_k == 2 and inv.dims.moe_layers == 2
    assert sum(weight_bytes(inv, bits, double_quant).values()) == stored_bytes(model)
    assert inv.counts_by_role()["experts"] == 2 * 8 * 3 * 64 * 128


def test_expert_lora_is_counted_in_peft_layout_and_routers_never(tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(MIXTRAL), encoding="utf-8")
    inv = load_inventory(str(config_path), "bfloat16")
    settings = Settings(seq_len=64, rank=4, targets="all-linear")
    attention = estimate(inv, "qlora", Settings(seq_len=64, rank=4, targets="attention"))
    every = estimate(inv, "qlora", settings)
    expert_lora = 2 * 8 * 4 * ((64 + 256) + (128 + 64))  # per layer: A (E·r, in) and B (out, r·E), both stacks
    assert every.trainable - attention.trainable == expert_lora
    assert {s.leaf for s in inv.expert_targets("mlp")} == {"gate_up_proj", "down_proj"}
    assert inv.expert_targets("attention") == ()


def test_a_head_the_chunked_loss_cannot_reproduce_is_profiled_with_the_standard_loss_the_trainer_falls_back_to(
    tmp_path,
):
    """A head transform qlora.ops.loss does not reproduce is trained with the standard loss: so is it profiled."""
    llama = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 8192,
    }
    (tmp_path / "capped").mkdir()
    (tmp_path / "plain").mkdir()
    capped, plain = tmp_path / "capped" / "config.json", tmp_path / "plain" / "config.json"
    capped.write_text(json.dumps({**llama, "output_multiplier_scale": 2.0}))
    plain.write_text(json.dumps(llama))
    inv = load_inventory(str(capped))
    assert inv.chunked_loss_unsupported == "its config sets output_multiplier_scale=2.0"
    chunked, standard = (estimate(str(capped), "qlora", Settings(loss=loss)) for loss in ("chunked", "standard"))
    assert chunked.total == standard.total and chunked.peak_moment == "start of backward (loss gradient)"
    assert load_inventory(str(plain)).chunked_loss_unsupported is None
    assert (
        estimate(str(plain), "qlora", Settings()).total
        < estimate(str(plain), "qlora", Settings(loss="standard")).total
    )
