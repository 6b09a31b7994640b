"""`data.format: preference`: prompt / chosen / rejected rows -> token ids for TRL's preference trainers.

A row's sides are plain text, or (TRL's conversational form) a prompt that is a list of messages and
chosen / rejected that are an assistant message, a list of messages, or plain text for the assistant
turn: those are rendered with the tokenizer's chat template. qlora tokenizes the pairs itself, as it
does every format (user text stays text, BOS and EOS as for alpaca), so that every pair that is
dropped or cut is counted: identical sides, an empty side, a prompt over `dpo.max_prompt_len` or one
that leaves no response token within `data.max_seq_len`. TRL's trainer receives `prompt_ids` /
`chosen_ids` / `rejected_ids`, the columns its own tokenization would write.
"""

from __future__ import annotations

from typing import Any

from qlora.config.errors import QLoraError
from qlora.config.recipe import DataSpec, Recipe
from qlora.data.chat_tokens import encode_chat
from qlora.data.prepare import (
    PREFERENCE_DROPS,
    Example,
    PreparedData,
    bos_ids,
    column,
    load_source,
    render_chat,
    split_raw,
    text_ids,
    to_dataset,
)

ROLES = ("prompt", "chosen", "rejected")
DROP_REASONS = tuple(PREFERENCE_DROPS)  # why a pair is left out, counted as `<split>_<reason>`


def _messages(value: Any, role: str, name: str) -> list[dict]:
    """A side as a list of {role, content} messages (plain text on a completion side is the assistant's)."""
    if isinstance(value, str) and role != "prompt":
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in value)
    ):
        raise QLoraError(
            f"data.path: column '{name}' ({role}) must hold text or lists of {{role, content}} messages, "
            f"got {str(value)[:120]}"
        )
    return value


def _content(messages: list[dict]) -> str:
    return "".join(str(m.get("content") or "") for m in messages)


def pair_texts(row: dict, spec: DataSpec, tokenizer) -> tuple[str, str, str, bool]:
    """(prompt, chosen, rejected) text of one row and whether the chat template rendered them."""
    names = {role: column(spec, role) for role in ROLES}
    prompt = row[names["prompt"]]
    if isinstance(prompt, str):
        sides = [row[names[r]] for r in ("chosen", "rejected")]
        if all(isinstance(s, str) for s in sides):
            return prompt, sides[0], sides[1], False
    if not tokenizer.chat_template:
        raise QLoraError(
            "data.format: preference rows with messages need a chat template, and this tokenizer has none"
        )
    # a text prompt beside message sides is the user's turn (HuggingFaceH4/ultrafeedback_binarized's form)
    prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    prompt_messages = _messages(prompt_messages, "prompt", names["prompt"])
    rendered_prompt = render_chat(tokenizer, prompt_messages, generation_prompt=True)
    completions = []
    for role in ("chosen", "rejected"):
        side = _messages(row[names[role]], role, names[role])
        if side[: len(prompt_messages)] == prompt_messages:  # a whole conversation: the reply is what follows
            side = side[len(prompt_messages) :]
        full = render_chat(tokenizer, prompt_messages + side)
        if not full.startswith(rendered_prompt):
            raise QLoraError(
                "data.format: preference: this tokenizer's chat template renders the prompt differently once a "
                "reply follows, so the reply cannot be located; give the sides as plain text"
            )
        completions.append((full[len(rendered_prompt) :], _content(side)))
    return rendered_prompt, completions[0][0], completions[1][0], True


def raw_sides(row: dict, spec: DataSpec) -> tuple[str, str]:
    """The chosen and rejected replies as the user wrote them (compared for identical / empty sides): a side
    that repeats the prompt's turns (a whole conversation) counts from its first turn after them."""
    prompt = row[column(spec, "prompt")]
    prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    values = []
    for role in ("chosen", "rejected"):
        value = row[column(spec, role)]
        if not isinstance(value, str):
            side = _messages(value, role, column(spec, role))
            value = _content(side[len(prompt) :] if side[: len(prompt)] == prompt else side)
        values.append(value)
    return values[0], values[1]


