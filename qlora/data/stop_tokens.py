"""The token ids that end a generated answer: every end-of-turn token, not only `tokenizer.eos_token`.

Chat templates often end an assistant turn with a token other than the tokenizer's EOS (Llama 3.1:
`<|eot_id|>` while a base tokenizer's EOS is `<|end_of_text|>`; Qwen2.5: `<|im_end|>` while EOS is
`<|endoftext|>`), so generation that stops only at EOS runs past the answer. The ids are the union of
the tokenizer's EOS, the model's `generation_config.eos_token_id` and the special token the chat
template writes right after an assistant message (found by rendering one with a probe text; no
library exposes "the template's end-of-turn token").
"""

from __future__ import annotations

PROBE = "qlora-end-of-turn-probe"


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple, set)) else [int(ids)]


def special_token_strings(tokenizer) -> list[str]:
    """The tokenizer's special tokens as text, longest first (so `<|im_end|>` wins over a prefix of it)."""
    names = {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    names.update(tokenizer.all_special_tokens)
    return sorted(names, key=len, reverse=True)


def template_end_of_turn(tokenizer) -> str | None:
    """The special token the chat template writes right after an assistant message (None without a template
    or when whatever follows the message is not a special token)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this conversation says nothing about its end of turn
        return None
    if PROBE not in text:
        return None
    after = text.split(PROBE, 1)[1].lstrip()
    return next((token for token in special_token_strings(tokenizer) if after.startswith(token)), None)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS ∪ generation_config.eos_token_id ∪ the template's end-of-turn token, in that order, no repeats."""
    ids = _as_list(tokenizer.eos_token_id)
    config = getattr(model, "generation_config", None) if model is not None else None
    ids += _as_list(getattr(config, "eos_token_id", None))
    end_of_turn = template_end_of_turn(tokenizer)
    if end_of_turn is not None:
        ids += _as_list(tokenizer.convert_tokens_to_ids(end_of_turn))
    return list(dict.fromkeys(ids))
