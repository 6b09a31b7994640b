"""Data: sources, the four formats, completion-only labels, truncation reports, packing, length grouping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora.config.errors import QLoraError
from qlora.config.recipe import recipe_from_mapping
from qlora.data.prepare import IGNORE_INDEX, data_collator, describe, load_raw, pack, prepare_data

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello world"},
    {"role": "assistant", "content": "one two"},
    {"role": "user", "content": "the cat"},
    {"role": "assistant", "content": "a dog"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(path, **data):
    return recipe_from_mapping(
        {"model": {"name_or_path": "unused"}, "data": {"path": str(path), **data}, "output_dir": "unused"}
    )


def label_text(tokenizer, item) -> str:
    return tokenizer.decode([t for t in item["labels"] if t != IGNORE_INDEX])


# --- sources ---------------------------------------------------------------------------------------

ROWS = [{"instruction": f"say {w}", "input": "", "output": w} for w in ("one", "two", "three")]


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".parquet"])
def test_every_local_file_type_loads_the_same_rows(tmp_path, suffix):
    import pandas as pd

    path = tmp_path / f"data{suffix}"
    frame = pd.DataFrame(ROWS)
    {
        ".json": lambda: frame.to_json(path, orient="records"),
        ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
        ".csv": lambda: frame.to_csv(path, index=False),
        ".parquet": lambda: frame.to_parquet(path),
    }[suffix]()
    raw = load_raw(str(path))
    assert raw["output"] == ["one", "two", "three"]


def test_a_folder_reads_all_its_files_in_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", ROWS[1:])
    write_jsonl(tmp_path / "a.jsonl", ROWS[:1])
    (tmp_path / "README.md").write_text("not data")
    assert load_raw(str(tmp_path))["output"] == ["one", "two", "three"]


def test_a_folder_mixing_file_types_or_without_data_is_an_error(tmp_path):
    with pytest.raises(QLoraError, match=r"data.path: folder .* holds no \.json"):
        load_raw(str(tmp_path))
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "b.csv").write_text("instruction,output\nx,y\n")
    with pytest.raises(QLoraError, match=r"mixes file types \(csv, json\)"):
        load_raw(str(tmp_path))


def test_missing_empty_and_unsupported_files_name_the_key_and_path(tmp_path):
    with pytest.raises(QLoraError, match=r"data.path: file not found: .*nope.jsonl"):
        load_raw(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(QLoraError, match=r"data.eval_path: .*empty.jsonl holds no examples"):
        load_raw(str(tmp_path / "empty.jsonl"), key="data.eval_path")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(QLoraError, match=r"unsupported file type '.txt' \(use .json, .jsonl, .csv, .parquet\)"):
        load_raw(str(tmp_path / "d.txt"))


def test_a_hub_name_passes_straight_to_datasets_with_the_split(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(
        datasets, "load_dataset", lambda name, split: calls.append((name, split)) or datasets.Dataset.from_list(ROWS)
    )
    assert len(load_raw("org/alpaca", split="train[:10]")) == 3
    assert calls == [("org/alpaca", "train[:10]")]


def test_an_unreachable_hub_name_is_one_clear_error(monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(QLoraError, match=r"data.path: 'org/none' is not a local file or folder.*split 'train'"):
        load_raw("org/none")


# --- columns ---------------------------------------------------------------------------------------


def test_missing_column_names_it_and_the_columns_key(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x", "output": "y"}] * 4)
    with pytest.raises(
        QLoraError,
        match=r"no column 'instruction' .*\(columns: prompt, output\); map yours with data.columns.instruction",
    ):
        prepare_data(recipe(path), tokenizer)
    data = prepare_data(recipe(path, columns={"instruction": "prompt"}, eval_size=0), tokenizer)
    assert data.stats["train_examples"] == 4


def test_unknown_role_and_empty_values_are_errors(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "d.jsonl", [{"instruction": "x", "output": "y"}, {"instruction": "x", "output": None}]
    )
    with pytest.raises(
        QLoraError,
        match=r"data.columns.respons: not a role of the alpaca format \(roles: instruction, input, output\)",
    ):
        prepare_data(recipe(path, columns={"respons": "output"}), tokenizer)
    with pytest.raises(QLoraError, match=r"1 of 2 examples have no value in column 'output'"):
        prepare_data(recipe(path), tokenizer)


# --- formats ---------------------------------------------------------------------------------------


def test_alpaca_labels_are_the_response_and_eos_only(alpaca_file, tokenizer):
    data = prepare_data(recipe(alpaca_file, eval_size=4), tokenizer)
    item = data.train[0]
    assert item["input_ids"][0] == tokenizer.bos_token_id
    assert "### Response:" not in label_text(tokenizer, item) and label_text(tokenizer, item).endswith("</s>")
    assert data.stats == {
        "train_examples": 36,
        "train_truncated": 0,
        "train_dropped": 0,
        "eval_examples": 4,
        "eval_truncated": 0,
        "eval_dropped": 0,
    }
    assert data.eval_examples[0].prompt.endswith("### Response:\n")


def test_too_long_examples_are_counted_truncated_or_dropped(tmp_path, tokenizer):
    rows = [
        {"instruction": "one", "output": "two " * 50},
        {"instruction": "one " * 80, "output": "two"},
        {"instruction": "a", "output": "b"},
    ]
    data = prepare_data(recipe(write_jsonl(tmp_path / "d.jsonl", rows), max_seq_len=60, eval_size=0), tokenizer)
    assert (data.stats["train_examples"], data.stats["train_truncated"], data.stats["train_dropped"]) == (2, 1, 1)
    assert max(len(ids) for ids in data.train["input_ids"]) == 60
    assert "1 train truncated to data.max_seq_len, 1 train dropped" in describe(data.stats)


def test_chat_loss_is_on_assistant_turns_only(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"conversation": CHAT}] * 5)
    data = prepare_data(recipe(path, format="chat", columns={"messages": "conversation"}, eval_size=1), tokenizer)
    item = data.train[0]
    assert label_text(tokenizer, item) == "one two</s>a dog</s>"
    assert tokenizer.decode(item["input_ids"]) == tokenizer.apply_chat_template(CHAT, tokenize=False)
    example = data.eval_examples[0]
    assert example.response == "a dog" and example.prompt.endswith("the cat<|assistant|>\n")


def test_chat_without_template_or_with_a_non_incremental_one_is_an_error(tmp_path, tokenizer):
    import copy

    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(QLoraError, match="data.format: chat needs a chat template"):
        prepare_data(recipe(path, format="chat"), bare)
    bare.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(QLoraError, match="renders a turn differently once later turns follow"):
        prepare_data(recipe(path, format="chat"), bare)


def test_chat_rows_must_be_role_content_lists(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"from": "human", "value": "hi"}]}] * 3)
    with pytest.raises(QLoraError, match=r"column 'messages' must hold lists of \{role, content\} messages"):
        prepare_data(recipe(path, format="chat", eval_size=0), tokenizer)


def test_text_format_learns_every_token(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": "the quick brown fox"}] * 3)
    item = prepare_data(recipe(path, format="text", columns={"text": "body"}, eval_size=0), tokenizer).train[0]
    assert item["labels"] == item["input_ids"]
    assert item["input_ids"][0] == tokenizer.bos_token_id and item["input_ids"][-1] == tokenizer.eos_token_id


# --- packing and length grouping -------------------------------------------------------------------


def test_pack_fills_blocks_with_whole_examples():
    items = [{"input_ids": [i] * n, "labels": [i] * n} for i, n in enumerate([3, 4, 2, 5, 1])]
    blocks = pack(items, max_len=7)
    assert [[len(ids) for ids in b["input_ids"]] for b in blocks] == [[3, 4], [2, 5], [1]]


def test_packed_examples_do_not_see_each_other(alpaca_file, tokenizer, tiny_llama):
    """The logits of an example inside a packed row equal its logits alone: no cross-attention."""
    from transformers import AutoModelForCausalLM

    r = recipe(alpaca_file, packing=True, max_seq_len=256, eval_size=0)  # the tiny model has 256 positions
    data = prepare_data(r, tokenizer)
    assert data.stats["train_blocks"] < data.stats["train_examples"]
    block = data.train[0]
    batch = data_collator(tokenizer, r.data)([block])
    first, second = (len(ids) for ids in block["input_ids"][:2])
    assert batch["position_ids"][0, first].item() == 0  # positions restart at the second example
    assert batch["labels"][0, first].item() == IGNORE_INDEX  # and its first token is not predicted from the first
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    with torch.no_grad():
        packed = model(**batch).logits[0, first : first + second]
        alone = model(input_ids=torch.tensor([block["input_ids"][1]])).logits[0]
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-4)


def test_packing_refuses_classification_and_length_grouping_when_the_recipe_loads(tmp_path, alpaca_file):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    with pytest.raises(QLoraError, match="data.packing: only for causal LM formats"):
        recipe_from_mapping(
            {
                "model": {"name_or_path": "unused"},
                "task": "classification",
                "output_dir": "unused",
                "data": {"path": str(path), "format": "classification", "packing": True},
            }
        )
    with pytest.raises(QLoraError, match="data.packing and data.group_by_length: choose one"):
        recipe(alpaca_file, packing=True, group_by_length=True)


def test_group_by_length_batches_similar_lengths(tmp_path, tiny_llama, tokenizer):
    """Trainer reads lengths from `input_ids` itself (transformers 5 needs no length column)."""
    import random

    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    from transformers.trainer_pt_utils import LengthGroupedSampler

    sizes = [1] * 32 + [40] * 32
    random.Random(0).shuffle(sizes)
    rows = [{"instruction": "one " * n, "output": "two"} for n in sizes]
    r = recipe(write_jsonl(tmp_path / "d.jsonl", rows), group_by_length=True, eval_size=0)
    data = prepare_data(r, tokenizer)
    args = TrainingArguments(
        output_dir=str(tmp_path / "o"),
        per_device_train_batch_size=4,
        train_sampling_strategy="group_by_length",
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
    )
    trainer = Trainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama),
        args=args,
        train_dataset=data.train,
        data_collator=data_collator(tokenizer, r.data),
        processing_class=tokenizer,
    )
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, LengthGroupedSampler)
    assert sampler.lengths == [len(ids) for ids in data.train["input_ids"]]
    batches = [[sampler.lengths[i] for i in order] for order in torch.tensor(list(sampler)).split(4)]
    mixed = sum(len(set(batch)) > 1 for batch in batches)
    assert mixed <= 5, batches  # shuffled, about 14 of the 16 batches would mix short and long examples


@pytest.mark.parametrize("fmt", ["packed alpaca", "chat"])
def test_training_runs_on_packed_and_chat_data(tmp_path, tiny_llama, alpaca_file, fmt):
    """Through Trainer and peft: the packed batch's position ids and the chat prompts' own special tokens."""
    from qlora.training.run import train

    packed = fmt == "packed alpaca"
    path = alpaca_file if packed else write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 8)
    r = recipe_from_mapping(
        {
            "model": {"name_or_path": str(tiny_llama)},
            "lora": {"r": 4, "alpha": 8},
            "output_dir": str(tmp_path / "out"),
            "data": {
                "path": str(path),
                "format": "alpaca" if packed else "chat",
                "packing": packed,
                "max_seq_len": 256,
                "eval_size": 2,
            },
            "training": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "save_steps": 100, "logging_steps": 1},
            "eval": {"metric": "exact_match", "max_examples": 2, "max_new_tokens": 2},
        }
    )
    metrics = train(r)
    assert metrics["train_steps"] == 2 and metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert "eval_exact_match_after" in metrics
    assert ("train_blocks" in metrics["data"]) == packed


@pytest.mark.parametrize(
    "labels", [[None, True], [None, "x"], [["a"], ["b"]]], ids=["null-and-bool", "null-and-text", "lists"]
)
def test_a_null_or_list_label_is_one_error_naming_the_column(labels):
    """Found by the fuzz test: a null label slipped past the check (it was also the 'nothing odd' sentinel)."""
    import datasets

    from qlora.config.errors import QLoraError
    from qlora.config.recipe import DataSpec
    from qlora.data.prepare import label_names_of

    raw = datasets.Dataset.from_list([{"text": "a", "label": labels[0]}, {"text": "b", "label": labels[1]}])
    with pytest.raises(QLoraError, match="column 'label' must hold text or integer labels"):
        label_names_of([raw], DataSpec(format="classification"))
