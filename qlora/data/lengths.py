"""How long a dataset's examples are in tokens, as training will see them: what `qlora init` sizes
`data.max_seq_len` from.

With the model's tokenizer each row goes through the same formatting and tokenization as training
(prompt template, chat template, BOS/EOS). Without one (a catalog or Hub name, offline) the length is
estimated from characters, about 4 per token for English text with a Llama-sized vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from qlora.config.errors import QLoraError
from qlora.config.recipe import DataSpec
from qlora.data.prepare import column, conversation, format_alpaca, load_raw, load_source, tokenize_row

CHARS_PER_TOKEN = 4  # English with a 32k-128k vocabulary: 3.5-4.5; the estimate is said as such
MAX_ROWS = 5000  # a sample this size pins the 99th percentile; more only costs time
MESSAGE_OVERHEAD = 4  # tokens a chat template adds around each message (role header, end-of-turn)
SPECIAL = 2  # BOS + EOS


@dataclass(frozen=True)
class Lengths:
    """Token lengths of (a sample of) the rows, and how they were obtained."""

    tokens: tuple[int, ...]
    rows: int  # rows in the file
    measured: bool  # True: the model's tokenizer; False: estimated from characters

    def percentile(self, q: float) -> int:
        """The `q`-th percentile (nearest rank): q % of the examples are at most this long."""
        ordered = sorted(self.tokens)
        return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]

    def longer_than(self, n: int) -> float:
        """The share of examples a `max_seq_len` of `n` would truncate."""
        return sum(t > n for t in self.tokens) / len(self.tokens)


def estimated_tokens(row: dict, spec: DataSpec) -> int:
    """Characters / CHARS_PER_TOKEN of what training would tokenize (template text included), plus BOS/EOS."""
    if spec.format == "alpaca":
        example = format_alpaca(row, spec)
        chars = len(example.prompt) + len(example.response)
    elif spec.format == "chat":
        messages = conversation(row, spec)
        chars = sum(len(str(m["content"])) + MESSAGE_OVERHEAD * CHARS_PER_TOKEN for m in messages)
    else:
        chars = len(str(row[column(spec, "text")]))
    return math.ceil(chars / CHARS_PER_TOKEN) + SPECIAL


def token_lengths(spec: DataSpec, tokenizer=None) -> Lengths:
    """The lengths of the first MAX_ROWS rows of `spec.path` (its columns checked as training checks them)."""
    raw = load_source(spec)
    sample = raw.select(range(min(MAX_ROWS, len(raw))))
    if tokenizer is None:
        return Lengths(tuple(estimated_tokens(row, spec) for row in sample), len(raw), measured=False)
    whole = replace(spec, max_seq_len=10**9)  # nothing cut: the full length of each
    labels = None
    if spec.format == "classification":
        labels = {name: i for i, name in enumerate(sorted({str(v) for v in sample[column(spec, "label")]}))}
    tokens = []
    for row in sample:
        item, _ = tokenize_row(row, whole, tokenizer, labels)
        if item is not None:
            tokens.append(len(item["input_ids"]))
    return Lengths(tuple(tokens), len(raw), measured=True)


# columns -> format, most specific first (what `qlora init` assumes when --format is not given)
FORMAT_COLUMNS = (
    ("chat", {"messages"}),
    ("alpaca", {"instruction", "output"}),
    ("classification", {"text", "label"}),
    ("text", {"text"}),
)


def guess_format(path: str) -> str:
    """The data format a local file's columns say, or a QLoraError asking for --format."""
    columns = set(load_raw(path, "--data").column_names)
    for name, needed in FORMAT_COLUMNS:
        if needed <= columns:
            return name
    raise QLoraError(
        f"--data: cannot tell the format from the columns {sorted(columns)}; pass --format "
        "(alpaca: instruction/input/output, chat: messages, text: text, classification: text/label)"
    )
