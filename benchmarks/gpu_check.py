"""`make gpu-check`: the one prepared GPU check, about 9 minutes on one GPU (budgets in BUDGET_S).

What no CPU test can show, measured on the GPU it runs on, each section under its own time budget
(a point that does not fit is recorded as skipped, never silently dropped):

1. environment: GPU name, `total_memory`, compute capability, driver, CUDA and library versions;
2. overheads: the CUDA context (device memory in use beyond PyTorch's reserved segments once CUDA,
   cuBLAS, SDPA and bitsandbytes' 4-bit kernels are loaded, in a fresh process) and the allocator
   slack (over the memory points: reserved / allocated at the peak - 1). They are written to
   `overheads.json`, which `qlora/memory/overheads.py` reads from `qlora/memory/measured/cuda-<gpu>/` (copy it
   there: package data) and makes the profiler use instead of its two
   named assumptions (CUDA_CONTEXT_BYTES, ALLOCATOR_SLACK there); qlora runs with expandable segments;
3. memory: `qlora.training.measure` for QLoRA and LoRA on Llama-shaped ~1B / 3B / 8B configs with
   random weights at 2,048 tokens, the long-context recipe's keys on the 8B shape at 32,768 and 80,000
   tokens, each long-context feature (FEATURES) whose recipe key exists, a mixture-of-experts shape
   (MOE_CONFIG: QLoRA and LoRA) and one QLoRA point per other family (FAMILY_CONFIGS: Gemma 3 4B's text model,
   sliding windows); one process per point; predicted
   `allocated_bytes` vs measured `max_memory_allocated` (+ paged optimizer states) with the % error
   (target <= 3 %), reserved and NVML's device use per point; the random weights saved once per config;
4. training: `qlora.training.run` for a few steps with each optimizer on a generated dataset: tokens/s and
   the labelled peaks of metrics.json;
5. merge (float16 and bfloat16) and generate once, on the last training run (`qlora merge`, `qlora generate`);
6. speed: benchmarks/speed.py at 2,048 tokens on the 8B shape (the plain peft + bitsandbytes + Trainer
   recipe, qlora lean and qlora fit-24GB, one process each): tokens/s, MFU, peaks, the slowest ops;
7. gpu tests: the suite's `gpu`-marked tests (GPU_TESTS), which every other run skips.

Everything lands in `memory_reports/measured/cuda-<gpu>/` (gpu_check.json, gpu_check.md,
overheads.json, speed/), or in `--out DIR`.

`--dry-run` runs the same wiring on a CPU with tiny configs and steps, in one process, into a
temporary folder (or `--out`), in well under a minute; the test suite runs it
(tests/test_gpu_check.py). It writes no overheads.json: a CPU measures no CUDA context.

On a GPU machine without network, install the wheels of bitsandbytes, datasets and liger-kernel
(downloaded elsewhere with `pip download --only-binary=:all:` for its platform) into a folder on PYTHONPATH
and run `make gpu-check PY=python3 GPU_CHECK_DEPS=`: the empty GPU_CHECK_DEPS skips the Makefile's venv
install, which needs network; torch, transformers, peft, accelerate and pynvml are expected on the machine.
Copy the folder it wrote (its name is printed first) to memory_reports/measured/cuda-<gpu>/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # runs from a checkout without installing the package

# --- the tables the integrator extends -------------------------------------------------------------

_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 3,
}
CONFIGS = {  # Llama-3.2 1B and 3B shapes, Llama-3.1 8B
    "llama-1b": {
        **_LLAMA,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "llama-3b": {
        **_LLAMA,
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 28,
        "num_attention_heads": 24,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    },
    "llama-8b": {
        **_LLAMA,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}
DRY_CONFIGS = {  # the same wiring on a CPU in seconds; vocabulary >= the demo tokenizer's 2,998 for the training run
    "tiny-a": {
        **_LLAMA,
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 3000,
        "tie_word_embeddings": False,
    },
    "tiny-b": {
        **_LLAMA,
        "hidden_size": 96,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "head_dim": 24,
        "vocab_size": 3000,
        "tie_word_embeddings": True,
    },
    "tiny-c": {
        **_LLAMA,
        "hidden_size": 128,
        "intermediate_size": 344,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 16,
        "vocab_size": 3000,
        "tie_word_embeddings": False,
    },
}
# The mixture-of-experts point (qlora.ops.experts: NF4 expert stacks, split expert LoRA): a Qwen3-MoE shape, QLoRA
# and LoRA at the longest sequence, in its own process per point as the others.
MOE_NAME = "qwen3-moe"
MOE_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 1024,
    "intermediate_size": 3072,
    "moe_intermediate_size": 384,
    "num_experts": 64,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "vocab_size": 32768,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
DRY_MOE_CONFIG = {
    **MOE_CONFIG,
    "hidden_size": 64,
    "moe_intermediate_size": 48,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 3000,
}
_GEMMA3 = {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 8192,
    "sliding_window_pattern": 6,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "tie_word_embeddings": True,
}
# Families beside the Llama grid, one QLoRA point each at the longest baseline sequence: Gemma 3 4B's text model
# (its 1,024-token sliding windows through qlora's sdpa, no tokens x tokens mask; QK-norm; 262k vocabulary)
FAMILY_CONFIGS = {
    "gemma-3-4b": {
        **_GEMMA3,
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "num_hidden_layers": 34,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 256,
        "query_pre_attn_scalar": 256,
        "sliding_window": 1024,
        "vocab_size": 262208,
    },
}
DRY_FAMILY_CONFIGS = {
    "tiny-gemma3": {
        **_GEMMA3,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "full_attention"],
        "vocab_size": 3000,
    },
}
METHODS = ("qlora", "lora")
SEQ_LENS, DRY_SEQ_LENS = (2048,), (32, 64)
RANK, DRY_RANK = 64, 8
# (label, recipe keys) of the long-context work: measured at the longest sequence only; a row whose key
# the recipe does not have (yet) is recorded as skipped.
# The baseline is the step without the long-context work (transformers' loss, untiled MLP, no offload);
# each FEATURES row adds its keys to it.
BASELINE = {"training.loss": "standard", "training.mlp_tiles": 1, "training.offload_checkpoints": False}
FEATURES = [
    ("chunked loss", {"training.loss": "chunked"}),
    ("tiled MLP", {"training.mlp_tiles": "auto"}),
    ("offloaded checkpoints", {"training.offload_checkpoints": True}),
    (
        "all long-context",
        {"training.loss": "chunked", "training.mlp_tiles": "auto", "training.offload_checkpoints": True},
    ),
    (
        "no Liger kernels",
        {"training.kernels": "none"},
    ),  # the other rows run Liger's where it is installed (the default)
]
LONG_CONTEXT_RECIPE = ROOT / "recipes" / "llama-3.1-8b-long-context-24gb.yaml"  # its keys, on the 8B shape
LONG_SEQ_LENS, DRY_LONG_SEQ_LENS = (32768, 80000), (64, 128)
TARGET_ERROR_PCT = 3.0
# Seconds per section. A point already running finishes past its budget (an 8B point takes ~30 s), so
# the budgets add up to ~8.75 minutes to end within 9 (the memory parts run in `run_memory`'s order:
# a tight budget cuts the families and feature rows, not the baseline, MoE or long-context points).
BUDGET_S = {"overheads": 45, "memory": 200, "training": 50, "merge": 50, "speed": 150, "gpu tests": 30}
GPU_TESTS = [
    "tests/training/test_measure.py",
    "tests/training/test_distributed.py",
]  # where `@pytest.mark.gpu` tests live
SPEED_ARGS = [
    "--seq-lens",
    "2048",
    "--steps",
    "4",
    "--sides",
    "plain,lean,fit-24GB",
]  # the 8B shape; 16,384 tokens too with `make bench` on a GPU
TRAIN = {"steps": 8, "batch_size": 8, "max_seq_len": 512, "model": "llama-1b", "rows": 4096}
DRY_TRAIN = {"steps": 2, "batch_size": 2, "max_seq_len": 64, "model": "tiny-a", "rows": 128}
DEMO_TOKENIZER = ROOT / "qlora" / "demo" / "assets" / "base-model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@dataclasses.dataclass
class Plan:
    """What one invocation runs: the GPU grid or the dry run's tiny one."""

    dry: bool
    configs: dict
    seq_lens: tuple
    rank: int
    train: dict
    work: Path
    isolate: bool  # a process per config and per training run (the GPU default: bnb never frees paged buffers)
    families: dict = dataclasses.field(default_factory=dict)  # other families' configs: one QLoRA point each

    @classmethod
    def make(cls, dry: bool, work: Path, isolate: bool | None = None) -> Plan:
        isolate = not dry if isolate is None else isolate
        if dry:
            return cls(True, DRY_CONFIGS, DRY_SEQ_LENS, DRY_RANK, DRY_TRAIN, work, isolate, DRY_FAMILY_CONFIGS)
        return cls(False, CONFIGS, SEQ_LENS, RANK, TRAIN, work, isolate, FAMILY_CONFIGS)


