"""`qlora init --model NAME|PATH --gpu 24GB --data FILE` / `python -m qlora.init`: a commented recipe sized by
the memory planner for one GPU (qlora.memory.sizing), or one line saying why nothing fits (exit 2)."""

from __future__ import annotations

import argparse
import shlex
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import yaml

from qlora import DISTRIBUTION, __version__
from qlora.config.errors import QLoraError, run_cli
from qlora.config.gpus import gpu_target
from qlora.config.recipe import DATA_FORMATS, DataSpec, ModelSpec, load_recipe
from qlora.data.lengths import CHARS_PER_TOKEN, guess_format, token_lengths
from qlora.memory.catalog import catalog, resolve
from qlora.memory.estimate import GIB
from qlora.memory.sizing import METHOD_BITS, PERCENTILE, TARGET_GLOBAL_BATCH, Sizing, base_recipe, size_recipe

# (section, key) -> the comment written beside it
COMMENTS = {
    ("model", "name_or_path"): "a Hub id or a local folder",
    ("quantization", "bits"): "4: QLoRA (NF4 base), 8: LoRA on an 8-bit base, none: 16-bit LoRA",
    ("lora", "r"): "adapter rank; alpha = 2 x r",
    ("lora", "targets"): "LoRA on every linear layer (the QLoRA paper's choice)",
    ("data", "max_seq_len"): "longer examples are cut (see the header)",
    ("training", "batch_size"): "sequences per device step",
    ("training", "grad_accum"): f"batch_size x grad_accum = global batch {TARGET_GLOBAL_BATCH}",
    ("training", "optimizer"): "paged: its states move to host RAM under memory pressure",
    ("training", "gradient_checkpointing"): "auto: the fewest layers recomputed that fit the GPU (training decides)",
    ("training", "offload_checkpoints"): "true: checkpointed layer inputs in host RAM",
    ("target_gpu",): "the GPU this recipe is sized for (qlora profile --recipe checks it)",
}


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="qlora init",
        description="Write a recipe sized for your GPU and data by qlora's memory planner.",
    )
    parser.add_argument("--model", required=True, help="a catalog name, a Hub id or a local model folder")
    parser.add_argument("--gpu", required=True, help="the GPU: a size (24GB, 80GiB) or a preset (t4, 4090, a100-80gb)")
    parser.add_argument("--data", required=True, help="a local JSON/JSONL/CSV/Parquet file of training examples")
    parser.add_argument("--format", choices=DATA_FORMATS, help="the data's format (default: told by its columns)")
    parser.add_argument("--method", choices=tuple(METHOD_BITS), default="qlora", help="default: qlora")
    parser.add_argument("--out", default="recipe.yaml", help="the recipe file to write (default: recipe.yaml)")
    parser.add_argument("--force", action="store_true", help="replace --out when it exists")
    return parser.parse_args(argv)


def model_source(text: str) -> tuple[str, str, str | None]:
    """(name_or_path for the recipe, the name reports use, a local folder to read a tokenizer from)."""
    found = resolve(text)  # a QLoraError listing the catalog when nothing matches
    path = Path(text).expanduser()
    if path.is_dir() or path.is_file():
        folder = (path if path.is_dir() else path.parent).resolve()
        return str(folder), found.name, str(folder)
    if text.lower() in catalog():  # a catalog name: the recipe names the model on the Hub
        return found.hub_ids[0], found.name, None
    return text, found.name, None


