"""The demo datasets: deterministic, committed as generated, and held out by word."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from qlora.demo import ASSETS, RECIPES, corpus, datasets


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def words_of(row: dict) -> set[str]:
    return {row["input"], row["output"]}


def test_same_seed_same_rows():
    assert datasets.instruction_rows(7) == datasets.instruction_rows(7) != datasets.instruction_rows(8)
    assert datasets.classify_rows(7) == datasets.classify_rows(7) != datasets.classify_rows(8)


def test_each_word_is_in_at_most_one_instruction_row():
    rows = datasets.instruction_rows()
    words = Counter(word for row in rows for word in words_of(row))
    assert max(words.values()) == 1
    assert Counter(row["instruction"] for row in rows) == {
        datasets.TASKS["plural"]: len(corpus.NOUNS),
        datasets.TASKS["opposite"]: len(corpus.OPPOSITES),
        datasets.TASKS["past"]: len(corpus.VERBS),
    }


def test_classification_rows_are_balanced_distinct_and_held_out_by_noun():
    train, evaluation = datasets.classify_rows()
    assert Counter(row["label"] for row in train) == {
        label: datasets.CLASSIFY_ROWS_PER_CLASS for label in datasets.CLASSES
    }
    assert Counter(row["label"] for row in evaluation) == {
        label: datasets.CLASSIFY_EVAL_ROWS_PER_CLASS for label in datasets.CLASSES
    }
    assert len({row["text"] for row in train + evaluation}) == len(train) + len(evaluation)
    train_words = {word for row in train for word in row["text"].rstrip(".").split()}
    assert "hedgehog" in train_words and "cat" not in train_words  # cat is its class's first noun: held out
    assert any(" cat" in row["text"] for row in evaluation)


def test_committed_datasets_are_what_the_generator_writes(tmp_path):
    datasets.main(["--out", str(tmp_path)])
    for name in ("instructions.jsonl", "classify.jsonl", "classify-eval.jsonl"):
        assert (ASSETS / name).read_bytes() == (tmp_path / name).read_bytes(), f"{name}: rebuild with `make assets`"


def test_the_demo_recipe_holds_out_words_it_never_trains_on():
    from qlora.config.recipe import load_recipe
    from qlora.data.prepare import load_source, split_raw

    recipe = load_recipe(RECIPES / "demo.yaml")
    train, evaluation = split_raw(load_source(recipe.data), recipe.data, recipe.training.seed)
    assert len(evaluation) == recipe.data.eval_size >= recipe.eval.max_examples
    assert {row["instruction"] for row in evaluation} == set(datasets.INSTRUCTIONS)  # all three tasks are measured
    seen = {word for row in train for word in words_of(row)}
    assert not any(words_of(row) & seen for row in evaluation)