# --- 1. environment --------------------------------------------------------------------------------


def environment() -> dict:
    import torch

    from qlora.training.measure import environment as versions

    env = versions("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(total_memory=int(props.total_memory), compute_capability=f"{props.major}.{props.minor}")
    env["platform"] = platform.platform()
    return env


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the measured folder's name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --- 2. overheads ----------------------------------------------------------------------------------


def nvml_used() -> int | None:
    """Device memory in use per NVML (before CUDA is initialised here), None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except Exception:  # no NVML: the context is taken from cudaMemGetInfo alone (a dedicated GPU assumed)
        return None


def context_worker() -> dict:
    """CUDA context in a fresh process: device memory in use beyond PyTorch's reserved segments after
    loading what a QLoRA step uses (cuBLAS, SDPA forward and backward, bitsandbytes' 4-bit matmul)."""
    before = nvml_used()
    import bitsandbytes as bnb
    import torch

    from qlora.config.precision import resolve_compute_dtype

    torch.cuda.init()
    dtype = resolve_compute_dtype("auto", "cuda")  # fp16 on a T4 / V100, bf16 from compute capability 8.0
    x = torch.randn(1024, 1024, device="cuda", dtype=dtype, requires_grad=True)
    (x @ x).float().sum().backward()
    q = torch.randn(1, 8, 128, 64, device="cuda", dtype=dtype, requires_grad=True)
    torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).float().sum().backward()
    layer = bnb.nn.Linear4bit(1024, 1024, bias=False, compute_dtype=dtype, quant_type="nf4").cuda()
    layer(x.detach().requires_grad_()).float().sum().backward()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    after, reserved = nvml_used(), torch.cuda.memory_reserved()
    if before is not None and after is not None:
        used, how = after - before, "NVML used after - before, less torch.cuda.memory_reserved()"
    else:
        used, how = (
            total - free,
            "cudaMemGetInfo total - free, less torch.cuda.memory_reserved() (dedicated GPU assumed)",
        )
    return {
        "cuda_context_bytes": int(used - reserved),
        "device_used_bytes": int(used),
        "reserved_bytes": int(reserved),
        "method": how,
    }


# --- 3. memory -------------------------------------------------------------------------------------


def feature_rows() -> list[tuple[str, dict, str | None]]:
    """(label, recipe keys, reason skipped or None): the baseline, then every FEATURES row."""
    from qlora.config.recipe import all_keys

    fields = set(all_keys())
    rows = [("baseline", {k: v for k, v in BASELINE.items() if k in fields}, None)]
    for label, changes in FEATURES:
        missing = sorted(set(changes) - fields)
        rows.append(
            (
                label,
                {**rows[0][1], **changes},
                f"the recipe has no key {', '.join(missing)} (not in this checkout)" if missing else None,
            )
        )
    return rows


def long_context_keys() -> dict:
    """The long-context recipe's memory keys, as recipe overrides (its model replaced by the 8B shape's config)."""
    from qlora.config.recipe import load_recipe

    r = load_recipe(LONG_CONTEXT_RECIPE)
    return {
        "lora.r": r.lora.r,
        "lora.dropout": r.lora.dropout,
        "training.optimizer": r.training.optimizer,
        "training.loss": r.training.loss,
        "training.mlp_tiles": r.training.mlp_tiles,
        "training.offload_checkpoints": r.training.offload_checkpoints,
        "training.batch_size": r.training.batch_size,
    }


def points(plan: Plan, config: str, part: str) -> list[dict]:
    """The memory points of one config: part 'baseline' (every method and sequence length), 'features'
    (each feature row at the longest sequence) or 'long-context' (the 8B shape only: the long-context
    recipe's keys at 32,768 and 80,000 tokens), 'moe' (the mixture-of-experts shape, once, at
    the longest) or 'families' (one QLoRA point per family config)."""
    if part == "moe":
        if config != list(plan.configs)[0]:
            return []
        seq = plan.seq_lens[-1]
        return [
            {
                "config": MOE_NAME,
                "method": m,
                "seq_len": seq,
                "feature": "mixture of experts",
                "changes": {},
                "skipped": None,
            }
            for m in METHODS
        ]
    if part == "families":
        feature = f"family: {plan.families[config]['model_type']} (default attention)"
        return [
            {
                "config": config,
                "method": "qlora",
                "seq_len": plan.seq_lens[-1],
                "feature": feature,
                "changes": {},
                "skipped": None,
            }
        ]
    if part == "long-context":
        if config != list(plan.configs)[-1]:
            return []
        return [
            {
                "config": config,
                "method": "qlora",
                "seq_len": seq,
                "feature": "long-context recipe",
                "changes": long_context_keys(),
                "skipped": None,
            }
            for seq in (DRY_LONG_SEQ_LENS if plan.dry else LONG_SEQ_LENS)
        ]
    out = []
    for label, changes, skipped in feature_rows():
        if (label == "baseline") != (part == "baseline"):
            continue
        seqs = plan.seq_lens if label == "baseline" else plan.seq_lens[-1:]
        for method in METHODS:
            for seq in seqs:
                out.append(
                    {
                        "config": config,
                        "method": method,
                        "seq_len": seq,
                        "feature": label,
                        "changes": changes,
                        "skipped": skipped,
                    }
                )
    return out


def save_random_model(config: dict, folder: Path, tokenizer: bool = False) -> Path:
    """Random weights of `config` saved once (qlora's `random_weights`: in the compute dtype, on the GPU when there
    is one: an 8B initialises in seconds), with the demo tokenizer's files when `tokenizer`."""
    from qlora.config.recipe import recipe_from_mapping
    from qlora.training.measure import random_weights

    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps(config)
    )  # what random_weights builds from; saved again with the weights
    random_weights(recipe_from_mapping({"model": {"name_or_path": str(folder)}}, for_training=False), None, folder)
    if tokenizer:
        for name in TOKENIZER_FILES:
            if (DEMO_TOKENIZER / name).exists():
                shutil.copy(DEMO_TOKENIZER / name, folder / name)
    return folder


