"""Mixture-of-experts models as a user trains them: tiny random Qwen3-MoE, Mixtral, gpt-oss and GLM-4.5-MoE
(transformers' own config classes, the demo's tokenizer) trained with the demo recipe's keys (LoRA dropout 0.05):
experts in NF4, expert LoRA in the saved adapter, the adapter loads in plain peft, merge, generate, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes" / "demo.yaml"
TOKENIZER = REPO / "recipes" / "demo-assets" / "base-model"
COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
FAMILIES = {  # experts dominate the weights: 32 experts per layer
    "qwen3_moe": dict(intermediate_size=128, moe_intermediate_size=64, num_experts=32, num_experts_per_tok=2),
    "mixtral": dict(intermediate_size=64, num_local_experts=32, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=64, num_local_experts=32, num_experts_per_tok=2, sliding_window=32),
    "glm4_moe": dict(  # a dense first layer and a shared expert, as GLM-4.5 / DeepSeek-V3
        intermediate_size=128,
        moe_intermediate_size=64,
        n_routed_experts=32,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    ),
}
EXTRA = {"gpt_oss": ["--set", "model.attn_implementation=eager"]}  # transformers refuses sdpa for gpt-oss


def make_tiny_moe(family: str, folder: Path, **sizes) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **{**COMMON, **FAMILIES[family], **sizes})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train(model: Path, out: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "qlora.train", str(DEMO), "--set", f"model.name_or_path={model}"]
    command += ["--set", f"output_dir={out}", "--set", "training.max_steps=2", "--set", "eval.max_examples=2"]
    command += ["--set", "data.eval_size=8", *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def trained(request, tmp_path_factory):
    family = request.param
    folder = tmp_path_factory.mktemp(family)
    model = make_tiny_moe(family, folder / "model")
    result = train(model, folder / "run", *EXTRA.get(family, []))
    assert result.returncode == 0, result.stderr[-3000:]
    return family, model, folder / "run", result


@pytest.mark.slow
def test_trains_without_traceback_and_the_adapter_holds_expert_lora(trained):
    from safetensors.torch import load_file

    family, _, run, result = trained
    assert "Traceback" not in result.stderr
    assert "expert stacks adapted" in result.stderr
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    expert = [k for k in weights if ".experts." in k]
    assert len(expert) == 2 * 2 * (1 if family == "glm4_moe" else 2)  # A and B, gate_up and down, per MoE layer
    assert all(weights[k].abs().sum() > 0 for k in expert)
    assert not any(".gate." in k or ".router." in k for k in weights)  # routers are never adapted
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.0 and config["target_parameters"]
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(trained[1])  # 4-bit expert codes count as their unpacked values
    assert json.loads((run / "metrics.json").read_text())["total_params"] == plain.num_parameters() + sum(
        len(weights[k].flatten()) for k in weights
    )


@pytest.mark.slow
def test_the_adapter_loads_in_plain_peft_on_the_16bit_base_and_merges(trained, tmp_path):
    family, model, run, _ = trained
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager")
    peft_model = PeftModel.from_pretrained(base, run / "adapter")  # no qlora code involved
    assert any("ParamWrapper" in type(m).__name__ for m in peft_model.modules())
    if family not in ("qwen3_moe", "glm4_moe"):
        return  # merging: one family with shared experts and dense first layers, one without
    result = subprocess.run(
        [sys.executable, "-m", "qlora.merge", str(run), "--to", str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "merge check" in result.stdout


@pytest.mark.slow
def test_generate_and_resume(trained, tmp_path):
    family, model, run, first = trained
    if family not in ("qwen3_moe", "gpt_oss"):
        return
    result = subprocess.run(
        [sys.executable, "-m", "qlora.generate", str(run), "--prompt", "Give the plural.", "--max-new-tokens", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if family != "qwen3_moe":
        return  # one family is enough for resuming
    out = tmp_path / "resumed"
    extra = ["--set", "training.save_steps=1"]
    assert train(model, out, *extra).returncode == 0
    uninterrupted = json.loads((out / "metrics.json").read_text())["eval_loss_after"]
    for stale in ("adapter", "metrics.json", "checkpoints/checkpoint-2"):
        subprocess.run(["rm", "-rf", str(out / stale)], check=True)
    assert train(model, out, *extra, "--resume").returncode == 0
    assert json.loads((out / "metrics.json").read_text())["eval_loss_after"] == pytest.approx(uninterrupted, rel=1e-5)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_qlora_weights_are_well_under_half_of_16bit_lora(family, tmp_path):
    """Measured bytes of the loaded base (parameters, buffers, quant states) in bf16: 4-bit experts vs 16-bit."""
    from qlora.config.recipe import recipe_from_mapping
    from qlora.model.load import load_base_model
    from qlora.training.measure import model_tensors

    wide = {"moe_intermediate_size" if family == "qwen3_moe" else "intermediate_size": 256}
    model = make_tiny_moe(family, tmp_path / family, **wide)  # experts 90 % of the weights, as in Qwen3-30B-A3B

    def weight_bytes(bits):
        data = {
            "model": {"name_or_path": str(model), "attn_implementation": "eager"},
            "data": {"path": "d.jsonl"},
            "output_dir": "unused",
        }
        recipe = recipe_from_mapping({**data, "quantization": {"bits": bits}}, [])
        base = load_base_model(recipe, torch.bfloat16, device="cpu")
        return sum(t.untyped_storage().nbytes() for t, _ in model_tensors(base))

    qlora, lora = weight_bytes(4), weight_bytes(None)
    assert qlora < 0.35 * lora, (qlora, lora)


def test_a_checkpoint_with_mxfp4_experts_is_a_one_line_error(tmp_path):
    """gpt-oss's published checkpoint keeps transformers' MXFP4 quantizer, not qlora's NF4: refused before loading."""
    from qlora.config.errors import QLoraError
    from qlora.config.recipe import recipe_from_mapping
    from qlora.model.load import load_base_model

    model = make_tiny_moe("qwen3_moe", tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (model / "config.json").write_text(json.dumps(config))
    recipe = recipe_from_mapping({"model": {"name_or_path": str(model)}, "data": {"path": "d"}, "output_dir": "o"}, [])
    with pytest.raises(QLoraError, match="ships mxfp4-quantized weights; use its 16-bit checkpoint"):
        load_base_model(recipe, torch.float32, device="cpu")
