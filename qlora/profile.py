"""`qlora profile` / `python -m qlora.profile`: memory tables, the fit planner and measured peaks.

With no arguments: the headline table, Llama-2 7B/13B/70B × full FT, LoRA, QLoRA at seq 512,
batch 1, r 64, paged AdamW 32-bit and gradient checkpointing, predicted for a bf16 GPU.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from qlora.config.errors import QLoraError, run_cli
from qlora.config.gpus import gpu_target, parse_gpu_list
from qlora.config.precision import default_device
from qlora.config.recipe import (
    ATTN_IMPLEMENTATIONS,
    DISTRIBUTED_OFFLOADS,
    DISTRIBUTED_STRATEGIES,
    LOSSES,
    OPTIMIZERS,
    TASKS,
    Recipe,
    load_recipe,
    recipe_from_mapping,
)
from qlora.memory import report
from qlora.memory.estimate import estimate, settings_inventory
from qlora.memory.planner import CLI_KEYS, RECIPE_KEYS, cards_needed, plan, predict
from qlora.memory.report import Result, Run
from qlora.memory.settings import DEFAULT_METHODS, Settings, from_recipe, parse_methods
from qlora.training.auto import resolve_kernels
from qlora.training.measure import environment, measure, random_weights

HEADLINE_MODELS = ("llama-2-7b", "llama-2-13b", "llama-2-70b")
SETTING_FLAGS = (
    "seq_len",
    "batch_size",
    "rank",
    "optimizer",
    "no_checkpointing",
    "attn",
    "task",
    "num_labels",
    "methods",
    "loss",
    "eval_batch_size",
)
MEASURE_RAM_SHARE = 0.8  # --measure on a CPU refuses a model whose step needs more than this share of the free RAM


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="qlora profile", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="NAME|PATH",
        help="catalog name (llama-2-7b, …), catalogued Hub id, model folder or config.json (repeatable)",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="RECIPE",
        help="profile what this recipe trains: its model, method and settings (repeatable)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key of every run, e.g. --set training.gradient_checkpointing=auto (with --gpu: "
        "the fewest checkpointed layers that fit it)",
    )
    parser.add_argument("--methods", help="comma-separated: full, lora, lora-8bit, qlora (default full,lora,qlora)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default 512)")
    parser.add_argument("--batch-size", type=int, help="sequences per micro-batch (default 1)")
    parser.add_argument("--rank", type=int, help="LoRA rank (default 64)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help="default paged_adamw_32bit")
    parser.add_argument("--no-checkpointing", action="store_true", help="profile without gradient checkpointing")
    parser.add_argument("--attn", choices=ATTN_IMPLEMENTATIONS, help="attention implementation (default auto)")
    parser.add_argument(
        "--task",
        choices=TASKS,
        help="causal_lm (default) or classification (a sequence classifier, head trained in full)",
    )
    parser.add_argument("--num-labels", type=int, help="classification: the head's outputs (default 2)")
    parser.add_argument("--loss", choices=LOSSES, help="causal LM loss: chunked (default, no full logits) or standard")
    parser.add_argument("--eval-batch-size", type=int, help="the eval step's batch (default: --batch-size)")
    parser.add_argument(
        "--gpu",
        action="append",
        metavar="GPU",
        help="plan for this GPU: a preset (t4, 3090, 4090, a100-80gb, h100, …) or a size with its unit "
        "(24GB = 24e9 bytes, 24GiB); repeatable or comma-separated. What fits, how far, what to change",
    )
    parser.add_argument(
        "--gpus",
        metavar="N|auto",
        help="one GPU's share of N (default 1); auto (with --gpu): the fewest GPUs per strategy",
    )
    parser.add_argument(
        "--strategy",
        choices=DISTRIBUTED_STRATEGIES,
        help="how the GPUs divide the model (default ddp, or the recipe's)",
    )
    parser.add_argument(
        "--offload",
        choices=DISTRIBUTED_OFFLOADS,
        help="fsdp/zero3: sharded state in host RAM (default none, or the recipe's)",
    )
    parser.add_argument(
        "--measure", action="store_true", help="also run real training steps here and report measured peaks"
    )
    parser.add_argument(
        "--format", choices=("table", "markdown", "json"), default="table", help="what to print (default table)"
    )
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="also write memory.md, memory.json and a PNG per model here"
    )
    return parser.parse_args(argv)


# Flags that set a recipe key (`qlora profile` builds a recipe from them: one schema, one set of checks).
FLAG_KEYS = {
    "seq_len": "data.max_seq_len",
    "batch_size": "training.batch_size",
    "rank": "lora.r",
    "optimizer": "training.optimizer",
    "attn": "model.attn_implementation",
    "task": "task",
    "loss": "training.loss",
    "eval_batch_size": "training.eval_batch_size",
    "gpus": "distributed.gpus",
    "strategy": "distributed.strategy",
    "offload": "distributed.offload",
}
SHARDING_FLAGS = ("gpus", "strategy", "offload")


def flag_overrides(args: argparse.Namespace, flags) -> list[str]:
    """The given flags among `flags` as `--set` overrides of the recipe keys they stand for."""
    overrides = [f"{FLAG_KEYS[flag]}={getattr(args, flag)}" for flag in flags if getattr(args, flag) is not None]
    if "seq_len" in flags and args.no_checkpointing:
        overrides.append("training.gradient_checkpointing=false")
    return overrides


def flag_recipe(build, args: argparse.Namespace):
    """`build()` (a recipe from flags), with an error about a recipe key said in the flag that set it."""
    try:
        return build()
    except QLoraError as exc:
        message = str(exc)
        for flag, key in FLAG_KEYS.items():
            if getattr(args, flag, None) is not None:
                message = message.replace(key, f"--{flag.replace('_', '-')}")
        raise QLoraError(message) from None


def sharding_flags(args: argparse.Namespace) -> None:
    """--gpus: a number (or 'auto', searched later with --gpu)."""
    if args.gpus not in (None, "auto") and not args.gpus.isdigit():
        raise QLoraError(f"--gpus: expected a number of GPUs or 'auto', got '{args.gpus}'")
    if args.gpus == "auto" and not args.gpu:
        raise QLoraError("--gpus auto: searches for the fewest GPUs of a size; give it with --gpu, e.g. --gpu 24GB")


@dataclass(frozen=True)
class Job:
    """One run to profile: a model with its methods and settings, or a recipe's own."""

    label: str
    model: str
    methods: tuple[str, ...]
    settings: Settings
    source: Recipe  # what the settings were derived from (what --measure builds)
    recipe: str | None = None
    target_gpu: str | None = None


