"""Examples in, token sequences out: load -> split -> format -> tokenize -> mask the prompt -> (pack).

Sources: local JSON/JSONL/CSV/Parquet files, folders of them, or Hub dataset names (via `datasets`).
Formats: alpaca (instruction / input / output), chat (`messages` rendered with the tokenizer's chat
template), text (causal LM on every token) and classification (text + label).

Loss is completion-only for alpaca and chat: prompt, system and user tokens get label -100, so the
model learns to answer, not to repeat instructions. Every example that had to be truncated or
dropped is counted and reported, never silently lost.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

from qlora.config.architecture import IGNORE_INDEX
from qlora.config.errors import QLoraError
from qlora.config.recipe import DataSpec, Recipe
from qlora.data.chat_tokens import encode_chat
from qlora.data.files import locate_problem

# `datasets` and transformers' collators are imported inside the functions that use them: the profiler imports
# this module (count_labels, through qlora.memory.settings) on every `qlora profile`, which never reads a
# dataset, and they cost about 1 s and 3 s to import on two cores.

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
FORMAT_ROLES = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
    "text": ("text",),
    "classification": ("text", "label"),
    "preference": ("prompt", "chosen", "rejected"),  # tokenized by qlora.data.preference
}
OPTIONAL_ROLES = {"input"}
FILE_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
GENERATION_FORMATS = ("alpaca", "chat", "preference")  # formats with a reference answer that exact_match checks
# The reasons qlora.data.preference leaves a pair out, as counted in the stats (`<split>_<reason>`).
PREFERENCE_DROPS = {
    "identical": "chosen == rejected",
    "empty": "an empty side",
    "long_prompt": "prompt over dpo.max_prompt_len or filling data.max_seq_len",
}


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
    stats: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] | None = None


def column(spec: DataSpec, role: str) -> str:
    """The dataset column that plays `role` (the role's own name unless `data.columns` maps it)."""
    return spec.columns.get(role, role)


# --- sources --------------------------------------------------------------------------------------


def load_raw(source: str, key: str = "data.path", split: str = "train"):
    """A non-empty `datasets.Dataset` from a local file, a folder of files, or a Hub dataset name."""
    path = Path(source).expanduser()
    if path.is_dir():
        raw = read_files(*folder_files(path, key), key)
    elif path.exists() or path.suffix.lower() in FILE_LOADERS or source.startswith((".", "/", "~")):
        raw = read_files(file_loader(path, key), [path], key)
    else:
        raw = load_hub(source, split, key)
    if len(raw) == 0:
        raise QLoraError(f"{key}: {source} holds no examples")
    return raw


def file_loader(path: Path, key: str) -> str:
    """The `datasets` builder for one local file, checking that it exists and has a known type."""
    if not path.exists():
        raise QLoraError(f"{key}: file not found: {path}")
    loader = FILE_LOADERS.get(path.suffix.lower())
    if loader is None:
        raise QLoraError(f"{key}: unsupported file type '{path.suffix}' (use {', '.join(FILE_LOADERS)})")
    return loader


def folder_files(folder: Path, key: str) -> tuple[str, list[Path]]:
    """(builder, files) for every data file under `folder`; one file type per folder."""
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FILE_LOADERS
        and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    )
    if not files:
        raise QLoraError(f"{key}: folder {folder} holds no {', '.join(FILE_LOADERS)} files")
    loaders = sorted({FILE_LOADERS[p.suffix.lower()] for p in files})
    if len(loaders) > 1:
        raise QLoraError(f"{key}: folder {folder} mixes file types ({', '.join(loaders)}); keep one type per folder")
    return loaders[0], files


