"""`make bench`: the same model, data and settings trained by qlora and by the plain recipe most
tutorials use (peft + bitsandbytes + Trainer: `prepare_model_for_kbit_training`, the standard loss),
side by side: peak memory, time per optimizer step and their ratios.

Peak memory is what tensors hold: on a CPU qlora's tensor-level tracker (`qlora.training.measure.PeakTracker`,
which also sees bitsandbytes' temporaries), on a GPU `torch.cuda.max_memory_allocated`. Both sides get
random weights from one config.json (default: a Llama shape with Llama-3's 128,256-token vocabulary,
small enough for a 2-core CPU), the same random token batches, LoRA r 16 on every linear layer of a
4-bit NF4 base, paged AdamW 32-bit, gradient checkpointing, gradient accumulation 2.
Results: `memory_reports/bench/bench.md` and `bench.json`, with the machine and library versions.

    python benchmarks/bench_memory.py [--config PATH] [--seq-len 2048] [--steps 4] [--out DIR]
    python benchmarks/bench_memory.py --dry-run   # a tiny config, two steps: checks the wiring (tests run it)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "benchmarks" / "configs" / "llama-h256-v128k" / "config.json"
DRY_RUN_CONFIG = {  # the profiler tests' tiny Llama
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}
TARGETS = {"peak": 0.5, "step_time": 1.10}  # qlora / plain, from issue 11


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="model config.json (random weights)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps per side (the first is a warm-up, not timed)"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (1: on a shared CPU, spinning OpenMP threads make timings noisy)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="default memory_reports/bench (a --dry-run: a temporary folder, the committed results stay)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny config, seq 32, 2 steps: checks the wiring in seconds"
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.seq_len, args.steps, args.rank = 32, 2, 4
    if args.out is None:
        args.out = (
            Path(tempfile.gettempdir()) / "qlora-bench-dry-run" if args.dry_run else ROOT / "memory_reports" / "bench"
        )
    return args


def save_random_model(config_path: Path | None, folder: Path) -> Path:
    """Random weights from the config (qlora's `random_weights`), saved once so both sides load the same model."""
    from qlora.config.recipe import recipe_from_mapping
    from qlora.training.measure import random_weights

    if config_path is None:
        folder.mkdir(parents=True, exist_ok=True)
        config_path = folder / "config.json"
        config_path.write_text(json.dumps(DRY_RUN_CONFIG))
    return random_weights(
        recipe_from_mapping({"model": {"name_or_path": str(config_path)}}, for_training=False), None, folder
    )


def token_data(vocab: int, rows: int, seq: int):
    """Random token rows, labels = ids (every token trained), as a datasets.Dataset."""
    from datasets import Dataset

    ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def qlora_recipe(folder: Path, args, out: Path, **training):
    """The recipe qlora's side trains (`training`: more keys of its training section)."""
    from qlora.config.recipe import recipe_from_mapping

    return recipe_from_mapping(
        {
            "model": {"name_or_path": str(folder)},
            "data": {"path": str(folder)},
            "output_dir": str(out),
            "lora": {"r": args.rank, "alpha": 2 * args.rank, "targets": "all-linear"},
            "training": {
                "batch_size": args.batch_size,
                "grad_accum": args.grad_accum,
                "max_steps": args.steps,
                "logging_steps": 1000,
                "save_steps": 1000,
                "warmup_ratio": 0.0,
                "loss": "chunked",
                **training,
            },
        }
    )


def qlora_trainer(folder: Path, args, data, out: Path, recipe=None):
    """qlora's own path: build_model (4-bit base, LoRA, checkpointing, chunked loss) and its TrainingArguments."""
    from types import SimpleNamespace

    from transformers import Trainer, default_data_collator

    from qlora.model.build import build_model
    from qlora.training.run import training_arguments

    recipe = recipe or qlora_recipe(folder, args, out)
    loaded = build_model(recipe, tokenizer=SimpleNamespace(pad_token_id=0))
    training_args = training_arguments(recipe, loaded.compute_dtype, out, has_eval=False)
    training_args.disable_tqdm = True
    return Trainer(model=loaded.model, args=training_args, train_dataset=data, data_collator=default_data_collator)


def plain_trainer(folder: Path, args, data, out: Path):
    """The tutorials' recipe: from_pretrained in 4-bit, prepare_model_for_kbit_training, get_peft_model, Trainer."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype,
        device_map={"": 0} if torch.cuda.is_available() else None,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        ),
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank,
            lora_alpha=2 * args.rank,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )
    training_args = TrainingArguments(
        output_dir=str(out),
        optim="paged_adamw_32bit",
        learning_rate=2e-4,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_grad_norm=0.3,
        bf16=dtype == torch.bfloat16,
        save_strategy="no",
        logging_steps=1000,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        dataloader_pin_memory=False,
    )
    return Trainer(model=model, args=training_args, train_dataset=data, data_collator=default_data_collator)


def step_timer():
    """A Trainer callback recording each optimizer step's wall time."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def run_side(make_trainer) -> dict:
    """Train one side; its peak tensor bytes and median optimizer-step time (warm-up step excluded)."""
    from qlora.training.measure import PeakTracker, model_tensors

    trainer = make_trainer()
    timer = step_timer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
        peak = torch.cuda.max_memory_allocated()
    else:
        tracker = PeakTracker()
        for tensor, _ in model_tensors(trainer.model):
            tracker.track(tensor)
        with tracker:
            trainer.train()
        peak = tracker.peak
    timed = timer.times[1:] or timer.times
    result = {
        "peak_bytes": int(peak),
        "step_time_s": round(statistics.median(timed), 3),
        "step_times_s": [round(t, 3) for t in timer.times],
        "train_loss": round(float(trainer.state.log_history[-1].get("train_loss", float("nan"))), 4),
    }
    del trainer
    gc.collect()
    return result


def bench(args) -> dict:
    import warnings

    from transformers.utils import logging as hf_logging

    from qlora.training.measure import environment

    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        folder = save_random_model(None if args.dry_run else args.config, Path(tmp) / "model")
        vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
        data = token_data(vocab, args.steps * args.grad_accum * args.batch_size, args.seq_len)
        sides = {
            "plain": run_side(lambda: plain_trainer(folder, args, data, Path(tmp) / "plain")),
            "qlora": run_side(lambda: qlora_trainer(folder, args, data, Path(tmp) / "qlora")),
        }
        config = json.loads((folder / "config.json").read_text())
    return {
        "settings": {
            "config": "dry-run tiny Llama"
            if args.dry_run
            else str(args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config),
            "hidden_size": config["hidden_size"],
            "num_hidden_layers": config["num_hidden_layers"],
            "vocab_size": vocab,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "grad_accum": args.grad_accum,
            "steps": args.steps,
            "lora_r": args.rank,
            "optimizer": "paged_adamw_32bit",
            "threads": args.threads,
        },
        "sides": sides,
        "ratios": {
            "peak": round(sides["qlora"]["peak_bytes"] / sides["plain"]["peak_bytes"], 4),
            "step_time": round(sides["qlora"]["step_time_s"] / sides["plain"]["step_time_s"], 4),
        },
        "targets": TARGETS,
        "peak_measured_by": "torch.cuda.max_memory_allocated"
        if device == "cuda"
        else "qlora.training.measure.PeakTracker (CPU tensor storages)",
        "environment": environment(device),
    }


def to_markdown(result: dict, command: str) -> str:
    s, sides, ratios = result["settings"], result["sides"], result["ratios"]
    mib = lambda n: f"{n / 2**20:,.1f}"
    lines = [
        f"Made by `{command}`.",
        "",
        f"**{s['config']}**: hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, vocabulary "
        f"{s['vocab_size']:,}; seq {s['seq_len']:,} × batch {s['batch_size']}, "
        f"gradient accumulation {s['grad_accum']}, {s['steps']} optimizer steps (the first not timed), "
        f"QLoRA NF4 r {s['lora_r']} all-linear, {s['optimizer']}, gradient checkpointing, {s['threads']} threads.",
        "",
        "| | peak memory (MiB) | time per optimizer step (s) | train loss |",
        "|---|---:|---:|---:|",
        "| plain peft + bitsandbytes + Trainer (`prepare_model_for_kbit_training`, standard loss) | "
        f"{mib(sides['plain']['peak_bytes'])} | "
        f"{sides['plain']['step_time_s']:.2f} | {sides['plain']['train_loss']} |",
        f"| qlora (`training.loss: chunked`) | {mib(sides['qlora']['peak_bytes'])} | "
        f"{sides['qlora']['step_time_s']:.2f} | {sides['qlora']['train_loss']} |",
        f"| **qlora / plain** | **{ratios['peak']:.3f}** (target ≤ {TARGETS['peak']}) | **{ratios['step_time']:.3f}** "
        f"(target ≤ {TARGETS['step_time']}) | |",
        "",
        f"Peak memory: {result['peak_measured_by']}.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in result["environment"].items()),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    import shlex

    from qlora.config.io import atomic_write_json, atomic_write_text

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    result = bench(args)
    command = shlex.join(["python", "benchmarks/bench_memory.py", *argv])
    markdown = to_markdown(result, command)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "bench.json", result)
    atomic_write_text(args.out / "bench.md", markdown)
    print(markdown)
    print(f"wrote {args.out / 'bench.md'} and bench.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