def jobs(args: argparse.Namespace) -> list[Job]:
    """Every run asked for, each checked before any is profiled."""
    if args.recipe and not args.model:
        given = [f"--{f.replace('_', '-')}" for f in SETTING_FLAGS if getattr(args, f) not in (None, False)]
        if given:
            raise QLoraError(
                f"{', '.join(given)}: a --recipe sets its own method and settings; change them with --set KEY=VALUE"
            )
    if args.num_labels is not None and args.task != "classification":
        raise QLoraError("--num-labels: sizes a classifier's head; add --task classification")
    if args.num_labels is not None and args.num_labels < 2:
        raise QLoraError(f"--num-labels: a classifier needs at least 2 labels, got {args.num_labels}")
    sharding_flags(args)
    methods = parse_methods(args.methods) if args.methods is not None else DEFAULT_METHODS
    models = args.model or ([] if args.recipe else list(HEADLINE_MODELS))
    return [model_job(model, methods, args) for model in models] + [recipe_job(p, args) for p in args.recipe]


def model_job(model: str, methods: tuple[str, ...], args: argparse.Namespace) -> Job:
    """A --model run: the recipe defaults (the headline settings) changed by the flags given."""
    base = {
        "model": {"name_or_path": model},
        **({"data": {"format": "classification"}} if args.task == "classification" else {}),
    }
    overrides = (
        flag_overrides(args, [f for f in FLAG_KEYS if f not in ("gpus",) or args.gpus != "auto"]) + args.overrides
    )
    recipe = flag_recipe(lambda: recipe_from_mapping(base, overrides, for_training=False), args)
    _, _, settings = from_recipe(recipe, num_labels=args.num_labels or 2)
    return Job(model, model, methods, settings, recipe)