def read_files(loader: str, files: list[Path], key: str):
    """Read local files with one `datasets` builder into a single split."""
    import datasets

    if all(f.stat().st_size == 0 for f in files):  # datasets fails on these with an empty message
        raise QLoraError(f"{key}: {', '.join(map(str, files))} holds no examples (empty)")
    try:
        with progress_bars_off():  # local files load in a blink; the bar would only clutter errors
            return datasets.load_dataset(loader, data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # datasets raises many types for unreadable files; all are the user's file
        where = locate_problem(loader, files)  # the file and line, which datasets' message lacks
        if where:
            raise QLoraError(f"{key}: cannot read {where}") from None
        raise QLoraError(f"{key}: cannot read {', '.join(map(str, files))}: {first_line(exc)}") from None


@contextmanager
def progress_bars_off():
    """Silence `datasets` progress bars for a moment, restoring the user's setting afterwards."""
    from datasets.utils import disable_progress_bars, enable_progress_bars, is_progress_bar_enabled

    was_enabled = is_progress_bar_enabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            enable_progress_bars()


def first_line(exc: Exception) -> str:
    """The first line of an exception's message, or its type when it has none."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_hub(name: str, split: str, key: str):
    """A Hub dataset split, passed straight to `datasets` (any failure is the name, split or network)."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, auth, missing repo or split: all reported as one user error
        raise QLoraError(
            f"{key}: '{name}' is not a local file or folder, and the Hub dataset could not be loaded with "
            f"data.split '{split}' (offline, gated or misspelt?): {first_line(exc)}"
        ) from None


def check_columns(raw, spec: DataSpec, key: str = "data.path") -> None:
    """Every required role has a column without empty values, or the error names the column."""
    roles = FORMAT_ROLES[spec.format]
    for role in spec.columns:
        if role not in roles:
            raise QLoraError(
                f"data.columns.{role}: not a role of the {spec.format} format (roles: {', '.join(roles)})"
            )
    for role in roles:
        name = column(spec, role)
        if role in OPTIONAL_ROLES:
            continue
        if name not in raw.column_names:
            raise QLoraError(
                f"{key}: no column '{name}' for the {spec.format} format's '{role}' "
                f"(columns: {', '.join(raw.column_names)}); map yours with data.columns.{role}"
            )
        missing = raw.data.column(name).null_count
        if missing:
            raise QLoraError(f"{key}: {missing} of {len(raw)} examples have no value in column '{name}' ({role})")


def load_source(spec: DataSpec, eval_file: bool = False):
    """`data.path` (capped at `max_examples`) or `data.eval_path`: columns checked, labels as text."""
    key = "data.eval_path" if eval_file else "data.path"
    raw = load_raw(spec.eval_path if eval_file else spec.path, key, spec.split)
    if spec.max_examples and not eval_file:
        raw = raw.select(range(min(spec.max_examples, len(raw))))
    check_columns(raw, spec, key)
    return label_text(raw, spec) if spec.format == "classification" else raw


def split_raw(raw, spec: DataSpec, seed: int):
    """(train, eval) raw splits: a separate eval file, a seeded held-out split, or no eval."""
    if spec.eval_path:
        return raw, load_source(spec, eval_file=True)
    if spec.eval_size == 0:
        return raw, None
    size = spec.eval_size if spec.eval_size < 1 else int(spec.eval_size)
    if (size if isinstance(size, int) else int(size * len(raw))) >= len(raw) or len(raw) < 2:
        raise QLoraError(f"data.eval_size: {spec.eval_size} leaves no training examples out of {len(raw)}")
    parts = raw.train_test_split(test_size=size, seed=seed)
    return parts["train"], parts["test"]


# --- classification labels ------------------------------------------------------------------------


def label_text(raw, spec: DataSpec):
    """Hub datasets store labels as `ClassLabel` ids; use their names so every source maps alike."""
    import datasets

    name = column(spec, "label")
    feature = raw.features[name]
    if not isinstance(feature, datasets.ClassLabel):
        return raw
    features = raw.features.copy()
    features[name] = datasets.Value("string")
    return raw.map(lambda batch: {name: feature.int2str(batch[name])}, batched=True, features=features)


def label_names_of(raws, spec: DataSpec) -> list[str]:
    """Sorted label names (ints numerically, then strings): the sort fixes each label's id."""
    values = [v for raw in raws if raw is not None for v in raw[column(spec, "label")]]
    # lists, mappings, floats, nulls: not a class name, and not hashable or sortable as one (a list, not
    # next(..., None): a null label is itself one of these)
    odd = [v for v in values if not isinstance(v, (str, int))]
    if odd:
        raise QLoraError(
            f"data.path: column '{column(spec, 'label')}' must hold text or integer labels, "
            f"got {type(odd[0]).__name__} {str(odd[0])[:60]}"
        )
    values = set(values)
    if len(values) < 2:
        raise QLoraError(
            f"data.path: classification needs at least two labels in column '{column(spec, 'label')}', "
            f"found {sorted(map(str, values))}"
        )
    return [str(v) for v in sorted(values, key=lambda v: (isinstance(v, str), v))]


def count_labels(recipe: Recipe) -> int | None:
    """How many labels a classification recipe's head will have, when its data is on this machine.

    For the profiler, which sizes the head before any model exists; None for a Hub dataset (not
    fetched just to count) or a file not written yet.
    """
    spec = recipe.data
    paths = [spec.path] + ([spec.eval_path] if spec.eval_path else [])
    if recipe.task != "classification" or not all(Path(p).expanduser().exists() for p in paths):
        return None
    sources = [load_source(spec), load_source(spec, eval_file=True) if spec.eval_path else None]
    return len(label_names_of(sources, spec))


# --- formats --------------------------------------------------------------------------------------


def format_alpaca(row: dict, spec: DataSpec) -> Example:
    """Alpaca's prompt (with or without an input section) and the expected output."""
    instruction = str(row[column(spec, "instruction")]).strip()
    context = str(row.get(column(spec, "input")) or "").strip()
    template = ALPACA_PROMPT if context else ALPACA_PROMPT_NO_INPUT
    return Example(
        prompt=template.format(instruction=instruction, input=context), response=str(row[column(spec, "output")])
    )


def conversation(row: dict, spec: DataSpec) -> list[dict]:
    """The example's messages, checked to be a list of {role, content} (what chat templates read)."""
    messages = row[column(spec, "messages")]
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages)
    ):
        raise QLoraError(
            f"data.path: column '{column(spec, 'messages')}' must hold lists of {{role, content}} messages, "
            f"got {str(messages)[:120]}"
        )
    return messages