def tokenize_pair(
    tokenizer, texts: tuple[str, str, str, bool], max_len: int, max_prompt_len: int | None
) -> tuple[dict | None, str | None, bool]:
    """(item, why it was dropped, was a side cut): prompt ids, and each side's ids cut to fit `max_len` after it."""
    prompt, chosen, rejected, chat = texts
    if chat:  # the template writes BOS and each turn's end; the sides are what follows the rendered prompt
        sides = []
        for side in (chosen, rejected):
            ids, offsets = encode_chat(tokenizer, prompt + side, [])
            cut = next((i for i, o in enumerate(offsets) if o[0] >= len(prompt)), len(ids))
            sides.append((ids[:cut], ids[cut:]))
        prompt_ids, chosen_ids, rejected_ids = sides[0][0], sides[0][1], sides[1][1]
    else:
        prompt_ids = bos_ids(tokenizer) + text_ids(tokenizer, prompt)
        chosen_ids = text_ids(tokenizer, chosen) + [tokenizer.eos_token_id]
        rejected_ids = text_ids(tokenizer, rejected) + [tokenizer.eos_token_id]
    if (max_prompt_len is not None and len(prompt_ids) > max_prompt_len) or len(prompt_ids) >= max_len:
        return None, "long_prompt", False
    room = max_len - len(prompt_ids)
    cut = len(chosen_ids) > room or len(rejected_ids) > room
    item = {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids[:room], "rejected_ids": rejected_ids[:room]}
    return item, None, cut


def tokenize_preference_split(raw, spec: DataSpec, tokenizer, max_prompt_len: int | None, stats: dict, prefix: str):
    """Every usable pair of a raw split as token ids; what was dropped or cut is counted into `stats`."""
    rows, truncated = [], 0
    dropped = dict.fromkeys(DROP_REASONS, 0)
    chat = False
    for row in raw:
        chosen, rejected = raw_sides(row, spec)
        if not chosen.strip() or not rejected.strip():
            dropped["empty"] += 1
            continue
        if chosen.strip() == rejected.strip():
            dropped["identical"] += 1
            continue
        texts = pair_texts(row, spec, tokenizer)
        chat = chat or texts[3]
        item, reason, cut = tokenize_pair(tokenizer, texts, spec.max_seq_len, max_prompt_len)
        if item is None:
            dropped[reason] += 1
            continue
        truncated += cut
        rows.append(item)
    stats.update({f"{prefix}_examples": len(rows), f"{prefix}_truncated": truncated})
    stats.update({f"{prefix}_{reason}": count for reason, count in dropped.items()})
    if chat:
        stats["chat_template"] = True
    if not rows:
        counts = ", ".join(f"{v} {k}" for k, v in dropped.items())
        raise QLoraError(
            f"data.path: none of the {len(raw)} {prefix} pairs is usable ({counts}; a prompt must leave a "
            f"response token within data.max_seq_len {spec.max_seq_len})"
        )
    return rows


def preference_examples(raw, spec: DataSpec, tokenizer):
    """(prompt, chosen answer) per held-out pair, for exact match of greedy answers."""
    examples = []
    for row in raw:
        chosen, rejected = raw_sides(row, spec)
        if chosen.strip() and rejected.strip() and chosen.strip() != rejected.strip():
            examples.append(Example(prompt=pair_texts(row, spec, tokenizer)[0], response=chosen))
    return examples


def prepare_preference_data(recipe: Recipe, tokenizer) -> PreparedData:
    """`qlora.data.prepare.prepare_data` for preference pairs: the same sources and split, pairs as token ids."""
    spec = recipe.data
    train_raw, eval_raw = split_raw(load_source(spec), spec, recipe.training.seed)
    stats: dict[str, Any] = {}
    max_prompt = recipe.dpo.max_prompt_len
    train = to_dataset(
        tokenize_preference_split(train_raw, spec, tokenizer, max_prompt, stats, "train"), spec, stats, "train"
    )
    evaluation = None
    if eval_raw is not None:
        items = tokenize_preference_split(eval_raw, spec, tokenizer, max_prompt, stats, "eval")
        evaluation = to_dataset(items, spec, stats, "eval")
    examples = preference_examples(eval_raw, spec, tokenizer) if eval_raw is not None else []
    return PreparedData(train, evaluation, examples, stats)
