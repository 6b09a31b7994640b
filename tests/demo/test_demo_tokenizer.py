"""The committed demo tokenizer: rebuilt from the corpus it is the same; a word is one token sequence everywhere."""

from __future__ import annotations

import json

import pytest

from qlora.data.prepare import ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT
from qlora.demo import ASSETS, corpus, tokenizer
from qlora.demo.datasets import INSTRUCTIONS
from qlora.demo.pretrain import VOCAB_SIZE

BASE = ASSETS / "base-model"


@pytest.fixture(scope="module")
def committed():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(BASE)


def test_committed_tokenizer_is_what_pretrain_builds(committed):
    fresh = tokenizer.train_tokenizer(corpus.documents() + list(INSTRUCTIONS), VOCAB_SIZE)
    parts = ("model", "normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens")
    built, saved = json.loads(fresh.backend_tokenizer.to_str()), json.loads(committed.backend_tokenizer.to_str())
    assert {p: built[p] for p in parts} == {p: saved[p] for p in parts}
    assert committed.chat_template == tokenizer.CHAT_TEMPLATE


def test_prompt_texts_are_the_trainers_templates():
    filled = ALPACA_PROMPT.format(instruction="Give the plural of the word.", input="mouse")
    assert filled.replace("Give the plural of the word.\n", "").replace("mouse\n", "") == tokenizer.PROMPT_TEXTS[0]
    assert ALPACA_PROMPT_NO_INPUT.format(instruction="x").replace("x\n", "") == tokenizer.PROMPT_TEXTS[1]


def test_a_word_has_the_same_tokens_in_a_prompt_and_in_a_sentence(committed):
    word = committed("mice", add_special_tokens=False)["input_ids"]
    in_prompt = committed("### Input:\nmice\n\n### Response:\n", add_special_tokens=False)["input_ids"]
    in_sentence = committed("one mouse, two mice.", add_special_tokens=False)["input_ids"]
    assert len(word) == 1 and word[0] in in_prompt and word[0] in in_sentence


def test_decoding_is_lossless_and_special_tokens_are_distinct(committed):
    text = "### User:\n  indented\n\nlast line "
    assert committed.decode(committed(text, add_special_tokens=False)["input_ids"]) == text
    assert (
        committed.decode(committed("<s>one mouse", add_special_tokens=False)["input_ids"]) == "<s> one mouse"
    )  # as Llama decodes
    assert committed("a")["input_ids"][0] == committed.bos_token_id
    assert len({committed.bos_token_id, committed.eos_token_id, committed.pad_token_id, committed.unk_token_id}) == 4


def test_chat_template_renders_role_blocks_and_ends_assistant_turns(committed):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert (
        committed.apply_chat_template(messages, tokenize=False) == "<s>### User:\nhi\n\n### Assistant:\nhello</s>\n\n"
    )
