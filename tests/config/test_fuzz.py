"""Property tests (hypothesis): any recipe file, `--set` or data file ends as a valid recipe / dataset or as
the project's one-line error (QLoraError), never another exception. Sized to run in seconds in `make test`."""

from __future__ import annotations

import csv
import io
import json
import re
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora.config.errors import QLoraError
from qlora.config.recipe import Recipe, all_keys, load_recipe, recipe_from_mapping

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = all_keys()
SECTIONS = sorted({k.split(".")[0] for k in KEYS})
LEAVES = sorted({k.split(".")[-1] for k in KEYS})
VALID = {"model": {"name_or_path": "some/model"}, "data": {"path": "data.jsonl"}, "output_dir": "out"}

texts = st.text(max_size=12) | st.sampled_from(
    [
        "",
        " ",
        "none",
        "null",
        "2e-4",
        "1e309",
        "-0",
        "24GB",
        "nf4",
        "all-linear",
        "\x00",
        "é✓",
        "../x",
        "/" * 300,
        "a" * 5000,
    ]
)
scalars = (
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=True, allow_infinity=True) | texts
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8
)
keys = st.sampled_from(SECTIONS + LEAVES) | texts


def section_values():
    return st.dictionaries(st.sampled_from(LEAVES) | texts, values, max_size=5) | values


def nest(flat: dict) -> dict:
    """{'lora.r': 8} -> {'lora': {'r': 8}} (dotted keys of the real schema, placed where they belong)."""
    out: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


# Half random structure, half the real schema with random values (where the interesting bugs live).
documents = st.dictionaries(keys, section_values(), max_size=6) | st.dictionaries(
    st.sampled_from(KEYS), values, max_size=6
).map(nest)


def ends_well(build):
    """The call returns a Recipe or raises QLoraError; anything else fails the property."""
    try:
        result = build()
    except QLoraError as exc:
        assert str(exc)
        return None
    assert isinstance(result, Recipe)
    return result


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@FAST
@given(document=documents)
def test_any_yaml_mapping_is_a_recipe_or_one_error(folder, document):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    ends_well(lambda: load_recipe(path))
    path.write_text(yaml.safe_dump({**VALID, **document}, allow_unicode=True), encoding="utf-8")
    ends_well(lambda: load_recipe(path))


@FAST
@given(text=st.text(max_size=200) | st.binary(max_size=100).map(lambda b: b.decode("latin-1")))
def test_any_text_file_is_a_recipe_or_one_error(folder, text):
    path = folder / "raw.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    ends_well(lambda: load_recipe(path))


PATH_KEYS = ["model.name_or_path", "data.path", "data.eval_path", "output_dir", "model.revision", "target_gpu"]


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = deep_merge(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) else value
    return out


# A valid recipe with a few keys replaced (path-like keys over-weighted: they reach the file system).
edited = st.dictionaries(
    st.sampled_from(PATH_KEYS) | st.sampled_from(KEYS), values | texts, min_size=1, max_size=3
).map(nest)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edit=edited)
def test_a_valid_recipe_with_any_keys_changed_is_a_recipe_or_one_error(folder, edit):
    path = folder / "edited.yaml"
    path.write_text(yaml.safe_dump(deep_merge(VALID, edit), allow_unicode=True), encoding="utf-8")
    ends_well(lambda: load_recipe(path))
    ends_well(lambda: recipe_from_mapping(deep_merge(VALID, edit)))


overrides = st.lists(
    st.builds(
        lambda k, sep, v: f"{k}{sep}{v}",
        st.sampled_from(KEYS) | texts,
        st.sampled_from(["=", "", "==", " = "]),
        texts | st.sampled_from(["[1, 2", "{a: 1}", "[q_proj, v_proj]", "!!python/object:os.system", "*x", "'"]),
    ),
    max_size=4,
)


@FAST
@given(items=overrides)
def test_any_set_overrides_are_a_recipe_or_one_error(items):
    ends_well(lambda: recipe_from_mapping(VALID, items))


@FAST
@given(document=documents, items=overrides)
def test_overrides_on_any_file_are_a_recipe_or_one_error(folder, document, items):
    path = folder / "with-set.yaml"
    path.write_text(yaml.safe_dump({**VALID, **document}, allow_unicode=True), encoding="utf-8")
    ends_well(lambda: load_recipe(path, items))


