"""Sequence classification with QLoRA: label mapping, the fully trained score head, metrics before/after."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qlora.config.errors import QLoraError
from qlora.config.recipe import recipe_from_mapping
from qlora.data.prepare import data_collator, prepare_data

WORDS = {
    "animal": ["cat", "dog", "bird", "fox"],
    "number": ["one", "two", "three", "four"],
    "thing": ["mat", "world", "tiny", "model"],
}


def classify_rows(count: int, seed: int = 0) -> list[dict]:
    """Texts of four words drawn from their label's group: learnable by a tiny model in a few steps."""
    rng = random.Random(seed)
    labels = rng.choices(sorted(WORDS), k=count)
    return [{"text": " ".join(rng.choice(WORDS[label]) for _ in range(4)), "label": label} for label in labels]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def classify_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "classify.jsonl", classify_rows(96))


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def mapping(model_dir, data_path, out="unused", **data) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "task": "classification",
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data_path), "format": "classification", "eval_size": 24, "max_seq_len": 32, **data},
        "training": {
            "max_steps": 8,
            "batch_size": 8,
            "grad_accum": 1,
            "learning_rate": 1e-2,
            "warmup_ratio": 0,
            "gradient_checkpointing": False,
            "save_steps": 100,
            "logging_steps": 4,
        },
        "eval": {"metric": "map@3"},
        "output_dir": str(out),
    }


def recipe(data_path, model_dir="unused", **data):
    return recipe_from_mapping(mapping(model_dir, data_path, **data))


# --- labels ----------------------------------------------------------------------------------------


def label_names(r, tokenizer) -> list[str]:
    """The label order the trainer uses: read by the same `prepare_data` that builds the datasets."""
    return prepare_data(r, tokenizer).label_names


def test_label_names_are_sorted_strings_and_include_eval_only_labels(tmp_path, classify_file, tokenizer):
    assert label_names(recipe(classify_file), tokenizer) == ["animal", "number", "thing"]
    extra = write_jsonl(tmp_path / "eval.jsonl", [{"text": "a cat", "label": "zebra"}])
    assert label_names(recipe(classify_file, eval_path=str(extra)), tokenizer) == [
        "animal",
        "number",
        "thing",
        "zebra",
    ]


def test_integer_labels_sort_numerically(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "label": n} for n in (10, 2, 1, 2)])
    assert label_names(recipe(path, eval_size=0), tokenizer) == ["1", "2", "10"]


def test_hub_class_label_ids_become_their_names(tmp_path, tokenizer):
    """Parquet keeps the `datasets` features, as the Hub does: ClassLabel ids map through their names."""
    import datasets

    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    datasets.Dataset.from_dict(
        {"sentence": ["bad", "good", "fine"], "label": [0, 1, 1]}, features=features
    ).to_parquet(tmp_path / "sst.parquet")
    r = recipe(tmp_path / "sst.parquet", columns={"text": "sentence"}, eval_size=0)
    assert label_names(r, tokenizer) == ["negative", "positive"]


def test_one_label_only_or_a_missing_label_column_is_an_error(tmp_path, tokenizer):
    with pytest.raises(QLoraError, match=r"needs at least two labels in column 'label', found \['x'\]"):
        label_names(
            recipe(write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": "x"}] * 3), eval_size=0), tokenizer
        )
    with pytest.raises(QLoraError, match=r"no column 'category' for the classification format's 'label'"):
        label_names(
            recipe(write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "y": "x"}]), columns={"label": "category"}),
            tokenizer,
        )


def test_the_profiler_counts_local_labels_and_leaves_hub_data_alone(tmp_path, classify_file):
    from qlora.data.prepare import count_labels

    extra = write_jsonl(tmp_path / "eval.jsonl", [{"text": "a cat", "label": "zebra"}])
    assert count_labels(recipe(classify_file)) == 3
    assert count_labels(recipe(classify_file, eval_path=str(extra))) == 4
    assert count_labels(recipe("stanfordnlp/sst2")) is None  # not fetched just to size a head
    assert count_labels(recipe(tmp_path / "not-written-yet.jsonl")) is None


def test_examples_carry_label_ids_in_sorted_order_and_batch_as_classes(classify_file, tokenizer):
    names = ["animal", "number", "thing"]
    data = prepare_data(recipe(classify_file, eval_size=0), tokenizer)  # no split: rows keep their order
    assert data.label_names == data.stats["labels"] == names
    assert data.train["labels"] == [names.index(row["label"]) for row in classify_rows(96)]
    r = recipe(classify_file, max_seq_len=4)
    data = prepare_data(r, tokenizer)
    assert (data.stats["train_examples"], data.stats["eval_examples"]) == (72, 24)
    assert data.stats["train_truncated"] == 72  # BOS + four words never fit in 4 tokens
    batch = data_collator(tokenizer, r.data)([data.train[i] for i in range(3)])
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (3,)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 4)


# --- model and training ----------------------------------------------------------------------------


