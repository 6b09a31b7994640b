"""data.format preference: pairs as token ids, what is dropped or cut counted, one-line errors; the recipe rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qlora.config.errors import QLoraError
from qlora.config.recipe import recipe_from_mapping
from qlora.data.preference import prepare_preference_data


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(model, data_file, *overrides, **data):
    mapping = {
        "model": {"name_or_path": str(model)},
        "data": {"path": str(data_file), "format": "preference", "max_seq_len": 32, "eval_size": 0, **data},
        "training": {"objective": "dpo"},
        "output_dir": "unused",
    }
    return recipe_from_mapping(mapping, list(overrides))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def test_text_pairs_become_prompt_chosen_rejected_ids(tiny_llama, tokenizer, tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "one two", "chosen": " three", "rejected": " four"}])
    data = prepare_preference_data(recipe(tiny_llama, path), tokenizer)
    (item,) = list(data.train)
    assert item["prompt_ids"] == [tokenizer.bos_token_id] + tokenizer("one two", add_special_tokens=False)["input_ids"]
    assert item["chosen_ids"] == tokenizer(" three", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert item["rejected_ids"][-1] == tokenizer.eos_token_id
    assert data.stats == {
        "train_examples": 1,
        "train_truncated": 0,
        "train_identical": 0,
        "train_empty": 0,
        "train_long_prompt": 0,
    }


def test_identical_empty_and_long_prompts_are_counted_and_long_sides_cut(tiny_llama, tokenizer, tmp_path):
    long_side = " ".join(["the quick brown fox"] * 10)
    rows = [
        {"prompt": "one", "chosen": "two", "rejected": "two"},  # identical
        {"prompt": "one", "chosen": " ", "rejected": "two"},  # empty side
        {"prompt": long_side, "chosen": "a", "rejected": "b"},  # fills max_seq_len
        {"prompt": "one two three four five", "chosen": "a", "rejected": "b"},  # over dpo.max_prompt_len
        {"prompt": "one", "chosen": long_side, "rejected": "b"},  # kept, chosen cut
        {"prompt": "one", "chosen": "a", "rejected": "b"},  # kept
    ]
    path = write_rows(tmp_path / "p.jsonl", rows)
    data = prepare_preference_data(recipe(tiny_llama, path, "dpo.max_prompt_len=6"), tokenizer)
    assert data.stats == {
        "train_examples": 2,
        "train_truncated": 1,
        "train_identical": 1,
        "train_empty": 1,
        "train_long_prompt": 2,
    }
    cut = next(r for r in data.train if len(r["chosen_ids"]) > 5)
    assert len(cut["prompt_ids"]) + len(cut["chosen_ids"]) == 32  # data.max_seq_len

    from qlora.data.prepare import describe

    line = describe(data.stats)
    assert "1 train pairs dropped (chosen == rejected)" in line and "2 train pairs dropped (prompt over" in line


def test_messages_are_rendered_with_the_chat_template(tiny_llama, tokenizer, tmp_path):
    row = {
        "prompt": [{"role": "user", "content": "one two"}],
        "chosen": [{"role": "assistant", "content": "three"}],
        "rejected": "four",  # plain text on a side is the assistant's turn
    }
    path = write_rows(tmp_path / "p.jsonl", [row, row])
    data = prepare_preference_data(recipe(tiny_llama, path, "data.eval_size=1", "eval.metric=exact_match"), tokenizer)
    (item,) = list(data.train)
    prompt = "<|user|>\none two<|assistant|>\n"  # transformers renders templates with trim_blocks
    assert tokenizer.decode(item["prompt_ids"]) == prompt
    assert tokenizer.decode(item["chosen_ids"]) == "three</s>"
    assert tokenizer.decode(item["rejected_ids"]) == "four</s>"
    assert data.stats["chat_template"] is True
    assert [(e.prompt, e.response) for e in data.eval_examples] == [(prompt, "three")]


def test_columns_map_and_a_missing_column_is_one_line(tiny_llama, tokenizer, tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"question": "one", "good": "two", "bad": "three"}])
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    data = prepare_preference_data(recipe(tiny_llama, path, columns=columns), tokenizer)
    assert data.stats["train_examples"] == 1
    with pytest.raises(
        QLoraError, match=r"no column 'prompt' for the preference format's 'prompt'.*data.columns.prompt"
    ):
        prepare_preference_data(recipe(tiny_llama, path, columns={"chosen": "good", "rejected": "bad"}), tokenizer)
    with pytest.raises(QLoraError, match="none of the 1 train pairs is usable"):
        bad = write_rows(tmp_path / "same.jsonl", [{"prompt": "one", "chosen": "two", "rejected": "two"}])
        prepare_preference_data(recipe(tiny_llama, bad), tokenizer)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.objective=sft"], "data.format 'preference' needs a preference objective"),
        (["data.format=alpaca"], "training.objective 'dpo' trains on prompt/chosen/rejected pairs"),
        (["dpo.beta=0"], "dpo.beta: must be > 0"),
        (["dpo.loss_type=sigmod"], "dpo.loss_type: unknown value 'sigmod'"),
        (["dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1.0]"], "dpo.loss_weights: one weight per loss_type"),
        (["dpo.loss_type=exo_pair"], "loss_type exo_pair needs a value > 0"),
        (["dpo.label_smoothing=0.5"], r"dpo.label_smoothing: must be in \[0, 0.5\)"),
        (["dpo.max_prompt_len=64"], "dpo.max_prompt_len: must be > 0 and below data.max_seq_len"),
        (["data.packing=true"], "data.packing: preference pairs are not packed"),
        (["training.objective=ppo"], "training.objective: unknown value 'ppo'"),
    ],
)
def test_recipe_rules(tiny_llama, tmp_path, overrides, message):
    with pytest.raises(QLoraError, match=message):
        recipe(tiny_llama, tmp_path / "p.jsonl", *overrides)


def test_demo_pairs_hold_a_right_and_a_wrong_answer():
    from qlora.demo.datasets import preference_rows

    train, evaluation = preference_rows()
    assert len(train) == 668 and len(evaluation) == 64
    assert all(r["chosen"] != r["rejected"] and r["rejected"] for r in train + evaluation)
    shipped = Path(__file__).resolve().parents[2] / "recipes" / "demo-assets" / "preference-eval.jsonl"
    assert [json.loads(line) for line in shipped.read_text().splitlines()] == evaluation


def test_whole_conversations_beside_a_text_prompt_train_on_the_reply(tiny_llama, tokenizer, tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized's form: `prompt` text, each side the whole conversation."""
    user = {"role": "user", "content": "one two"}
    row = {
        "prompt": "one two",
        "chosen": [user, {"role": "assistant", "content": "three"}],
        "rejected": [user, {"role": "assistant", "content": "four"}],
    }
    data = prepare_preference_data(recipe(tiny_llama, write_rows(tmp_path / "p.jsonl", [row])), tokenizer)
    (item,) = list(data.train)
    assert tokenizer.decode(item["prompt_ids"]) == "<|user|>\none two<|assistant|>\n"
    assert tokenizer.decode(item["chosen_ids"]) == "three</s>"
    assert tokenizer.decode(item["rejected_ids"]) == "four</s>"