def recipe_job(path: str, args: argparse.Namespace) -> Job:
    """A --recipe run: its own model, method and settings; the launcher's flags (--gpus, --strategy, --offload) apply."""
    sharding = flag_overrides(args, [f for f in SHARDING_FLAGS if f != "gpus" or args.gpus != "auto"])
    recipe = flag_recipe(lambda: load_recipe(path, [*args.overrides, *sharding]), args)
    model, method, settings = from_recipe(recipe)
    return Job(Path(path).stem, model, (method,), settings, recipe, str(path), recipe.target_gpu)


def profile(args: argparse.Namespace) -> list:
    """Every run: predictions, the fit plan for --gpu (or a recipe's target_gpu), measured peaks."""
    gpus = parse_gpu_list(args.gpu)
    device = default_device() if args.measure else "cuda"  # without --measure: the GPU being planned for
    runs = []
    for job in jobs(args):
        source = resolve_kernels(job.source) if args.measure else job.source  # measured here: what runs here
        settings = job.settings.replace(device=device, kernels=source.training.kernels)
        inv = settings_inventory(job.model, settings)
        results = [Result(estimate(inv, method, settings)) for method in job.methods]
        targets = gpus or ([gpu_target(job.target_gpu)] if job.target_gpu else [(None, True)])
        if args.measure and settings.gpus > 1:
            raise QLoraError(
                "--measure: measures one process on this machine; per-GPU shares (--gpus, distributed.gpus) "
                "are predictions only: measure with --gpus 1"
            )
        for i, (target, bf16) in enumerate(targets):  # one run per GPU, sharing the predictions (and the measurement)
            card = (
                settings.replace(native_bf16=bf16) if device == "cuda" else settings
            )  # its dtype: the bytes are the same
            fit_plan = (
                plan(inv, job.methods, card, target, RECIPE_KEYS if job.recipe else CLI_KEYS) if target else None
            )
            if target and settings.checkpoint_layers == "auto":  # the fewest checkpointed layers that fit this GPU
                results = [Result(predict(inv, method, card, target)) for method in job.methods]
            run = Run(job.label if job.recipe else inv.name, inv.name, card, results, fit_plan, job.recipe)
            if args.gpus == "auto":
                run.cards = {m: cards_needed(inv, m, settings, target) for m in job.methods}
            if args.measure and i == 0:
                measure_run(run, source, device)
            elif args.measure:
                run.environment = runs[-1].environment
            runs.append(run)
    return runs


def measure_run(run, recipe: Recipe, device: str) -> None:
    """Measure every method of `run` (what `recipe` sets) here, refusing models this machine cannot hold."""
    check_measurable(run, device)
    labels = run.settings.num_labels if run.settings.task == "classification" else None
    with tempfile.TemporaryDirectory(prefix="qlora-weights-") as folder:  # one random model for every method
        weights = random_weights(recipe, labels, Path(folder))
        for result in run.results:
            print(f"measuring {run.label} {result.estimate.method} on {device} …", file=sys.stderr, flush=True)
            result.measured = measure(recipe, result.estimate.method, labels, weights)
    run.environment = environment(device)


def check_measurable(run, device: str) -> None:
    """A 7B on a laptop CPU would swap for an hour: say so before building anything."""
    ram = int(psutil.virtual_memory().available * MEASURE_RAM_SHARE)
    build = 4 * run.results[0].estimate.parameters  # the random fp32 model, made in RAM and saved before loading
    step = max(r.estimate.allocated for r in run.results)
    needs = [("RAM", build, ram)] + (
        [("GPU", step, torch.cuda.mem_get_info()[0])] if device == "cuda" else [("RAM", step, ram)]
    )
    for where, need, free in needs:
        if need > free:
            raise QLoraError(
                f"--measure: {run.label} needs about {need / 2**30:.1f} GiB of {where} and {free / 2**30:.1f} GiB "
                "is free; measure a smaller config.json"
            )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    runs = profile(args)
    command = shlex.join(["qlora", "profile", *argv])  # recorded in the Markdown, to remake the report
    if args.format == "json":
        print(json.dumps(report.to_json(runs), indent=2))
    elif args.format == "markdown":
        print(report.to_markdown(runs, command))
    else:
        report.print_table(runs)
    if args.out:
        for path in report.write(runs, args.out, command):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
