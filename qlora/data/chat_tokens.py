"""Tokenize a rendered chat so that only the template's control tokens are control tokens.

A chat template writes its control tokens (`<|im_start|>`, `<|eot_id|>`, ...) as text, and the
tokenizer turns that text back into their ids. Left alone it does the same to a user's message that
contains the literal text `<|im_end|>`: the turn ends early and the loss mask shifts. Here the
message contents are located in the rendered text first; control-token text outside them is encoded
as the control id, and everything else (contents included) with `split_special_tokens=True`, i.e.
as plain text. The tokenizer splits at special tokens anyway, so a conversation whose contents hold
no control-token text gets exactly the ids it got before (that case takes the old single call).
"""

from __future__ import annotations

import re

from qlora.config.errors import QLoraError


def control_strings(tokenizer) -> list[str]:
    """The text of every special added token (what `split_special_tokens` would otherwise split)."""
    return [t.content for t in tokenizer.added_tokens_decoder.values() if t.special and t.content]


def content_spans(text: str, messages: list[dict], controls: list[str]) -> list[tuple[int, int]]:
    """Character spans of the messages' contents in the rendered text, found in order.

    A template that changes a content (e.g. trims it) is matched on the trimmed text; a content
    holding control-token text that cannot be found verbatim is an error, not a silent mis-tokenization.
    """
    spans, cursor = [], 0
    for message in messages:
        content = str(message.get("content") or "")
        for candidate in (content, content.strip()):
            index = text.find(candidate, cursor) if candidate else -1
            if index >= 0:
                spans.append((index, index + len(candidate)))
                cursor = index + len(candidate)
                break
        else:
            if any(c in content for c in controls):
                raise QLoraError(
                    "data.path: a chat message contains control-token text and this tokenizer's chat template "
                    f"changes the message when rendering it, so it cannot be kept as text: {content[:120]!r}"
                )
    return spans


def encode_chat(tokenizer, text: str, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """(token ids, character offsets) of a rendered conversation, message contents as plain text."""
    controls = control_strings(tokenizer)
    if not any(c in str(m.get("content") or "") for m in messages for c in controls):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return encoded["input_ids"], [tuple(o) for o in encoded["offset_mapping"]]
    inside = content_spans(text, messages, controls)
    pattern = re.compile("|".join(re.escape(c) for c in sorted(controls, key=len, reverse=True)))
    ids, offsets, start = [], [], 0
    for match in pattern.finditer(text):
        if any(a <= match.start() < b for a, b in inside):
            continue  # user text that looks like a control token
        add_text_piece(tokenizer, text, start, match.start(), ids, offsets)
        ids.append(tokenizer.convert_tokens_to_ids(match.group()))
        offsets.append((match.start(), match.end()))
        start = match.end()
    add_text_piece(tokenizer, text, start, len(text), ids, offsets)
    return ids, offsets


def add_text_piece(tokenizer, text: str, start: int, end: int, ids: list[int], offsets: list) -> None:
    """Append `text[start:end]` tokenized as plain text (no special tokens recognised)."""
    if start >= end:
        return
    encoded = tokenizer(
        text[start:end], add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True
    )
    ids.extend(encoded["input_ids"])
    offsets.extend((start + a, start + b) for a, b in encoded["offset_mapping"])
