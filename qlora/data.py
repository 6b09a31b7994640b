"""Examples in, token sequences out: load -> split -> format -> tokenize -> mask the prompt.

Loss is computed on the response tokens only (completion-only): the prompt's labels are -100, so
the model learns to answer, not to repeat instructions. Every example that had to be truncated or
dropped is counted and reported, never silently lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qlora.errors import QLoraError
from qlora.recipe import DataSpec, Recipe

IGNORE_INDEX = -100  # labels with this value are skipped by the loss (PyTorch's cross-entropy default)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# The columns each format reads, by role; `data.columns` maps a role to the user's own column name.
FORMAT_ROLES = {"alpaca": ("instruction", "input", "output")}
OPTIONAL_ROLES = {"input"}
FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class Example:
    """One formatted example: the prompt the model sees and the response it must learn."""

    prompt: str
    response: str


@dataclass
class PreparedData:
    """Tokenized splits plus what the metric and the report need."""

    train: Any
    eval: Any
    eval_examples: list[Example]
    stats: dict[str, int] = field(default_factory=dict)
    label_names: list[str] | None = None


def column(spec: DataSpec, role: str) -> str:
    """The dataset column that plays `role` (the role's own name unless `data.columns` maps it)."""
    return spec.columns.get(role, role)


def load_raw(spec: DataSpec, path: str | None = None):
    """A `datasets.Dataset` from a local JSON/JSONL/CSV/Parquet file."""
    import datasets

    path = Path(path or spec.path)
    if not path.exists():
        raise QLoraError(f"data.path: file not found: {path}")
    loader = FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise QLoraError(f"data.path: unsupported file type '{path.suffix}' (use {', '.join(FILE_LOADERS)})")
    try:
        raw = datasets.load_dataset(loader, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for unreadable files; all are the user's file
        raise QLoraError(f"data.path: cannot read {path}: {str(exc).splitlines()[0]}") from None
    if len(raw) == 0:
        raise QLoraError(f"data.path: {path} holds no examples")
    return raw


def check_columns(raw, spec: DataSpec) -> None:
    """Every required role has its column, or the error names it and the columns that exist."""
    for role in FORMAT_ROLES[spec.format]:
        name = column(spec, role)
        if name not in raw.column_names and role not in OPTIONAL_ROLES:
            raise QLoraError(
                f"data.path: no column '{name}' for the {spec.format} format's '{role}' "
                f"(columns: {', '.join(raw.column_names)}); map yours with data.columns.{role}"
            )


def format_alpaca(row: dict, spec: DataSpec) -> Example:
    """Alpaca's prompt (with or without an input section) and the expected output."""
    instruction = str(row[column(spec, "instruction")] or "").strip()
    context = str(row.get(column(spec, "input")) or "").strip()
    template = ALPACA_PROMPT if context else ALPACA_PROMPT_NO_INPUT
    return Example(prompt=template.format(instruction=instruction, input=context), response=str(row[column(spec, "output")]))


def split_raw(raw, spec: DataSpec, seed: int):
    """(train, eval) raw splits: a separate eval file, a seeded held-out split, or no eval."""
    if spec.eval_path:
        return raw, load_raw(spec, spec.eval_path)
    if spec.eval_size == 0:
        return raw, None
    size = spec.eval_size if spec.eval_size < 1 else int(spec.eval_size)
    if (size if isinstance(size, int) else int(size * len(raw))) >= len(raw) or len(raw) < 2:
        raise QLoraError(f"data.eval_size: {spec.eval_size} leaves no training examples out of {len(raw)}")
    parts = raw.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


def tokenize_example(tokenizer, example: Example, max_len: int) -> dict[str, list[int]] | None:
    """Token ids with the prompt masked out of the labels; None when not one response token fits."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = bos + tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(prompt_ids) >= max_len:
        return None
    ids = (prompt_ids + response_ids)[:max_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_len]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def tokenize_split(raw, spec: DataSpec, tokenizer, stats: dict[str, int], prefix: str):
    """Format and tokenize a raw split, counting truncated and dropped examples into `stats`."""
    import datasets

    rows, truncated, dropped = [], 0, 0
    for row in raw:
        example = format_alpaca(row, spec)
        item = tokenize_example(tokenizer, example, spec.max_seq_len)
        if item is None:
            dropped += 1
            continue
        if item["labels"][-1] != tokenizer.eos_token_id:
            truncated += 1
        rows.append(item)
    stats.update({f"{prefix}_examples": len(rows), f"{prefix}_truncated": truncated, f"{prefix}_dropped": dropped})
    if not rows:
        raise QLoraError(
            f"data.max_seq_len: every {prefix} example's prompt is longer than {spec.max_seq_len} tokens; raise it"
        )
    return datasets.Dataset.from_list(rows)


def prepare_data(recipe: Recipe, tokenizer) -> PreparedData:
    """Everything the trainer needs from the recipe's data section."""
    spec = recipe.data
    raw = load_raw(spec)
    if spec.max_examples:
        raw = raw.select(range(min(spec.max_examples, len(raw))))
    check_columns(raw, spec)
    train_raw, eval_raw = split_raw(raw, spec, recipe.training.seed)
    stats: dict[str, int] = {}
    train = tokenize_split(train_raw, spec, tokenizer, stats, "train")
    evaluation = tokenize_split(eval_raw, spec, tokenizer, stats, "eval") if eval_raw is not None else None
    eval_examples = [format_alpaca(row, spec) for row in eval_raw] if eval_raw is not None else []
    return PreparedData(train=train, eval=evaluation, eval_examples=eval_examples, stats=stats)


def data_collator(tokenizer):
    """Pads input ids, attention masks and labels (labels with IGNORE_INDEX) per batch."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def describe(stats: dict[str, int]) -> str:
    """One line for the user: how many examples train/eval, and how many were cut or dropped."""
    parts = [f"{stats.get('train_examples', 0)} train", f"{stats.get('eval_examples', 0)} eval examples"]
    for prefix in ("train", "eval"):
        if stats.get(f"{prefix}_truncated"):
            parts.append(f"{stats[f'{prefix}_truncated']} {prefix} truncated to data.max_seq_len")
        if stats.get(f"{prefix}_dropped"):
            parts.append(f"{stats[f'{prefix}_dropped']} {prefix} dropped (prompt longer than data.max_seq_len)")
    return ", ".join(parts)
