"""More than one process: launcher detection, the strategy -> Trainer mapping, and real 2-process runs
of the demo recipe over gloo (torchrun) compared with 1-process runs of the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qlora.config.errors import QLoraError
from qlora.config.recipe import DistributedSpec
from qlora.training.distributed import Launch, launch_env, resolve, trainer_kwargs

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "recipes" / "demo.yaml"
TWO = Launch(rank=1, local_rank=1, world_size=2, launched=True)


# --- fast: the environment and the mapping ---------------------------------------------------------


def test_launch_env_reads_torchrun_and_accelerate_variables():
    assert launch_env({}) == Launch()
    assert launch_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == Launch(3, 1, 4, True)
    assert not launch_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"}).is_main
    with pytest.raises(QLoraError, match="WORLD_SIZE"):
        launch_env({"RANK": "x", "WORLD_SIZE": "2"})


def test_two_processes_default_to_ddp_on_gloo_without_unused_parameter_search():
    plan = resolve(DistributedSpec(), 4, TWO, cuda=False)
    assert plan.strategy == "ddp" and not plan.shards_weights
    assert plan.trainer_kwargs == {"use_cpu": True, "ddp_backend": "gloo", "ddp_find_unused_parameters": False}
    assert resolve(DistributedSpec(), 4, TWO, cuda=True).trainer_kwargs == {"ddp_find_unused_parameters": False}
    assert resolve(DistributedSpec(), 4, Launch(), cuda=False).trainer_kwargs == {}  # one plain process


def test_zero3_config_offloads_only_when_asked():
    plain = trainer_kwargs("zero3", "none", TWO, cuda=True)["deepspeed"]["zero_optimization"]
    assert plain["stage"] == 3 and "offload_param" not in plain
    off = trainer_kwargs("zero3", "cpu", TWO, cuda=True)["deepspeed"]["zero_optimization"]
    assert off["offload_param"]["device"] == off["offload_optimizer"]["device"] == "cpu"
    assert trainer_kwargs("zero3", "none", TWO, cuda=False)["use_cpu"]  # else accelerate sees world size 1 on a CPU


def test_zero3_without_deepspeed_installed_says_how_to_get_it(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(QLoraError, match=r"distributed.strategy: 'zero3' needs DeepSpeed.*qlora-kit\[deepspeed\]"):
        resolve(DistributedSpec("zero3"), 4, TWO, cuda=False)


def test_fsdp_on_gpus_is_the_documented_fsdp_qlora_setup():
    kwargs = resolve(DistributedSpec("fsdp", "cpu"), 4, TWO, cuda=True).trainer_kwargs
    assert kwargs["fsdp"] == "full_shard auto_wrap offload"
    config = kwargs["fsdp_config"]
    assert (
        config["version"] == 1 and config["use_orig_params"] is False and config["cpu_ram_efficient_loading"] is True
    )
    assert config["auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"


@pytest.mark.parametrize(
    "spec, bits, launch, cuda, key",
    [
        (DistributedSpec("fsdp"), 4, TWO, False, "distributed.strategy: 'fsdp' needs CUDA"),
        (DistributedSpec("zero3"), 4, Launch(), False, "distributed.strategy: 'zero3' divides the model"),
        (DistributedSpec("ddp", "cpu"), 4, TWO, False, "distributed.offload"),
        (DistributedSpec("fsdp"), 8, TWO, True, "cannot shard bitsandbytes 8-bit"),
    ],
)
def test_what_cannot_work_is_refused_naming_the_key(spec, bits, launch, cuda, key):
    with pytest.raises(QLoraError, match=key):
        resolve(spec, bits, launch, cuda=cuda)


def test_recipe_section_is_validated():
    from qlora.config.recipe import load_recipe

    assert load_recipe(DEMO, ["distributed.strategy=zero3", "distributed.offload=cpu"]).distributed == DistributedSpec(
        "zero3", "cpu"
    )
    with pytest.raises(QLoraError, match="distributed.strategy: unknown value 'fdsp'"):
        load_recipe(DEMO, ["distributed.strategy=fdsp"])
    with pytest.raises(QLoraError, match="distributed.offload"):
        load_recipe(DEMO, ["distributed.offload=nvme"])


def test_sharded_strategies_store_4bit_codes_in_the_compute_dtype():
    from qlora.config.recipe import QuantizationSpec
    from qlora.model.load import quantization_config

    assert (
        quantization_config(QuantizationSpec(), torch.bfloat16, sharded=True).bnb_4bit_quant_storage == torch.bfloat16
    )
    assert quantization_config(QuantizationSpec(), torch.bfloat16).bnb_4bit_quant_storage == torch.uint8


def test_fsdp_on_a_cpu_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qlora.train",
            str(DEMO),
            "--set",
            "distributed.strategy=fsdp",
            "--set",
            f"output_dir={out}",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(
        "error: distributed.strategy: 'fsdp'"
    )
    assert not out.exists()


# --- slow: two processes over gloo ----------------------------------------------------------------

# The demo recipe, shortened: no dropout (its masks differ per process), no generation metric.
SHORT = [
    "training.max_steps=12",
    "training.save_steps=4",
    "training.logging_steps=4",
    "lora.dropout=0",
    "eval.metric=none",
    "data.eval_size=8",
]
B = 4  # per-device batch of the 2-process runs


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    """A port nobody listens on, so that runs of parallel test sessions never meet."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _command(out: Path, *sets: str, procs: int = 2, resume: bool = False) -> list[str]:
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(procs),
        "--master_port",
        str(free_port()),
    ]
    sets_ = [arg for s in (*SHORT, *sets, f"output_dir={out}") for arg in ("--set", s)]
    return [*launcher, "-m", "qlora.train", str(DEMO), *sets_, *(["--resume"] if resume else [])]