def measure_point(point: dict, plan: Plan, weights: Path) -> dict:
    """Predicted vs measured peak of one point; the reserved bytes give the allocator's slack."""
    import torch

    from qlora.config.recipe import recipe_from_mapping
    from qlora.memory.estimate import estimate, settings_inventory
    from qlora.memory.settings import from_recipe
    from qlora.training.auto import resolve_kernels
    from qlora.training.measure import measure

    cuda = torch.cuda.is_available()
    config_json = str(weights / "config.json")
    keys = {"data.max_seq_len": point["seq_len"], "lora.r": plan.rank, **point["changes"]}  # a point's own r wins
    recipe = recipe_from_mapping(
        {"model": {"name_or_path": config_json}}, [f"{k}={v}" for k, v in keys.items()], for_training=False
    )
    recipe = resolve_kernels(recipe)  # 'auto' without Liger installed here: predicted as what runs
    _, _, settings = from_recipe(recipe, device="cuda" if cuda else "cpu")
    predicted = estimate(settings_inventory(config_json, settings), point["method"], settings)
    if cuda:
        torch.cuda.empty_cache()
    started = time.perf_counter()
    measured = measure(recipe, point["method"], weights=weights)
    row = {
        **point,
        "predicted_allocated_bytes": predicted.allocated,
        "predicted_total_bytes": predicted.total,
        "measured_bytes": measured.peak,
        "error_pct": round(100 * (predicted.allocated - measured.peak) / measured.peak, 3),
        "measured_components": measured.bytes,
        "phase_peaks": measured.phases,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if cuda:
        reserved = max(torch.cuda.memory_reserved(), torch.cuda.max_memory_reserved())
        paged = measured.bytes.get("optimizer", 0) if settings.optimizer.startswith("paged_") else 0
        row.update(
            reserved_bytes=int(reserved),
            slack=round(reserved / max(measured.peak - paged, 1) - 1, 4),
            max_allocated_bytes=int(torch.cuda.max_memory_allocated()),
            nvml_used_bytes=nvml_used(),
        )
    return row


def memory_worker(plan: Plan, config: str, part: str, deadline: float, index: int | None = None):
    """The `part` points of `config` (only the `index`-th when given), in this process, yielding one row per
    point (skips past the deadline)."""
    weights = None
    for i, point in enumerate(points(plan, config, part)):
        if index is not None and i != index:
            continue
        if point["skipped"]:
            yield point
            continue
        if time.monotonic() > deadline:
            yield {**point, "skipped": "time budget"}
            continue
        try:
            shapes = {**plan.configs, **plan.families, MOE_NAME: DRY_MOE_CONFIG if plan.dry else MOE_CONFIG}
            weights = weights or save_random_model(shapes[point["config"]], plan.work / "models" / point["config"])
            yield measure_point(point, plan, weights)
        except Exception as exc:  # an OOM or a missing kernel: recorded, and the grid goes on
            yield {**point, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]}


