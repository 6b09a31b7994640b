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

`preference.jsonl` / `preference-eval.jsonl` (the DPO demo) pair each instruction row's right answer with a
plausible wrong word: the regular form of an irregular word ("mouses", "runned"), the input word itself,
or the answer to another word of the same task. The eval pairs are the SFT demo's own held-out rows
(its split: eval_size 64, seed 42), so neither demo trains on the words they are scored on.
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
SFT_DEMO_EVAL_SIZE, SFT_DEMO_SEED = 64, 42  # recipes/demo.yaml's data.eval_size and training.seed


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


def preference_rows(seed: int = corpus.DEFAULT_SEED) -> tuple[list[dict], list[dict]]:
    """(train, eval) prompt / chosen / rejected rows over the instruction rows, split as the SFT demo splits them."""
    import datasets

    from qlora.config.recipe import DataSpec
    from qlora.data.prepare import format_alpaca

    rows = instruction_rows(seed)
    # The SFT demo's split (qlora.data.prepare.split_raw: datasets' seeded train_test_split) of the same rows.
    parts = datasets.Dataset.from_list(rows).train_test_split(test_size=SFT_DEMO_EVAL_SIZE, seed=SFT_DEMO_SEED)
    rng = random.Random(seed + 2)
    spec = DataSpec()

    def pair(row: dict) -> dict:
        prompt = format_alpaca(row, spec).prompt
        return {"prompt": prompt, "chosen": row["output"], "rejected": wrong_answer(row, rng)}

    return [pair(r) for r in parts["train"]], [pair(r) for r in parts["test"]]


def wrong_answer(row: dict, rng: random.Random) -> str:
    """A plausible wrong one-word answer to an instruction row (never the right one)."""
    task = next(t for t, text in TASKS.items() if text == row["instruction"])
    word, answer = row["input"], row["output"]
    candidates = [word]  # repeating the question's word
    if task == "plural":
        candidates.append(corpus.regular_plural(word))  # "mouses" for mouse (a regular noun's is its answer)
        candidates.append(rng.choice(corpus.NOUNS).plural)
    elif task == "past":
        candidates.append(word + ("d" if word.endswith("e") else "ed"))  # "runned" for run
        candidates.append(rng.choice(corpus.VERBS).past)
    else:
        candidates.append(rng.choice(corpus.ADJECTIVES))
    candidates = [c for c in candidates if c != answer]
    return rng.choice(candidates)


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
    """Write instructions.jsonl, classify.jsonl, classify-eval.jsonl, preference.jsonl and preference-eval.jsonl."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the .jsonl files")
    parser.add_argument("--seed", type=int, default=corpus.DEFAULT_SEED)
    args = parser.parse_args(argv)
    write_jsonl(instruction_rows(args.seed), args.out / "instructions.jsonl")
    train, evaluation = classify_rows(args.seed)
    write_jsonl(train, args.out / "classify.jsonl")
    write_jsonl(evaluation, args.out / "classify-eval.jsonl")
    train, evaluation = preference_rows(args.seed)
    write_jsonl(train, args.out / "preference.jsonl")
    write_jsonl(evaluation, args.out / "preference-eval.jsonl")


if __name__ == "__main__":
    main()
