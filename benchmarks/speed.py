"""The speed benchmark (`make gpu-check`, and `make bench` on a GPU): qlora against the plain peft + bitsandbytes +
Trainer recipe, the same model and batches, one process per side, one side after the other, alone on the GPU.

Sides, for each sequence length (default the Llama-3.1-8B shape at 2,048 and 16,384 tokens):
    plain     from_pretrained in 4-bit NF4, prepare_model_for_kbit_training, get_peft_model, Trainer, standard loss
    lean      qlora's defaults: every decoder layer checkpointed, `training.kernels: auto` (Liger where installed)
    fit-24GB  qlora with `gradient_checkpointing: auto` planned for a 24 GB card (kernels as lean)
    lean-torch  lean with `training.kernels: none`: the torch chunked loss and transformers' kernels (where
              their time goes: its slowest ops); `make bench` only, `--sides` chooses
All: batch 1, gradient accumulation 2, LoRA r 16 on every linear layer, paged AdamW 32-bit, expandable segments on
both sides (qlora turns them on in every process; the plain side's worker imports qlora first too).

Per side: median optimizer-step time (the first step not timed), tokens/s, MFU (FLOPs per token from
`qlora.memory.flops`, stated, over the card's dense bf16 peak), peak allocated and reserved, qlora's predicted
peak beside the measured one, and the 15 slowest ops of one step (`torch.profiler`). Results:
`memory_reports/bench/cuda-<gpu>/speed.md` and `speed.json` (a `--dry-run`: a temporary folder).

    python benchmarks/speed.py [--config PATH] [--seq-lens 2048,16384] [--steps 5] [--out DIR]
    python benchmarks/speed.py --dry-run   # a tiny config on a CPU: checks the wiring (the test suite runs it)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qlora.config.environment import use_expandable_segments

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_memory

ROOT = Path(__file__).resolve().parents[1]
CONFIG_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}
SIDES = ("plain", "lean", "fit-24GB", "lean-torch")
TARGETS = {"default": 0.95, "fit-24GB": 0.70, "lean_peak": 0.55}  # qlora / plain (issue "Speed on a GPU")
# Dense bf16 tensor-core peaks (FLOP/s, without sparsity), from the vendors' data sheets; MFU is left out elsewhere.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "T4": 65e12,
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="model config.json (default: the Llama-3.1-8B shape)")
    parser.add_argument("--seq-lens", default="2048,16384")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per side (the first not timed)")
    parser.add_argument("--target-gpu", default="24GB", help="the card fit-24GB plans for")
    parser.add_argument(
        "--sides", default=",".join(SIDES), help=f"comma-separated, of {', '.join(SIDES)} (default: all)"
    )
    parser.add_argument(
        "--out", type=Path, help="default memory_reports/bench/cuda-<gpu> (a --dry-run: a temporary folder)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny config, seq 32 and 64, 2 steps, on whatever device is here"
    )
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.dry_run:
        args.seq_lens, args.steps = "32,64", 2
    args.rank, args.batch_size, args.grad_accum, args.threads = (4 if args.dry_run else 16), 1, 2, 1
    return args


def peak_flops(name: str) -> float | None:
    return next((flops for card, flops in PEAK_FLOPS.items() if card.lower() in name.lower()), None)


def profiled_step(trainer) -> list[dict]:
    """The 15 slowest ops (self time, device where there is one) of one optimizer step after the first."""
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    profiler = torch.profiler.profile(activities=activities)

    class OneStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:
                profiler.start()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                profiler.stop()

    trainer.add_callback(OneStep())
    return lambda: [
        {
            "op": e.key,
            "self_ms": round((e.self_device_time_total if cuda else e.self_cpu_time_total) / 1000, 3),
            "calls": e.count,
        }
        for e in sorted(
            profiler.key_averages(), key=lambda e: -(e.self_device_time_total if cuda else e.self_cpu_time_total)
        )[:15]
    ]


def worker(args) -> dict:
    """One side at one sequence length, in this process."""
    from qlora.config.io import atomic_write_json
    from qlora.memory.estimate import estimate_recipe, settings_inventory
    from qlora.memory.flops import step_flops_per_token
    from qlora.memory.settings import from_recipe
    from qlora.training.auto import resolve_checkpointing, resolve_kernels

    torch.set_num_threads(args.threads)
    args.steps = max(args.steps, 3)
    config = json.loads((args.weights / "config.json").read_text())
    data = bench_memory.token_data(config["vocab_size"], args.steps * args.grad_accum * args.batch_size, args.seq_len)
    out = Path(tempfile.mkdtemp(prefix="qlora-speed-"))
    recipe = None
    if args.worker == "plain":
        trainer = bench_memory.plain_trainer(args.weights, args, data, out)
    else:
        keys = {"gradient_checkpointing": "auto"} if args.worker == "fit-24GB" else {"gradient_checkpointing": True}
        if args.worker == "lean-torch":
            keys["kernels"] = "none"
        recipe = resolve_kernels(
            bench_memory.qlora_recipe(args.weights, args, out, **keys)
        )  # the default kernels: auto
        if args.worker == "fit-24GB":
            recipe = resolve_checkpointing(type(recipe)(**{**recipe.__dict__, "target_gpu": args.target_gpu}))
        trainer = bench_memory.qlora_trainer(args.weights, args, data, out, recipe)
    top_ops = profiled_step(trainer)
    timer = bench_memory.step_timer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    timed = timer.times[1:] or timer.times
    step = statistics.median(timed)
    tokens = args.seq_len * args.batch_size * args.grad_accum
    result = {
        "side": args.worker,
        "seq_len": args.seq_len,
        "step_time_s": round(step, 4),
        "step_times_s": [round(t, 4) for t in timer.times],
        "tokens_per_s": round(tokens / step, 1),
        "top_ops": top_ops(),
    }
    layers = config["num_hidden_layers"]
    if recipe is not None:
        predicted = estimate_recipe(recipe)
        layers = predicted.checkpointed_layers
        result.update(
            gradient_checkpointing_layers=layers,
            recompute_saved_pct=predicted.recompute_saved_pct,
            predicted_allocated_bytes=predicted.allocated,
            predicted_total_bytes=predicted.total,
        )
    _, _, settings = from_recipe(
        recipe or bench_memory.qlora_recipe(args.weights, args, out)
    )  # the plain side: the same model's
    inv = settings_inventory(str(args.weights / "config.json"), settings)
    flops = step_flops_per_token(inv, args.seq_len, "qlora", layers)
    result["flops_per_token"] = flops
    if torch.cuda.is_available():
        result.update(
            peak_allocated_bytes=torch.cuda.max_memory_allocated(),
            peak_reserved_bytes=torch.cuda.max_memory_reserved(),
        )
        peak = peak_flops(torch.cuda.get_device_name())
        result["mfu"] = round(flops * result["tokens_per_s"] / peak, 4) if peak else None
    atomic_write_json(args.json, result)
    return result


def run(args) -> dict:
    """Every side at every length, one fresh process each, one after the other."""
    from qlora.config.recipe import recipe_from_mapping
    from qlora.training.measure import environment, random_weights

    cuda = torch.cuda.is_available()
    rows = []
    with tempfile.TemporaryDirectory(prefix="qlora-speed-weights-") as tmp:
        config = (
            bench_memory.DRY_RUN_CONFIG
            if args.dry_run
            else (json.loads(args.config.read_text()) if args.config else CONFIG_8B)
        )
        (Path(tmp) / "config").mkdir()
        (Path(tmp) / "config" / "config.json").write_text(json.dumps(config))
        source = recipe_from_mapping({"model": {"name_or_path": str(Path(tmp) / "config")}}, for_training=False)
        folder = random_weights(
            source, None, Path(tmp) / "model"
        )  # in the compute dtype, on the GPU: both sides load them
        for seq in (int(s) for s in args.seq_lens.split(",")):
            for side in sides(args.sides):
                target = Path(tmp) / f"{side}-{seq}.json"
                command = [
                    sys.executable,
                    __file__,
                    "--worker",
                    side,
                    "--weights",
                    str(folder),
                    "--seq-len",
                    str(seq),
                    "--steps",
                    str(args.steps),
                    "--target-gpu",
                    args.target_gpu,
                    "--json",
                    str(target),
                ] + (["--dry-run"] if args.dry_run else [])
                started = time.perf_counter()
                done = subprocess.run(command, capture_output=True, text=True)
                row = (
                    json.loads(target.read_text())
                    if done.returncode == 0
                    else {"side": side, "seq_len": seq, "error": done.stderr[-500:]}
                )
                row["wall_s"] = round(time.perf_counter() - started, 1)
                rows.append(row)
                print(f"speed: {side} at {seq}: {row.get('step_time_s', 'error')} s/step", file=sys.stderr, flush=True)
    return {
        "rows": rows,
        "ratios": ratios(rows),
        "targets": TARGETS,
        "dry_run": args.dry_run,
        "environment": environment("cuda" if cuda else "cpu"),
    }


def sides(text: str) -> list[str]:
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SIDES]
    if unknown or not chosen:
        raise SystemExit(
            f"error: --sides: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(SIDES)}"
        )
    return chosen


def ratios(rows: list[dict]) -> dict:
    """qlora / plain, per length: step time of each qlora side, and the lean side's peak."""
    out = {}
    for seq in sorted({r["seq_len"] for r in rows}):
        by = {r["side"]: r for r in rows if r["seq_len"] == seq and "step_time_s" in r}
        if "plain" not in by:
            continue
        entry = {
            f"{side}_step_time": round(by[side]["step_time_s"] / by["plain"]["step_time_s"], 4)
            for side in SIDES[1:]
            if side in by
        }
        if "lean" in by and by["plain"].get("peak_allocated_bytes"):
            entry["lean_peak"] = round(by["lean"]["peak_allocated_bytes"] / by["plain"]["peak_allocated_bytes"], 4)
        out[str(seq)] = entry
    return out