def run_memory(plan: Plan, deadline: float) -> list[dict]:
    """Every config's baseline first, then the features (so a tight budget cuts features, not the 8B);
    in-process for the dry run, one subprocess per config and part on a GPU (the random weights, saved
    once per config, stay on disk until the end: 25 GB for 1B + 3B + 8B in 16 bits)."""
    rows = []
    for part in ("baseline", "moe", "long-context", "families", "features"):
        for config in plan.families if part == "families" else plan.configs:
            if (
                plan.isolate
            ):  # one process per point: allocator statistics and bitsandbytes' paged buffers are per process
                got = [
                    row
                    for i in range(len(points(plan, config, part)))
                    for row in memory_subprocess(plan, config, part, deadline, i)
                ]
            else:
                got = list(memory_worker(plan, config, part, deadline))
            print_rows(got)
            rows.extend(got)
    shutil.rmtree(plan.work / "models", ignore_errors=True)
    return rows


def memory_subprocess(plan: Plan, config: str, part: str, deadline: float, index: int) -> list[dict]:
    left = max(deadline - time.monotonic(), 0)
    command = [
        sys.executable,
        __file__,
        "--worker",
        "memory",
        "--config",
        config,
        "--part",
        part,
        "--work",
        str(plan.work),
        "--point",
        str(index),
        "--deadline-in",
        str(left),
    ] + (["--dry-run"] if plan.dry else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=left + 120)
    except subprocess.TimeoutExpired as exc:
        return [{"config": config, "feature": part, "error": f"worker timed out: {str(exc.stderr or '')[-300:]}"}]
    got = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        got.append(
            {
                "config": config,
                "feature": part,
                "error": f"worker exited {done.returncode}: {done.stderr.strip()[-300:]}",
            }
        )
    return got


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        if "error_pct" in r:
            mark = "ok" if abs(r["error_pct"]) <= TARGET_ERROR_PCT else "OVER 3 %"
            print(
                f"  {r['config']:<9} {r['method']:<6} seq {r['seq_len']:>5} {r['feature']:<22} predicted "
                f"{r['predicted_allocated_bytes'] / 2**30:7.3f} GiB  measured {r['measured_bytes'] / 2**30:7.3f} GiB  "
                f"{r['error_pct']:+6.2f} % {mark}",
                flush=True,
            )
        else:
            print(
                f"  {r.get('config')} {r.get('method', '')} {r.get('seq_len', '')} {r.get('feature', '')}: "
                f"{r.get('skipped') or r.get('error')}",
                flush=True,
            )


