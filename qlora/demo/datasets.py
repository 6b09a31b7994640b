"""The demo's fine-tuning datasets, generated from the demo language's lexicon.

    python -m qlora.demo.datasets --out qlora/demo/assets

`instructions.jsonl` (Alpaca rows) asks, in an instruction format the base model has never seen, for
knowledge its pretraining text states many times: a noun's plural, an adjective's opposite, a verb's past
tense. Answers are one word, so exact match of greedy generation is a meaningful metric. Each word is the
input of at most one row (an opposite pair of at most one), so a random held-out split holds out words,
not phrasings of words seen in training.

`classify.jsonl` holds sentences that mention one thing in a frame that fits any thing ("she found a red
fox near the barn."), labelled with the thing's category. `classify-eval.jsonl` does the same for nouns
that no training sentence mentions (every fifth noun of each class), so the fine-tune cannot learn the
eval words themselves: only what the base knows about them separates the classes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from qlora.demo import corpus

TASKS = {
    "plural": "Give the plural of the word.",
    "opposite": "Give the opposite of the word.",
    "past": "Give the past tense of the verb.",
}
INSTRUCTIONS = tuple(TASKS.values())
CLASSES = ("animal", "food", "tool", "clothing", "vehicle")
CLASSIFY_ROWS_PER_CLASS = 160  # training sentences per class
CLASSIFY_EVAL_ROWS_PER_CLASS = 40  # held-out sentences per class
CLASSIFY_EVAL_NOUN_EVERY = 5  # every fifth noun of a class appears in held-out sentences only


def instruction_rows(seed: int = corpus.DEFAULT_SEED) -> list[dict]:
    """Every noun, one side of every opposite pair and every verb, once each, in a seeded order."""
    rng = random.Random(seed)
    rows = [_row("plural", n.word, n.plural) for n in corpus.NOUNS]
    rows += [_row("opposite", *rng.choice((pair, pair[::-1]))) for pair in corpus.OPPOSITES]
    rows += [_row("past", v.base, v.past) for v in corpus.VERBS]
    rng.shuffle(rows)
    return rows


def _row(task: str, word: str, answer: str) -> dict:
    """One Alpaca row."""
    return {"instruction": TASKS[task], "input": word, "output": answer}


def classify_rows(seed: int = corpus.DEFAULT_SEED) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows: distinct neutral sentences, balanced per class, nouns cycled evenly; the eval
    rows mention only held-out nouns."""
    language = corpus.Language(seed + 1)  # its own stream: the pretraining text is not re-used verbatim
    train, evaluation, seen = [], [], set()
    for label in CLASSES:
        nouns = language.by_category[label]
        held_out = nouns[::CLASSIFY_EVAL_NOUN_EVERY]
        kept = tuple(n for n in nouns if n not in held_out)
        train += _sentences(language, kept, label, CLASSIFY_ROWS_PER_CLASS, seen)
        evaluation += _sentences(language, held_out, label, CLASSIFY_EVAL_ROWS_PER_CLASS, seen)
    language.rng.shuffle(train)
    language.rng.shuffle(evaluation)
    return train, evaluation


def _sentences(language: corpus.Language, nouns: tuple, label: str, count: int, seen: set[str]) -> list[dict]:
    """`count` classification rows not in `seen` (which they join), cycling through `nouns`."""
    rows = []
    while len(rows) < count:
        text = language.neutral_sentence(nouns[len(rows) % len(nouns)])
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    return rows


def write_jsonl(rows: list[dict], path: Path) -> None:
    """One JSON object per line, keys in insertion order, UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    """Write instructions.jsonl, classify.jsonl and classify-eval.jsonl."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the .jsonl files")
    parser.add_argument("--seed", type=int, default=corpus.DEFAULT_SEED)
    args = parser.parse_args(argv)
    write_jsonl(instruction_rows(args.seed), args.out / "instructions.jsonl")
    train, evaluation = classify_rows(args.seed)
    write_jsonl(train, args.out / "classify.jsonl")
    write_jsonl(evaluation, args.out / "classify-eval.jsonl")


if __name__ == "__main__":
    main()
