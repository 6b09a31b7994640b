"""The demo language: deterministic, unambiguous, and silent about the instruction format it will be tuned on."""

from __future__ import annotations

import re
from collections import Counter

from qlora.demo import corpus, datasets


def test_same_seed_same_corpus():
    assert corpus.documents(rounds=2, seed=7) == corpus.documents(rounds=2, seed=7)
    assert corpus.documents(rounds=2, seed=7) != corpus.documents(rounds=2, seed=8)


def test_lexicon_has_no_word_with_two_meanings():
    forms = Counter()
    for noun in corpus.NOUNS:
        forms.update({noun.word, noun.plural})
    for verb in corpus.VERBS:
        forms.update({verb.base, verb.present, verb.past})
    forms.update(corpus.ADJECTIVES + corpus.COLORS + corpus.NUMBERS)
    assert [word for word, count in forms.items() if count > 1] == []


def test_spelling_rules():
    assert [corpus.regular_plural(w) for w in ("fox", "brush", "berry", "key", "cat")] == [
        "foxes",
        "brushes",
        "berries",
        "keys",
        "cats",
    ]
    assert corpus.third_person("carry") == "carries" and corpus.article("owl") == "an" and corpus.article("fox") == "a"


def test_pretraining_text_states_the_facts_but_never_the_task_format():
    text = " ".join(corpus.documents())
    assert "###" not in text and "plural" not in text and "past tense" not in text
    assert not any(instruction.lower() in text for instruction in datasets.INSTRUCTIONS)
    words = set(re.findall(r"[a-z]+", text))
    rows = datasets.instruction_rows()
    assert {row["input"] for row in rows} | {row["output"] for row in rows} <= words
    assert "one mouse, " in text and "the opposite of hot is cold." in text