# --- 4. training, 5. merge and generate --------------------------------------------------------------


def write_dataset(path: Path, rows: int = 256) -> Path:
    """A generated instruction set in the words the demo tokenizer knows (deterministic)."""
    words = [json.loads(line)["input"] for line in (ROOT / "qlora" / "demo" / "assets" / "instructions.jsonl").open()][
        :64
    ]
    with path.open("w") as f:
        for i in range(rows):
            word = words[i % len(words)]
            f.write(
                json.dumps({"instruction": "Repeat the word twice.", "input": word, "output": f"{word} {word}"}) + "\n"
            )
    return path


def train_recipe(plan: Plan, model: Path, data: Path, optimizer: str) -> Path:
    import yaml

    recipe = {
        "model": {"name_or_path": str(model)},
        "data": {"path": str(data), "max_seq_len": plan.train["max_seq_len"], "packing": True, "eval_size": 16},
        "lora": {"r": 16, "alpha": 32},
        "training": {
            "optimizer": optimizer,
            "max_steps": plan.train["steps"],
            "batch_size": plan.train["batch_size"],
            "grad_accum": 1,
            "warmup_ratio": 0.0,
            "save_steps": 1000,
            "logging_steps": 1,
        },
        "eval": {"metric": "none"},
        "output_dir": str(plan.work / "runs" / optimizer),
    }
    path = plan.work / f"recipe-{optimizer}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_module(plan: Plan, module: str, argv: list[str]) -> tuple[int, str]:
    """`python -m module argv` (a fresh process on a GPU; in this process for the dry run): (exit code, output)."""
    if plan.isolate:
        done = subprocess.run(
            [sys.executable, "-m", module, *argv],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
        )
        return done.returncode, (done.stdout + done.stderr)[-2000:]
    import importlib

    from qlora.config.errors import run_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = run_cli(importlib.import_module(module).main, argv)
        except SystemExit as exc:  # an OOM exit from the trainer
            code = exc.code if isinstance(exc.code, int) else 1
    return code, out.getvalue()[-2000:]