def launch(out: Path, *sets: str, resume: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(out, *sets, resume=resume), capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def one_process(out: Path, batch: int) -> Path:
    """A plain 1-process run (a subprocess with one thread, like each launched process: seconds, not minutes)."""
    sets = [arg for s in (*SHORT, f"training.batch_size={batch}", f"output_dir={out}") for arg in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "qlora.train", str(DEMO), *sets],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def max_difference(a: Path, b: Path) -> float:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    difference = max((x[k] - y[k]).abs().max().item() for k in x)
    print(f"adapter {a.name} vs {b.name}: largest difference {difference:.2e}")  # the measured figure, with -s
    return difference


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = launch(out, f"training.batch_size={B}")
    return out, proc


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    return one_process(tmp_path_factory.mktemp("single") / "run", 2 * B)


@pytest.mark.slow
def test_ddp_equals_one_process_with_the_same_global_batch(ddp_run, single_run, tmp_path):
    out, _ = ddp_run
    assert max_difference(out, single_run) < 1e-5
    wrong = one_process(tmp_path / "wrong", B)  # per-device batch alone: half the global batch
    assert max_difference(out, wrong) >= 1e-3
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["strategy"] == "ddp" and metrics["global_batch_size"] == 2 * B
    assert len(metrics["peak_memory_bytes_per_process"]) == 2 and metrics["peak_memory_bytes_total"] == sum(
        metrics["peak_memory_bytes_per_process"]
    )
    single = json.loads((single_run / "metrics.json").read_text())
    assert (
        metrics["parameter_bytes_per_process"] == single["parameter_bytes_per_process"] * 2
    )  # DDP: a whole replica each


@pytest.mark.slow
def test_only_the_main_process_writes_one_output_folder(ddp_run):
    out, proc = ddp_run
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "checkpoints",
        "log.jsonl",
        "metrics.json",
        "recipe.yaml",
        "training.png",
    ]
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-12",
        "checkpoint-4",
        "checkpoint-8",
    ]
    assert all((p / "COMPLETE").exists() for p in (out / "checkpoints").glob("checkpoint-*"))
    assert not list(out.rglob("*.tmp"))
    assert proc.stdout.count("trainable params") == 1  # one summary, not one per process
    assert "global batch 8" in proc.stdout


@pytest.mark.slow
def test_only_the_main_process_prints_what_the_run_decided(ddp_run):
    """qlora's messages go through its logger, which speaks for rank 0 only under torchrun."""
    _, proc = ddp_run
    assert [line for line in proc.stderr.splitlines() if line.startswith("data: ")] != []
    assert sum(line.startswith("data: ") for line in proc.stderr.splitlines()) == 1  # not once per process


@pytest.mark.slow
def test_zero3_splits_every_parameter_and_trains_the_same_adapter(single_run, tmp_path):
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero3"
    launch(out, f"training.batch_size={B}", "distributed.strategy=zero3")
    assert max_difference(out, single_run) < 5e-5
    held = json.loads((out / "metrics.json").read_text())["parameter_bytes_per_process"]
    whole = json.loads((single_run / "metrics.json").read_text())["parameter_bytes_per_process"][0]
    # Each process holds its half of every parameter (4-bit codes included, stored as fp32 for sharding).
    print(f"ZeRO-3 parameter bytes per process {held}, one process {whole}")
    assert len(held) == 2 and all(0.45 * whole < h < 0.55 * whole for h in held), (held, whole)


def _worker(torchrun_pid: int, rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank` (a child of the launcher)."""
    import psutil

    for child in psutil.Process(torchrun_pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "qlora.train" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError("no worker found")


@pytest.mark.slow
def test_sigkill_of_one_process_then_resume_under_the_launcher_ends_on_the_same_adapter(ddp_run, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _command(out, f"training.batch_size={B}"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env()
    )
    marker = out / "checkpoints" / "checkpoint-4" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), "the run never completed its first checkpoint"
    os.kill(_worker(proc.pid, 1), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    assert not (out / "metrics.json").exists()  # killed mid-run
    launch(out, f"training.batch_size={B}", resume=True)
    assert max_difference(out, ddp_run[0]) < 1e-5


def test_summary_states_the_global_batch_and_each_process_peak():
    from qlora.training.distributed import summary_line

    metrics = {
        "global_batch_size": 32,
        "world_size": 2,
        "strategy": "zero3",
        "peak_memory_bytes_per_process": [2**30, 3 * 2**29],
        "peak_memory_bytes_total": 5 * 2**29,
    }
    assert summary_line(metrics) == (
        "global batch 32 (per-device batch × grad_accum × 2 process(es)) | zero3 | "
        "peak memory per process 1.00, 1.50 GiB, total 2.50 GiB"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gpu_smoke_world_size_one(strategy, tmp_path):
    """On one GPU under the launcher (world size 1): each path loads, trains, and writes a peft adapter."""
    out = tmp_path / strategy
    proc = subprocess.run(
        _command(out, "training.batch_size=4", "training.max_steps=2", f"distributed.strategy={strategy}", procs=1),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["strategy"] == strategy
    assert (out / "adapter" / "adapter_config.json").exists() and adapter(out)
