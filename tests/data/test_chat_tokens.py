"""Control-token text inside user data is tokenized as text; the template's own tokens stay control tokens.

Templates in the style of SmolLM2 / Qwen (`<|im_start|>` ... `<|im_end|>`) and Llama 3
(`<|start_header_id|>` ... `<|eot_id|>`, content trimmed) are embedded below; the tokenizers are the
tests' tiny BPE with those control tokens added as special tokens.
"""

from __future__ import annotations

import pytest

from qlora.config.recipe import DataSpec
from qlora.data.prepare import IGNORE_INDEX, format_alpaca, text_ids, tokenize_chat, tokenize_example

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
STYLES = {
    "qwen": (QWEN_TEMPLATE, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (
        LLAMA3_TEMPLATE,
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|eot_id|>",
    ),
}


@pytest.fixture(scope="module", params=sorted(STYLES))
def styled(request, tiny_llama):
    from transformers import AutoTokenizer

    template, controls, end = STYLES[request.param]
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)  # a fresh copy: the additions stay in this test
    tokenizer.add_tokens(controls, special_tokens=True)
    tokenizer.chat_template = template
    return request.param, tokenizer, end


def ids_of(tokenizer, token: str) -> int:
    return tokenizer.convert_tokens_to_ids(token)


def expected_ids(style, tokenizer, messages):
    """The conversation spelled out by hand: control ids for the template's tokens, text ids for the rest."""
    t = lambda s: text_ids(tokenizer, s)
    c = lambda s: [ids_of(tokenizer, s)]
    ids = []
    if style == "qwen":
        for m in messages:
            ids += c("<|im_start|>") + t(f"{m['role']}\n{m['content']}") + c("<|im_end|>") + t("\n")
    else:
        ids += c("<|begin_of_text|>")
        for m in messages:
            ids += (
                c("<|start_header_id|>")
                + t(m["role"])
                + c("<|end_header_id|>")
                + t("\n\n" + m["content"].strip())
                + c("<|eot_id|>")
            )
    return ids


def test_control_token_text_in_messages_is_text(styled):
    style, tokenizer, end = styled
    user = f"what does {end} mean? and <|im_start|>, <|eot_id|>, </s>"
    answer = f"it ends a turn: {end} (as text here)"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    item, _ = tokenize_chat(tokenizer, messages, max_len=1000)

    assert item["input_ids"] == expected_ids(style, tokenizer, messages)
    assert item["input_ids"].count(ids_of(tokenizer, end)) == 2  # one per turn: the user's text did not end one
    assert tokenizer.decode(item["input_ids"]) == tokenizer.apply_chat_template(messages, tokenize=False)
    learned = [t for t in item["labels"] if t != IGNORE_INDEX]
    tail = text_ids(tokenizer, "\n") if style == "qwen" else []
    assert (
        learned == text_ids(tokenizer, answer) + [ids_of(tokenizer, end)] + tail
    )  # the mask covers the answer's text


def test_plain_conversations_keep_the_ids_they_had(styled):
    _, tokenizer, _ = styled
    messages = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "one two"}]
    item, _ = tokenize_chat(tokenizer, messages, max_len=1000)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert item["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]  # the old single call


def test_alpaca_fields_with_eos_text_stay_text(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    spec = DataSpec(path="unused")
    row = {"instruction": "repeat </s> twice", "input": "<s> and </s>", "output": "a </s> b"}
    item, _ = tokenize_example(tokenizer, format_alpaca(row, spec), max_len=1000)
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    assert item["input_ids"].count(eos) == 1 and item["input_ids"][-1] == eos  # only the one qlora appends
    assert item["input_ids"].count(bos) == 1 and item["input_ids"][0] == bos
    assert [t for t in item["labels"] if t != IGNORE_INDEX] == text_ids(tokenizer, "a </s> b") + [eos]
    assert tokenizer.decode(text_ids(tokenizer, "a </s> b")) == "a </s> b"