def run_training(plan: Plan, deadline: float) -> list[dict]:
    from qlora.config.recipe import OPTIMIZERS

    model = save_random_model(plan.configs[plan.train["model"]], plan.work / "train-model", tokenizer=True)
    data = write_dataset(plan.work / "generated.jsonl", plan.train["rows"])
    rows = []
    for optimizer in OPTIMIZERS:
        if time.monotonic() > deadline:
            rows.append({"optimizer": optimizer, "skipped": "time budget"})
            continue
        started = time.perf_counter()
        code, output = run_module(
            plan, "qlora.train", [str(train_recipe(plan, model, data, optimizer)), "--overwrite"]
        )
        row = {"optimizer": optimizer, "exit_code": code, "seconds": round(time.perf_counter() - started, 1)}
        metrics = plan.work / "runs" / optimizer / "metrics.json"
        if code == 0 and metrics.exists():
            m = json.loads(metrics.read_text())
            row.update(
                {
                    k: m.get(k)
                    for k in (
                        "tokens_per_s",
                        "train_steps",
                        "train_runtime_s",
                        "compute_dtype",
                        "peak_memory_bytes",
                        "peak_memory_allocated_bytes",
                        "paged_optimizer_bytes",
                        "peak_memory_reserved_bytes",
                    )
                }
            )
        else:
            row["output_tail"] = output[-600:]
        print(
            f"  train {optimizer:<18} exit {code}  {row.get('tokens_per_s')} tokens/s  peak "
            f"{row.get('peak_memory_bytes')}",
            flush=True,
        )
        rows.append(row)
    return rows


def run_merge_and_generate(plan: Plan, training: list[dict], deadline: float) -> dict:
    done = [r for r in training if r.get("exit_code") == 0]
    if not done:
        return {"skipped": "no training run finished"}
    if time.monotonic() > deadline:
        return {"skipped": "time budget"}
    run = str(plan.work / "runs" / done[-1]["optimizer"])
    result = {"run": done[-1]["optimizer"]}
    for step, module, argv in (
        ("merge", "qlora.merge", [run, "--to", str(plan.work / "merged"), "--overwrite"]),
        (
            "merge-bfloat16",
            "qlora.merge",
            [run, "--to", str(plan.work / "merged-bf16"), "--dtype", "bfloat16", "--overwrite"],
        ),
        (
            "generate",
            "qlora.generate",
            [run, "--prompt", "Repeat the word twice.", "--input", "cave", "--max-new-tokens", "8"],
        ),
    ):
        started = time.perf_counter()
        code, output = run_module(plan, module, argv)
        result[step] = {
            "exit_code": code,
            "seconds": round(time.perf_counter() - started, 1),
            "output_tail": output[-600:],
        }
        print(f"  {step}: exit {code} in {result[step]['seconds']} s", flush=True)
    return result