def load_local_tokenizer(folder: str | None):
    """The model's own tokenizer when its folder has one, else None (lengths are then estimated)."""
    if folder is None or not any((Path(folder) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from qlora.model.load import load_tokenizer

    return load_tokenizer(ModelSpec(name_or_path=folder))


def recipe_path(path: Path, folder: Path) -> str:
    """`path` relative to the recipe's folder when it lies inside it (a recipe resolves it there), else absolute."""
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def body(recipe: dict) -> list[str]:
    """The recipe's YAML, one key per line with its comment."""
    lines = []
    for name, value in recipe.items():
        if isinstance(value, dict):
            lines.append(f"{name}:")
            for key, item in value.items():
                note = COMMENTS.get((name, key))
                lines.append(f"  {key}: {scalar(item)}" + (f"  # {note}" if note else ""))
        else:
            note = COMMENTS.get((name,))
            lines.append(f"{name}: {scalar(value)}" + (f"  # {note}" if note else ""))
    return lines


def header(sizing: Sizing, label: str, gpu: str, command: str, out: str) -> list[str]:
    r, est, lengths = sizing.recipe, sizing.estimate, sizing.lengths
    t, seq = r["training"], r["data"]["max_seq_len"]
    how = (
        "the model's tokenizer"
        if lengths.measured
        else f"estimated at ~{CHARS_PER_TOKEN} characters per token: no local tokenizer for a Hub or catalog name; "
        "rerun with the model's folder to measure"
    )
    phases = ", ".join(f"{name} {p['total_bytes'] / GIB:.2f} GiB" for name, p in est.phases.items())
    checkpointed = (
        f"; gradient checkpointing on {est.checkpointed_layers} of {sizing.layers} layers"
        if est.recompute_saved_pct is not None
        else ""
    )
    lines = [
        f"A recipe for {label} ({METHOD_NAME[r['quantization']['bits']]}) on a {gpu} GPU,",
        f"written by `{command}` ({DISTRIBUTION} {__version__}).",
        f"Predicted peak: {est.total / GIB:.2f} GiB of {sizing.gpu_bytes / GIB:.2f} GiB ({est.phase} step; "
        f"{phases}{checkpointed}).",
        f"Sequence length {seq}: the {PERCENTILE}th percentile of {len(lengths.tokens):,} of {lengths.rows:,} "
        f"examples is {lengths.percentile(PERCENTILE):,} tokens ({how}); longest {max(lengths.tokens):,}; "
        f"{lengths.longer_than(seq):.1%} are longer and get truncated.",
    ]
    if seq < sizing.wanted_seq:
        lines.append(f"The data asks for {sizing.wanted_seq} tokens, which do not fit this GPU at any batch size.")
    lines += [
        f"Global batch {TARGET_GLOBAL_BATCH} = batch_size {t['batch_size']} x grad_accum {t['grad_accum']}; "
        f"rank {r['lora']['r']}; optimizer {t['optimizer']}"
        + ("; checkpointed layer inputs offloaded to host RAM." if t["offload_checkpoints"] else "."),
        f"Check:  qlora profile --recipe {out}",
        f"Train:  qlora train {out}      (tracking: --set training.report_to=tensorboard)",
    ]
    return [f"# {part}" for line in lines for part in textwrap.wrap(line, 115, subsequent_indent="  ")]


METHOD_NAME = {4: "QLoRA, 4-bit base", 8: "LoRA, 8-bit base", "none": "16-bit LoRA"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise QLoraError(f"--out: {out} exists; pass --force to replace it")
    data_path = Path(args.data).expanduser()
    if not data_path.is_file():
        raise QLoraError(f"--data: file not found: {args.data} (qlora init reads a local file)")
    gpu_bytes, bf16 = gpu_target(args.gpu, "--gpu")
    name_or_path, label, folder = model_source(args.model)
    data_format = args.format or guess_format(str(data_path))
    tokenizer = load_local_tokenizer(folder)
    lengths = token_lengths(DataSpec(path=str(data_path.resolve()), format=data_format), tokenizer)
    stem = f"{label}-{data_path.stem}".replace(" ", "-")
    base = base_recipe(name_or_path, str(data_path.resolve()), data_format, args.method, args.gpu, f"runs/{stem}")
    sizing = size_recipe(base, lengths, gpu_bytes, bf16)
    recipe = dict(sizing.recipe)
    recipe["data"] = dict(recipe["data"], path=recipe_path(data_path.resolve(), out.resolve().parent))
    command = shlex.join(["qlora", "init", *argv])
    text = "\n".join([*header(sizing, label, args.gpu, command, str(out)), *body(recipe)]) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    load_recipe(out)  # what `qlora train` will read: checked now, not after minutes of loading
    print(
        f"wrote {out}: predicted peak {sizing.estimate.total / GIB:.2f} GiB of {gpu_bytes / GIB:.2f} GiB",
        file=sys.stderr,
    )
    print(
        f"next: qlora profile --recipe {out}; qlora train {out}  (install: pip install {DISTRIBUTION})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
