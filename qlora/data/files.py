"""Where a local data file is broken: the file and line number, for the one-line error.

`datasets` reads JSON Lines in blocks and CSV through pandas, so a bad row surfaces as "an error
occurred while generating the dataset" or "at position 30" (a byte offset in a block). Only after
such a failure, the file is read again line by line with the standard library's parsers to name
the first line they reject; the happy path pays nothing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path


def locate_problem(loader: str, files: list[Path]) -> str | None:
    """'FILE line N: what is wrong' for the first broken line of the first broken file, or None."""
    check = {"json": json_problem, "csv": csv_problem}.get(loader)
    if check is None:
        return None
    for path in files:
        problem = check(Path(path))
        if problem:
            return f"{path} {problem}"
    return None


def undecodable(path: Path) -> str | None:
    """'line N: not UTF-8 text' for the first line that is not UTF-8, or None."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f"line {number}: not UTF-8 text (byte {exc.start + 1} of the line)"
    return None


def json_problem(path: Path) -> str | None:
    """A whole-file JSON document is checked as one; anything else as JSON Lines (one object a line)."""
    bad_text = undecodable(path)
    if bad_text:
        return bad_text
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}: invalid JSON ({exc.msg}, column {exc.colno})"
        for index, item in enumerate(document if isinstance(document, list) else []):
            if not isinstance(item, dict):
                return f"item {index + 1}: expected an object of columns, got {type(item).__name__}"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}: invalid JSON ({exc.msg}, column {exc.colno})"
        if not isinstance(row, dict):
            return f"line {number}: expected a JSON object of columns, got {type(row).__name__}"
    return None


def csv_problem(path: Path) -> str | None:
    """The first row whose field count differs from the header's (csv counts quoted newlines right)."""
    bad_text = undecodable(path)
    if bad_text:
        return bad_text
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, strict=True)
        start = 1
        try:
            header = next(reader, None)
            if header is None:
                return None
            start = reader.line_num + 1
            for row in reader:
                if row and len(row) != len(header):
                    spans = f" (a quoted field runs on to line {reader.line_num})" if reader.line_num > start else ""
                    return f"line {start}: {len(row)} fields, the header has {len(header)}{spans}"
                start = reader.line_num + 1
        except csv.Error as exc:
            quote = " (a quoted field opened there is never closed)" if str(exc) == "unexpected end of data" else ""
            return f"line {start}: {exc}{quote}"
    return None