# --- the report ------------------------------------------------------------------------------------


def run_speed(plan: Plan, out: Path, budget: float) -> dict:
    """benchmarks/speed.py (qlora against the plain recipe, one process per side) within its budget."""
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "speed.py"),
        "--out",
        str(out),
        *(["--dry-run", *SPEED_ARGS[-2:]] if plan.dry else SPEED_ARGS),
    ]  # the dry run: the same sides
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return {"error": f"the speed benchmark ran over its {budget:.0f} s budget"}
    path = out / "speed.json"
    return json.loads(path.read_text()) if path.exists() else {"error": done.stderr.strip()[-500:]}


def overheads(context: dict, memory: list[dict], env: dict) -> dict | None:
    """What the profiler reads (qlora/memory/overheads.py), when both figures were measured."""
    slacks = [r["slack"] for r in memory if "slack" in r]
    if "cuda_context_bytes" not in context or not slacks:
        return None
    return {
        "gpu": env.get("device"),
        "cuda_context_bytes": context["cuda_context_bytes"],
        "allocator_slack": round(max(0.0, max(slacks)), 4),
        "context_method": context.get("method"),
        "slack_method": "max over the memory points of reserved / (allocated peak - paged states) - 1",
        "driver": env.get("driver"),
        "CUDA": env.get("CUDA"),
        "torch": env.get("torch"),
    }


def markdown(report: dict) -> str:
    env, lines = report["environment"], [f"# GPU check: {report['environment'].get('device')}", ""]
    lines += [
        "Made by `python benchmarks/gpu_check.py" + (" --dry-run" if report["dry_run"] else "") + "`.",
        "",
        "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
    ]
    lines += [
        "## Overheads",
        "",
        f"CUDA context: {report['context']}",
        "",
        f"Written for the profiler: {report['overheads']}",
        "",
    ]
    lines += [
        "## Predicted vs measured (`allocated_bytes` vs `max_memory_allocated` + paged states)",
        "",
        "| config | method | seq | feature | predicted | measured | error | slack |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["memory"]:
        if "error_pct" in r:
            lines.append(
                f"| {r['config']} | {r['method']} | {r['seq_len']} | {r['feature']} | "
                f"{r['predicted_allocated_bytes']:,} | "
                f"{r['measured_bytes']:,} | {r['error_pct']:+.2f} % | {r.get('slack', '—')} |"
            )
        else:
            lines.append(
                f"| {r.get('config')} | {r.get('method', '')} | {r.get('seq_len', '')} | {r.get('feature', '')} | "
                f"{r.get('skipped') or r.get('error')} | | | |"
            )
    lines += [
        "",
        "## Training (a few steps per optimizer)",
        "",
        "| optimizer | exit | tokens/s | peak (allocated + paged) | reserved |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["training"]:
        lines.append(
            f"| {r['optimizer']} | {r.get('exit_code', r.get('skipped'))} | {r.get('tokens_per_s')} | "
            f"{r.get('peak_memory_bytes')} | {r.get('peak_memory_reserved_bytes')} |"
        )
    merge = report["merge_generate"]
    lines += [
        "",
        "## Merge and generate",
        "",
        json.dumps(
            {
                k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "output_tail"})
                for k, v in merge.items()
            }
        ),
        "",
    ]
    speed = report.get("speed") or {}
    lines += [
        "## Speed (benchmarks/speed.py; its table: speed/speed.md)",
        "",
        f"qlora / plain: {speed.get('ratios', speed.get('error'))}",
        "",
    ]
    lines += ["## GPU tests (`pytest -m gpu`)", "", f"{report.get('gpu_tests')}", ""]
    return "\n".join(lines)


