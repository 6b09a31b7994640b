"""Generation stops at every end-of-turn token: tokenizers with the real Llama-3.1 and Qwen2.5 templates."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from chat_templates import LLAMA_3_1, QWEN_2_5

from qlora.data.stop_tokens import stop_token_ids, template_end_of_turn

LLAMA_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = ["what is the capital of france", "paris is the capital", "one two three four five", "hello world"]


def tokenizer_with(specials: list[str], template: str | None, **tokens):
    """A tiny byte-level BPE tokenizer with the given special tokens (each one id) and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
    fast.chat_template = template
    return fast


@pytest.fixture(scope="module")
def llama():
    """Llama-3.1 as a base model's tokenizer has it: EOS is <|end_of_text|>, the template ends turns in <|eot_id|>."""
    return tokenizer_with(
        LLAMA_SPECIALS,
        LLAMA_3_1,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
    )


@pytest.fixture(scope="module")
def qwen():
    """Qwen2.5: EOS (and pad) <|endoftext|>, the template ends turns with <|im_end|>."""
    return tokenizer_with(QWEN_SPECIALS, QWEN_2_5, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_llama_3_1_stops_at_eot_id_as_well_as_eos(llama):
    assert template_end_of_turn(llama) == "<|eot_id|>"
    assert stop_token_ids(llama) == [
        llama.convert_tokens_to_ids("<|end_of_text|>"),
        llama.convert_tokens_to_ids("<|eot_id|>"),
    ]


def test_qwen_2_5_stops_at_im_end_and_generation_config_ids_once_each(qwen):
    endoftext, im_end = qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    assert template_end_of_turn(qwen) == "<|im_end|>"
    assert stop_token_ids(qwen) == [endoftext, im_end]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[im_end, endoftext]))  # Instruct's
    assert stop_token_ids(qwen, model) == [endoftext, im_end]


def test_generation_config_ids_are_added_and_a_template_without_special_end_adds_nothing(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)  # its template ends a turn with eos_token itself
    assert template_end_of_turn(tokenizer) == "</s>" and stop_token_ids(tokenizer) == [tokenizer.eos_token_id]
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=7))
    assert stop_token_ids(tokenizer, model) == [tokenizer.eos_token_id, 7]
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert template_end_of_turn(tokenizer) is None and stop_token_ids(tokenizer) == [tokenizer.eos_token_id]


def bigram_model(vocab_size: int, follows: dict[int, int]):
    """A Llama whose greedy next token depends only on the current one (`follows`): embeddings are one-hot,
    every layer adds nothing to the residual, and the head maps token t to follows[t]."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden = -(-vocab_size // 8) * 8  # four heads of an even size
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab_size, hidden))
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for token, nxt in follows.items():
            model.lm_head.weight[nxt, token] = 1.0
    return model


def test_chat_generation_with_the_llama_3_1_template_stops_at_eot_id(llama):
    from qlora.training.metrics import generate_answers

    prompt = llama.apply_chat_template(
        [{"role": "user", "content": "what is the capital of france"}], tokenize=False, add_generation_prompt=True
    )
    last = llama(prompt, add_special_tokens=False)["input_ids"][-1]
    eot = llama.convert_tokens_to_ids("<|eot_id|>")
    answer = llama("paris is", add_special_tokens=False)["input_ids"]
    (more,) = llama(" capital", add_special_tokens=False)["input_ids"]
    chain = [last, *answer, eot, more]
    assert len(set(chain)) == len(chain)
    # the answer "paris is", then <|eot_id|>; a model that is not stopped there goes on with " capital capital ..."
    model = bigram_model(len(llama), {**dict(zip(chain, chain[1:])), more: more})
    assert generate_answers(model, llama, [prompt], max_new_tokens=8, add_bos=False) == ["paris is"]
    # what stopping at EOS alone gives: the same model, eot_id not a stop token
    ignored = llama.decode([*answer, eot, more, more], skip_special_tokens=True)
    assert ignored == "paris is capital capital"