def to_markdown(result: dict, command: str) -> str:
    gb = lambda n: f"{n / 1e9:.2f}" if n else "—"
    lines = [
        f"Made by `{command}`.",
        "",
        "| side | seq | s / optimizer step | tokens/s | MFU | FLOPs/token | checkpointed layers | "
        "peak allocated GB | peak reserved GB | predicted allocated GB | predicted total GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(
                f"| {r['side']} | {r['seq_len']:,} | error: {r['error'].splitlines()[-1] if r['error'] else '?'} |"
            )
            continue
        lines.append(
            f"| {r['side']} | {r['seq_len']:,} | {r['step_time_s']:.3f} | {r['tokens_per_s']:,.0f} | "
            f"{r.get('mfu') or '—'} | "
            f"{r['flops_per_token'] / 1e9:.1f} G | {r.get('gradient_checkpointing_layers', 'all')} | "
            f"{gb(r.get('peak_allocated_bytes'))} | "
            f"{gb(r.get('peak_reserved_bytes'))} | {gb(r.get('predicted_allocated_bytes'))} | "
            f"{gb(r.get('predicted_total_bytes'))} |"
        )
    lines += [
        "",
        "Ratios (qlora / plain): "
        + json.dumps(result["ratios"])
        + "; targets: default ≤ 0.95, fit-24GB ≤ 0.70, lean peak ≤ 0.55.",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in result["environment"].items()),
        "",
        "Slowest ops of one step per side:",
        "",
    ]
    for r in result["rows"]:
        ops = ", ".join(f"{o['op']} {o['self_ms']} ms" for o in r.get("top_ops", [])[:15])
        lines.append(f"- {r['side']} at {r['seq_len']:,}: {ops}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    import shlex

    from qlora.config.io import atomic_write_json, atomic_write_text

    use_expandable_segments()  # on both sides, before CUDA initialises (workers inherit it)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "error: the speed benchmark measures a GPU; run with --dry-run to check the wiring on a CPU",
            file=sys.stderr,
        )
        return 1
    result = run(args)
    if args.out is None:
        slug = (
            "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name().lower())
            if not args.dry_run
            else ""
        )
        args.out = (
            Path(tempfile.mkdtemp(prefix="qlora-speed-dry-run-"))
            if args.dry_run
            else ROOT / "memory_reports" / "bench" / f"cuda-{slug}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "speed.json", result)
    atomic_write_text(args.out / "speed.md", to_markdown(result, shlex.join(["python", "benchmarks/speed.py", *argv])))
    print(f"wrote {args.out / 'speed.md'} and speed.json", file=sys.stderr)
    return 0 if all("error" not in r for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