def run_gpu_tests(cuda: bool) -> dict:
    """The suite's `gpu`-marked tests (skipped everywhere else): exit code and pytest's last lines."""
    if not cuda:
        return {"skipped": "no CUDA GPU (dry run)"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *GPU_TESTS],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=BUDGET_S["gpu tests"] + 60,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {BUDGET_S['gpu tests'] + 60} s"}
    return {"exit_code": done.returncode, "tail": (done.stdout + done.stderr).strip().splitlines()[-5:]}


def check(plan: Plan, out: Path | None) -> dict:
    import torch

    start = time.monotonic()
    env = environment()
    cuda = torch.cuda.is_available()
    if not cuda and not plan.dry:
        raise SystemExit("error: no CUDA GPU here; run with --dry-run to check the wiring on a CPU")
    folder = f"cuda-{gpu_slug(env['device'])}" if cuda else "cpu-dry-run"
    out = out or (ROOT / "memory_reports" / "measured" / folder)
    print(f"gpu-check on {env['device']} -> {out} (belongs in memory_reports/measured/{folder}/)", flush=True)
    context = {"skipped": "no CUDA GPU (dry run)"}
    if cuda:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", "context"],
            capture_output=True,
            text=True,
            timeout=BUDGET_S["overheads"] + 60,
        )
        found = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        context = found[0] if found else {"error": done.stderr.strip()[-300:]}
    print(f"CUDA context: {context}", flush=True)
    deadline = time.monotonic() + BUDGET_S["memory"]
    memory = run_memory(plan, deadline)
    training = run_training(plan, time.monotonic() + BUDGET_S["training"])
    merge = run_merge_and_generate(plan, training, time.monotonic() + BUDGET_S["merge"])
    speed = run_speed(plan, out / "speed", BUDGET_S["speed"])
    gpu_tests = run_gpu_tests(cuda)
    measured = [r for r in memory if "error_pct" in r]
    report = {
        "dry_run": plan.dry,
        "measured_folder": folder,
        "environment": env,
        "context": context,
        "memory": memory,
        "training": training,
        "merge_generate": merge,
        "speed": speed,
        "gpu_tests": gpu_tests,
        "overheads": overheads(context, memory, env),
        "target_error_pct": TARGET_ERROR_PCT,
        "points_within_target": sum(abs(r["error_pct"]) <= TARGET_ERROR_PCT for r in measured),
        "points_measured": len(measured),
        "seconds": round(time.monotonic() - start, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
    if report["overheads"]:
        from qlora.memory.overheads import OVERHEADS_FILE

        (out / OVERHEADS_FILE).write_text(json.dumps(report["overheads"], indent=2))
        # what the profiler reads is package data (an installed wheel profiles as a checkout does)
        package = ROOT / "qlora" / "memory" / "measured" / out.name
        print(f"copy {out / OVERHEADS_FILE} to {package}/ (the profiler reads it there)", flush=True)
    print(
        f"{report['points_within_target']}/{report['points_measured']} memory points within {TARGET_ERROR_PCT} %; "
        f"{report['seconds']} s; wrote {out}",
        flush=True,
    )
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="the same wiring on a CPU with tiny configs and steps (seconds)"
    )
    parser.add_argument(
        "--out", type=Path, help="results folder (default memory_reports/measured/cuda-<gpu>/; dry run: a temp folder)"
    )
    parser.add_argument("--work", type=Path, help="scratch folder for random models and runs (default: a temp folder)")
    parser.add_argument(
        "--isolate", action="store_true", help="dry run: also use a process per config and run, as on a GPU"
    )
    parser.add_argument("--worker", choices=("context", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument(
        "--part",
        choices=("baseline", "moe", "long-context", "families", "features"),
        default="baseline",
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--point", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deadline-in", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker == "context":
        print(json.dumps(context_worker()), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="qlora-gpu-check-") as scratch:
        plan = Plan.make(args.dry_run, args.work or Path(scratch), True if args.isolate else None)
        if args.worker == "memory":
            for row in memory_worker(plan, args.config, args.part, time.monotonic() + args.deadline_in, args.point):
                print(json.dumps(row, default=str), flush=True)
            return 0
        out = args.out or (Path(scratch) / "results" if args.dry_run else None)
        report = check(plan, out)
        if args.dry_run and not args.out:
            print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