def test_the_new_score_head_trains_in_full_next_to_4bit_lora(tiny_llama, classify_file, capsys, caplog):
    import bitsandbytes as bnb

    from qlora.model.build import build_model

    loaded = build_model(recipe(classify_file, tiny_llama), ["animal", "number", "thing"])
    err = capsys.readouterr().err
    assert "model: new classifier head score.weight (3 labels), trained in full" in err
    assert "lacks" not in err  # only the expected head is new
    assert not [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]  # one line replaces transformers' table
    inner = loaded.model.get_base_model()
    assert inner.config.id2label == {0: "animal", 1: "number", 2: "thing"}
    head = inner.score.modules_to_save["default"]
    assert type(head) is torch.nn.Linear and head.weight.shape == (3, 64)
    assert head.weight.requires_grad and head.weight.dtype == torch.float32
    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if "lora_" in n} | {
        "base_model.model.score.modules_to_save.default.weight"
    }
    assert isinstance(inner.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)


def test_the_head_trains_in_fp32_on_a_16bit_base(tiny_llama, classify_file):
    """peft copies the head in the base's dtype; fp16 gradients would stop the fp16 grad scaler on a T4."""
    from qlora.model.build import build_model

    r = recipe_from_mapping({**mapping(tiny_llama, classify_file), "quantization": {"compute_dtype": "bfloat16"}})
    loaded = build_model(r, ["animal", "number", "thing"])
    inner = loaded.model.get_base_model()
    assert inner.score.original_module.weight.dtype == torch.bfloat16  # the frozen original stays 16-bit
    trainable = {n: p.dtype for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trainable and set(trainable.values()) == {torch.float32}
    assert "base_model.model.score.modules_to_save.default.weight" in trainable


def test_a_base_weight_missing_from_the_checkpoint_is_named(tiny_llama, classify_file, tmp_path, capsys):
    """Only the head may start untrained: anything else missing means the wrong or a broken checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qlora.model.build import build_model

    broken = Path(shutil.copytree(tiny_llama, tmp_path / "broken"))
    weights = load_file(broken / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    build_model(recipe(classify_file, broken), ["animal", "number", "thing"])
    err = capsys.readouterr().err
    assert f"warning: {broken} lacks 1 base weight, randomly initialised: model.norm.weight" in err


@pytest.fixture(scope="module")
def trained(tiny_llama, classify_file, tmp_path_factory):
    from qlora.training.run import train

    out = tmp_path_factory.mktemp("classify-run")
    return out, train(recipe_from_mapping(mapping(tiny_llama, classify_file, out)))


def test_training_raises_accuracy_and_reports_before_and_after(trained):
    out, metrics = trained
    assert json.loads((out / "metrics.json").read_text())["eval_accuracy_after"] == metrics["eval_accuracy_after"]
    for name in ("loss", "accuracy", "f1", "map_at_3"):
        assert f"eval_{name}_before" in metrics and f"eval_{name}_after" in metrics
    assert metrics["eval_accuracy_after"] > metrics["eval_accuracy_before"] + 0.2
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["eval_map_at_3_after"] >= metrics["eval_accuracy_after"]
    assert metrics["data"]["labels"] == ["animal", "number", "thing"]


def test_the_saved_adapter_holds_the_trained_head(trained):
    from safetensors.torch import load_file

    weights = load_file(trained[0] / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("score.weight") and v.shape == (3, 64) for k, v in weights.items())


def test_generate_labels_texts_with_the_trained_classifier(trained):
    """The answers are what the trained head predicts: one text per label, each labelled right."""
    from qlora.post.export import read_run
    from qlora.post.generate import generate

    texts = {"cat dog bird fox": "animal", "one two three four": "number", "mat world tiny model": "thing"}
    answers = generate(read_run(trained[0]), list(texts))
    labels = [re.fullmatch(r"(\w+) \(\d+%\)", a["adapter"]).group(1) for a in answers]
    assert labels == list(texts.values())


def test_merge_saves_a_plain_classifier_that_matches_the_adapter(trained, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qlora.post.export import read_run
    from qlora.post.merge import merge

    check = merge(read_run(trained[0]), tmp_path / "merged")
    assert check.ok and check.positions == 4  # one pooled prediction per check prompt
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged")
    pad_id = AutoTokenizer.from_pretrained(
        tmp_path / "merged"
    ).pad_token_id  # the classifier pools the last non-pad token
    assert (
        merged.config.id2label == {0: "animal", 1: "number", 2: "thing"} and merged.config.pad_token_id == pad_id == 3
    )
    assert merged.score.weight.dtype == torch.float16 and not any("lora" in n for n, _ in merged.named_parameters())


@pytest.mark.slow
def test_cli_trains_a_classification_recipe(tiny_llama, classify_file, tmp_path):
    """`python -m qlora.train` as a user runs it."""
    data = mapping(tiny_llama, classify_file, tmp_path / "run", max_examples=48)
    data["training"]["max_steps"] = 2
    path = tmp_path / "classify.yaml"
    path.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "qlora.train", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"eval_accuracy_before", "eval_accuracy_after", "eval_f1_after", "eval_map_at_3_after"} <= metrics.keys()


DEMO = Path(__file__).resolve().parents[2] / "recipes" / "demo-classify.yaml"


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO.parent / "demo-assets" / "base-model").exists(), reason="demo assets not built")
def test_demo_classify_raises_accuracy_by_more_than_10_points(tmp_path):
    """The issue's acceptance run: the shipped demo on CPU, as a user launches it (about a minute)."""
    out = tmp_path / "demo-classify"
    run = subprocess.run(
        [sys.executable, "-m", "qlora.train", str(DEMO), "--set", f"output_dir={out}"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_accuracy_after"] - metrics["eval_accuracy_before"] > 0.10
