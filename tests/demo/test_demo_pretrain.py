"""The committed demo base model: loads with its tokenizer, knows the language's facts, not the task format."""

from __future__ import annotations

import pytest

from qlora.demo import ASSETS, corpus, pretrain

BASE = ASSETS / "base-model"


@pytest.fixture(scope="module")
def base():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(BASE, dtype="float32"), AutoTokenizer.from_pretrained(BASE)


def test_committed_base_is_a_small_llama_matching_its_tokenizer(base):
    model, tok = base
    config = model.config
    assert config.model_type == "llama" and config.vocab_size == len(tok)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert 4e6 < sum(p.numel() for p in model.parameters()) < 6e6
    assert (BASE / "model.safetensors").stat().st_size < 12 * 2**20  # float16: small enough to commit


def test_committed_base_knows_the_plurals(base):
    assert pretrain.plural_probe(*base) > 0.9  # 97 % when pretraining finished


def test_committed_base_cannot_answer_the_instruction_format(base):
    from qlora.config.recipe import DataSpec
    from qlora.data.prepare import format_alpaca
    from qlora.demo.datasets import instruction_rows
    from qlora.training.metrics import generate_answers, normalise_answer

    rows = instruction_rows()[:24]
    prompts = [format_alpaca(row, DataSpec()).prompt for row in rows]
    answers = generate_answers(*base, prompts, max_new_tokens=8)
    assert sum(normalise_answer(a) == row["output"] for a, row in zip(answers, rows)) <= 1


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    rates = [pretrain.lr_at(step, 100, 1.0, warmup=10) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[10] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))


def test_token_blocks_put_each_document_between_bos_and_eos(base):
    _, tok = base
    blocks = pretrain.token_blocks(tok, corpus.documents(rounds=1)[:40], seq_len=32)
    stream = blocks.flatten().tolist()
    assert blocks.shape[1] == 32 and stream[0] == tok.bos_token_id
    assert stream.count(tok.bos_token_id) >= stream.count(tok.eos_token_id) >= 30
