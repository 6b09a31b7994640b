"""A broken data file is named with its line: JSON Lines, JSON documents and CSV rows."""

from __future__ import annotations

import json
import re

import pytest

from qlora.config.errors import QLoraError
from qlora.data.prepare import load_raw

ROWS = [{"instruction": "say", "input": "", "output": str(i)} for i in range(40)]


def jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_broken_jsonl_line_is_named_with_file_and_line(tmp_path):
    lines = [json.dumps(r) for r in ROWS]
    lines[29] = '{"instruction": "say", "output": }'
    path = jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(QLoraError) as info:
        load_raw(str(path))
    assert str(info.value) == f"data.path: cannot read {path} line 30: invalid JSON (Expecting value, column 34)"


def test_a_jsonl_line_that_is_not_an_object(tmp_path):
    lines = [json.dumps(r) for r in ROWS[:5]] + ['["a", "list"]']
    path = jsonl(tmp_path / "data.jsonl", lines)
    with pytest.raises(QLoraError, match=re.escape(f"{path} line 6: expected a JSON object of columns, got list")):
        load_raw(str(path))


def test_the_broken_file_of_a_folder_is_the_one_named(tmp_path):
    jsonl(tmp_path / "a.jsonl", [json.dumps(r) for r in ROWS[:3]])
    bad = jsonl(tmp_path / "b.jsonl", [json.dumps(ROWS[0]), "not json"])
    with pytest.raises(
        QLoraError, match=re.escape(f"cannot read {bad} line 2: invalid JSON (Expecting value, column 1)")
    ):
        load_raw(str(tmp_path), key="data.eval_path")


def test_broken_json_document_names_its_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n')
    with pytest.raises(
        QLoraError, match=re.escape(f"{path} line 3: invalid JSON (Expecting ',' delimiter, column 23)")
    ):
        load_raw(str(path))


def test_csv_row_with_too_many_fields_names_its_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,input,output\n" + "".join(f"say,,{i}\n" for i in range(10)) + "say,x,y,z\nsay,,w\n")
    with pytest.raises(QLoraError) as info:
        load_raw(str(path))
    assert str(info.value) == f"data.path: cannot read {path} line 12: 4 fields, the header has 3"


def test_csv_unclosed_quote_names_the_line_where_it_opens(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('instruction,input,output\nsay,,"one\nsay,,two\n')
    with pytest.raises(QLoraError) as info:
        load_raw(str(path))
    assert str(info.value) == (
        f"data.path: cannot read {path} line 2: unexpected end of data (a quoted field opened there is never closed)"
    )
    path.write_text('instruction,input,output\nsay,,"one\nsay,,two"\nsay,x,y,z\n')  # a quoted newline is fine
    with pytest.raises(QLoraError, match=re.escape(f"{path} line 4: 4 fields, the header has 3")):
        load_raw(str(path))


def test_non_utf8_csv_line_is_named(tmp_path):
    path = tmp_path / "data.csv"
    path.write_bytes(b"instruction,input,output\nsay,,one\nsay,\xff,two\n")
    with pytest.raises(QLoraError, match=re.escape(f"{path} line 3: not UTF-8 text (byte 5 of the line)")):
        load_raw(str(path))