def render_chat(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    """A conversation as the tokenizer's chat template writes it (special tokens included, as text)."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except TemplateError as exc:
        raise QLoraError(
            f"data.path: the chat template rejects a conversation ({exc}): {str(messages)[:120]}"
        ) from None


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    Found by rendering prefixes of the conversation: `apply_chat_template`'s own assistant mask needs
    `{% generation %}` markers that most templates lack. Character spans (not token counts) stay
    exact where tokens merge across a turn boundary.
    """
    text = render_chat(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:  # its prompt would be the empty conversation, which transformers refuses to render
            raise QLoraError(
                f"data.path: a conversation starts with an assistant turn (nothing for it to answer): "
                f"{str(messages)[:120]}"
            )
        start, end = (
            render_chat(tokenizer, messages[:i], generation_prompt=True),
            render_chat(tokenizer, messages[: i + 1]),
        )
        if not (end.startswith(start) and text.startswith(end)):
            raise QLoraError(
                "data.format: chat: this tokenizer's chat template renders a turn differently once later turns "
                "follow, so assistant turns cannot be located; use format 'alpaca' or 'text' with this model"
            )
        spans.append((len(start), len(end)))
    return text, spans


def chat_example(tokenizer, messages: list[dict]) -> Example | None:
    """The conversation up to its last assistant turn as a prompt, that turn as the reference answer."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    return Example(
        prompt=render_chat(tokenizer, messages[:last], generation_prompt=True), response=str(messages[last]["content"])
    )


# --- tokenization ---------------------------------------------------------------------------------


def causal_item(ids: list[int], labels: list[int], max_len: int) -> tuple[dict | None, bool]:
    """(item cut to `max_len`, was it cut); the item is None when no token is left to learn."""
    truncated = len(ids) > max_len
    ids, labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE_INDEX for label in labels[1:]):  # the first label is never predicted
        return None, truncated
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, truncated


def text_ids(tokenizer, text: str) -> list[int]:
    """User text as text: a literal '</s>' or '<|eot_id|>' in it is not the control token."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def bos_ids(tokenizer) -> list[int]:
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def tokenize_example(tokenizer, example: Example, max_len: int) -> tuple[dict | None, bool]:
    """Prompt + response + EOS with the prompt masked out of the labels."""
    prompt_ids = bos_ids(tokenizer) + text_ids(tokenizer, example.prompt)
    response_ids = text_ids(tokenizer, example.response) + [tokenizer.eos_token_id]
    return causal_item(prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids, max_len)


def tokenize_chat(tokenizer, messages: list[dict], max_len: int) -> tuple[dict | None, bool]:
    """The templated conversation, with labels only on tokens that start inside an assistant turn."""
    text, spans = assistant_spans(tokenizer, messages)
    ids, offsets = encode_chat(tokenizer, text, messages)  # the template writes BOS; contents stay text
    labels = [
        token if any(start <= offset[0] < end for start, end in spans) else IGNORE_INDEX
        for token, offset in zip(ids, offsets)
    ]
    return causal_item(ids, labels, max_len)


def tokenize_text(tokenizer, text: str, max_len: int) -> tuple[dict | None, bool]:
    """BOS + text + EOS, every token a label (plain causal LM)."""
    ids = bos_ids(tokenizer) + text_ids(tokenizer, text) + [tokenizer.eos_token_id]
    return causal_item(ids, list(ids), max_len)


def tokenize_classification(tokenizer, text: str, label_id: int, max_len: int) -> tuple[dict, bool]:
    """BOS + text cut to `max_len`, with the label's id (the head pools the last token)."""
    ids = bos_ids(tokenizer) + text_ids(tokenizer, text)
    return {"input_ids": ids[:max_len], "attention_mask": [1] * min(len(ids), max_len), "labels": label_id}, len(
        ids
    ) > max_len


def tokenize_row(row: dict, spec: DataSpec, tokenizer, label_ids: dict[str, int] | None) -> tuple[dict | None, bool]:
    """One raw row in the recipe's format -> (token item or None when dropped, truncated?)."""
    max_len = spec.max_seq_len
    if spec.format == "alpaca":
        return tokenize_example(tokenizer, format_alpaca(row, spec), max_len)
    if spec.format == "chat":
        return tokenize_chat(tokenizer, conversation(row, spec), max_len)
    if spec.format == "text":
        return tokenize_text(tokenizer, str(row[column(spec, "text")]), max_len)
    return tokenize_classification(
        tokenizer, str(row[column(spec, "text")]), label_ids[str(row[column(spec, "label")])], max_len
    )


def tokenize_split(raw, spec: DataSpec, tokenizer, stats: dict[str, Any], prefix: str, label_ids=None) -> list[dict]:
    """Tokenize a raw split, counting truncated and dropped examples into `stats`."""
    rows, truncated, dropped = [], 0, 0
    for row in raw:
        item, cut = tokenize_row(row, spec, tokenizer, label_ids)
        if item is None:
            dropped += 1
            continue
        truncated += cut
        rows.append(item)
    stats.update({f"{prefix}_examples": len(rows), f"{prefix}_truncated": truncated, f"{prefix}_dropped": dropped})
    if not rows:
        raise QLoraError(
            f"data.max_seq_len: none of the {len(raw)} {prefix} examples keeps a response token within "
            f"{spec.max_seq_len} tokens; raise it (or check that examples have responses/assistant turns)"
        )
    return rows


# --- packing --------------------------------------------------------------------------------------


def pack(items: list[dict], max_len: int) -> list[dict]:
    """Whole examples, in order, greedily filled into blocks of at most `max_len` tokens.

    A block keeps its examples apart (lists of ids and labels) so that the collator can restart
    position ids at each one; examples are never split across blocks.
    """
    blocks: list[list[dict]] = [[]]
    size = 0
    for item in items:
        if blocks[-1] and size + len(item["input_ids"]) > max_len:
            blocks.append([])
            size = 0
        blocks[-1].append(item)
        size += len(item["input_ids"])
    return [{"input_ids": [e["input_ids"] for e in b], "labels": [e["labels"] for e in b]} for b in blocks]


def to_dataset(items: list[dict], spec: DataSpec, stats: dict[str, Any], prefix: str):
    """A `datasets.Dataset` of the items, packed into blocks when the recipe asks."""
    import datasets

    if not spec.packing:
        return datasets.Dataset.from_list(items)
    blocks = pack(items, spec.max_seq_len)
    stats[f"{prefix}_blocks"] = len(blocks)
    return datasets.Dataset.from_list(blocks)


# --- the whole pipeline ---------------------------------------------------------------------------


def prepare_data(recipe: Recipe, tokenizer) -> PreparedData:
    """Everything the trainer needs from the recipe's data section."""
    spec = recipe.data
    if spec.format == "chat" and not tokenizer.chat_template:
        raise QLoraError(
            f"data.format: chat needs a chat template, and the tokenizer of {recipe.model.name_or_path} has none"
        )
    train_raw, eval_raw = split_raw(load_source(spec), spec, recipe.training.seed)
    stats: dict[str, Any] = {}
    names = label_names_of([train_raw, eval_raw], spec) if spec.format == "classification" else None
    label_ids = {name: i for i, name in enumerate(names)} if names else None
    if names:
        stats["labels"] = names  # the id order, recorded in metrics.json for whoever loads the head later
    train = to_dataset(tokenize_split(train_raw, spec, tokenizer, stats, "train", label_ids), spec, stats, "train")
    evaluation = None
    if eval_raw is not None:
        evaluation = to_dataset(
            tokenize_split(eval_raw, spec, tokenizer, stats, "eval", label_ids), spec, stats, "eval"
        )
    return PreparedData(train, evaluation, eval_examples(eval_raw, spec, tokenizer), stats, names)


def eval_examples(eval_raw, spec: DataSpec, tokenizer) -> list[Example]:
    """Prompt + reference answer per held-out example, for generation metrics (alpaca and chat only)."""
    if eval_raw is None or spec.format not in GENERATION_FORMATS:
        return []
    if spec.format == "alpaca":
        return [format_alpaca(row, spec) for row in eval_raw]
    examples = (chat_example(tokenizer, conversation(row, spec)) for row in eval_raw)
    return [e for e in examples if e is not None]


# --- batching -------------------------------------------------------------------------------------


def packed_collator():
    """Flattens packed blocks into one padding-free row with position ids restarting per example.

    transformers' `DataCollatorWithFlattening` does the flattening and masks each example's first
    label; from the restarting position ids the model builds a block-diagonal causal mask (sdpa,
    eager and flash attention), so no example attends to or is predicted from another. Caveat: models
    whose mask code ignores position ids (some remote-code models) would see across examples.
    """
    from transformers import DataCollatorWithFlattening

    flatten = DataCollatorWithFlattening(separator_id=IGNORE_INDEX)

    def collate(blocks: list[dict]) -> dict:
        batch = flatten([{"input_ids": i, "labels": l} for b in blocks for i, l in zip(b["input_ids"], b["labels"])])
        # With a KV cache the model skips packed-sequence detection and attends across examples; the
        # cache is off only while checkpointing, so say so per batch (training never needs a cache).
        return {**batch, "use_cache": False}

    return collate


def data_collator(tokenizer, spec: DataSpec | None = None):
    """The batch builder for the recipe's data: padded causal LM (default), packed blocks, or classes."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if spec is not None and spec.format == "classification":
        return DataCollatorWithPadding(tokenizer, return_tensors="pt")
    if spec is not None and spec.packing:
        return packed_collator()
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX, return_tensors="pt")


def describe(stats: dict[str, Any]) -> str:
    """One line for the user: how many examples train/eval, and how many were cut or dropped."""
    parts = [f"{stats.get('train_examples', 0)} train", f"{stats.get('eval_examples', 0)} eval examples"]
    if stats.get("train_blocks"):
        parts.append(f"packed into {stats['train_blocks']} train blocks")
    if stats.get("labels"):
        parts.append(f"{len(stats['labels'])} labels")
    for prefix in ("train", "eval"):
        if stats.get(f"{prefix}_truncated"):
            parts.append(f"{stats[f'{prefix}_truncated']} {prefix} truncated to data.max_seq_len")
        parts.extend(
            f"{stats[f'{prefix}_{reason}']} {prefix} pairs dropped ({text})"
            for reason, text in PREFERENCE_DROPS.items()
            if stats.get(f"{prefix}_{reason}")
        )
        if stats.get(f"{prefix}_dropped"):
            parts.append(f"{stats[f'{prefix}_dropped']} {prefix} dropped (no response token within data.max_seq_len)")
    return ", ".join(parts)