# --- the data loader ------------------------------------------------------------------------------

COLUMNS = ["instruction", "input", "output", "text", "label", "messages", "extra"]
cells = (
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=True)
    | texts
    | st.text(alphabet=string.ascii_letters + " ", max_size=8).map(lambda s: s * 400)  # very long lines
    | st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]), "content": texts}),
        max_size=3,
    )
    | st.dictionaries(texts, texts, max_size=2)
)
rows = st.lists(st.dictionaries(st.sampled_from(COLUMNS) | texts, cells, max_size=5), min_size=0, max_size=6)


def write_rows(path, data, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    else:
        names = sorted({k for r in data for k in r})
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=names)
        if names:
            writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in data)
        path.write_text(buffer.getvalue(), encoding="utf-8")


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


ROLE_COLUMNS = {
    "alpaca": ["instruction", "input", "output"],
    "chat": ["messages"],
    "text": ["text"],
    "classification": ["text", "label"],
}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    draw=st.data(),
    kind=st.sampled_from(["jsonl", "json", "csv"]),
    fmt=st.sampled_from(sorted(ROLE_COLUMNS)),
    eval_size=st.sampled_from([0, 1, 0.5]),
    packing=st.booleans(),
)
def test_any_rows_are_a_dataset_or_one_error(folder, tokenizer, draw, kind, fmt, eval_size, packing):
    from qlora.data.prepare import PreparedData, prepare_data

    # Half of the files carry the format's own columns (random cells, missing / extra / null ones).
    required = [c for c in ROLE_COLUMNS[fmt] if c != "input"]
    shaped = st.lists(
        st.fixed_dictionaries({c: cells for c in required}, optional={"extra": cells, "input": cells}), max_size=6
    )
    data = draw.draw(rows | shaped)
    path = folder / f"rows.{kind}"
    write_rows(path, data, kind)
    task = "classification" if fmt == "classification" else "causal_lm"
    mapping = {
        "model": {"name_or_path": "unused"},
        "task": task,
        "output_dir": "unused",
        "data": {
            "path": str(path),
            "format": fmt,
            "eval_size": eval_size,
            "max_seq_len": 64,
            "packing": packing and task == "causal_lm",
        },
    }
    recipe = recipe_from_mapping(mapping)
    try:
        prepared = prepare_data(recipe, tokenizer)
    except QLoraError:
        return
    assert isinstance(prepared, PreparedData) and len(prepared.train) > 0


# --- what the fuzzing found, pinned ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        ("a" * 300, "model.name_or_path: a name in 'aaaa"),  # was OSError: File name too long
        ("x\x00y", "model.name_or_path: contains a NUL character"),  # was ValueError: embedded null byte
    ],
)
def test_unusable_path_names_are_one_error(folder, value, message):
    path = folder / "paths.yaml"
    path.write_text(yaml.safe_dump(deep_merge(VALID, {"model": {"name_or_path": value}})), encoding="utf-8")
    with pytest.raises(QLoraError, match=re.escape(message)):
        load_recipe(path)


@pytest.mark.parametrize(
    "fmt, row, message",
    [
        (
            "classification",
            {"text": "a", "label": ["x"]},
            "column 'label' must hold text or integer labels, got list",
        ),  # was TypeError
        ("chat", {"messages": []}, "column 'messages' must hold lists of {role, content} messages"),  # was ValueError
        (
            "chat",
            {"messages": [{"role": "assistant", "content": "x"}]},
            "a conversation starts with an assistant turn",
        ),  # was ValueError (transformers refuses to render the empty conversation before it)
    ],
)
def test_malformed_cells_are_one_error(folder, tokenizer, fmt, row, message):
    from qlora.data.prepare import prepare_data

    path = folder / "cells.jsonl"
    write_rows(path, [row, row], "jsonl")
    task = "classification" if fmt == "classification" else "causal_lm"
    recipe = recipe_from_mapping(
        {
            "model": {"name_or_path": "unused"},
            "task": task,
            "output_dir": "unused",
            "data": {"path": str(path), "format": fmt, "eval_size": 0},
        }
    )
    with pytest.raises(QLoraError, match=re.escape(message)):
        prepare_data(recipe, tokenizer)
