"""End-to-end training on a tiny model: outputs, metrics, resume, refusal to clobber, OOM path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora.config.errors import ExitCode, QLoraError
from qlora.config.recipe import recipe_from_mapping


def tiny_recipe(model_dir, data_file, out, *overrides):
    data = {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"path": str(data_file), "max_seq_len": 200, "eval_size": 8},
        "training": {
            "max_steps": 6,
            "batch_size": 4,
            "grad_accum": 1,
            "learning_rate": 1e-3,
            "save_steps": 2,
            "logging_steps": 2,
        },
        "eval": {"metric": "exact_match", "max_examples": 4, "max_new_tokens": 3},
        "output_dir": str(out),
    }
    return recipe_from_mapping(data, list(overrides))


@pytest.fixture(scope="module")
def finished_run(tiny_llama, alpaca_file, tmp_path_factory):
    from qlora.training.run import train

    out = tmp_path_factory.mktemp("run")
    metrics = train(tiny_recipe(tiny_llama, alpaca_file, out))
    return out, metrics


def test_run_writes_adapter_metrics_recipe_and_checkpoints(finished_run):
    out, metrics = finished_run
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert (out / "recipe.yaml").exists() and (out / "training.png").exists()
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [2, 4, 6]  # training.logging_steps 2
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert all((p / "COMPLETE").exists() for p in (out / "checkpoints").glob("checkpoint-*"))
    assert not list(out.glob(".*tmp"))  # no staging folders left behind


def test_metrics_hold_what_guide_lists(finished_run):
    _, metrics = finished_run
    for key in (
        "eval_loss_before",
        "eval_loss_after",
        "eval_exact_match_before",
        "eval_exact_match_after",
        "trainable_params",
        "total_params",
        "peak_memory_bytes",
        "train_runtime_s",
        "tokens_per_s",
    ):
        assert key in metrics, key
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["peak_memory_bytes"] > 50 * 2**20  # peak RSS of a Python process with torch loaded
    assert metrics["tokens_per_s"] > 0 and metrics["train_steps"] == 6
    assert metrics["method"] == "qlora" and metrics["compute_dtype"] == "float32"


def test_trainer_uses_bnb_paged_optimizer(tiny_llama, alpaca_file, tmp_path):
    import bitsandbytes as bnb

    from qlora.data.prepare import prepare_data
    from qlora.model.build import build_model
    from qlora.training.run import build_trainer

    recipe = tiny_recipe(tiny_llama, alpaca_file, tmp_path)
    loaded = build_model(recipe)
    trainer = build_trainer(recipe, loaded, prepare_data(recipe, loaded.tokenizer), tmp_path / "checkpoints")
    optimizer = trainer.create_optimizer()
    inner = getattr(optimizer, "optimizer", optimizer)
    assert isinstance(inner, bnb.optim.optimizer.Optimizer8bit)
    assert inner.is_paged and inner.args.optim_bits == 32
    assert trainer.args.max_grad_norm == 0.3


def test_refuses_to_clobber_results_without_overwrite(finished_run, tiny_llama, alpaca_file):
    from qlora.training.run import train

    out, _ = finished_run
    with pytest.raises(QLoraError, match="already holds results; pass --overwrite .* or --resume"):
        train(tiny_recipe(tiny_llama, alpaca_file, out))


def test_resume_after_crash_matches_uninterrupted_run(tiny_llama, alpaca_file, tmp_path, finished_run, monkeypatch):
    """Crash right after checkpoint-4 is saved, resume, and land on the same adapter (CPU: 1e-5)."""
    import qlora.training.run as train_module
    from qlora.training.checkpoints import mark_complete

    class Crash(Exception):
        pass

    def crashing_callback():
        from transformers import TrainerCallback

        class MarkThenCrash(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
                if state.global_step == 4:
                    raise Crash()

        return MarkThenCrash()

    out = tmp_path / "crashed"
    recipe = tiny_recipe(tiny_llama, alpaca_file, out)
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "checkpoint_marker_callback", crashing_callback)
        with pytest.raises(Crash):
            train_module.train(recipe)
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    metrics = train_module.train(tiny_recipe(tiny_llama, alpaca_file, out), resume=True)
    reference_out, reference = finished_run
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    uninterrupted = load_file(reference_out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-5)
    assert metrics["eval_loss_before"] == reference["eval_loss_before"]  # 'before' survives the crash


def test_resume_without_checkpoint_is_a_clear_error(tiny_llama, alpaca_file, tmp_path):
    from qlora.training.run import train

    with pytest.raises(QLoraError, match="--resume: no complete checkpoint under"):
        train(tiny_recipe(tiny_llama, alpaca_file, tmp_path / "fresh"), resume=True)


def test_out_of_memory_keeps_checkpoints_and_explains(tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys):
    import transformers

    from qlora.training.checkpoints import mark_complete
    from qlora.training.run import train

    out = tmp_path / "oom"

    def checkpoint_then_run_out_of_memory(self, *args, **kwargs):
        (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
        mark_complete(out / "checkpoints" / "checkpoint-2")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.Trainer, "train", checkpoint_then_run_out_of_memory)
    with pytest.raises(SystemExit) as info:
        train(tiny_recipe(tiny_llama, alpaca_file, out, "target_gpu=24GB"))
    assert info.value.code == ExitCode.OOM
    assert (out / "checkpoints" / "checkpoint-2" / "COMPLETE").exists()
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()
    err = capsys.readouterr().err
    assert "error: out of GPU memory during training; the last complete checkpoint is kept" in err
    assert "qlora profile --recipe" in err


@pytest.mark.slow
def test_sigkill_once_a_checkpoint_appears_then_resume_matches(tiny_llama, alpaca_file, tmp_path, finished_run):
    """A real process, killed with SIGKILL the moment checkpoint-4's folder appears (likely mid-write):
    the resume must skip the half-written checkpoint-4 or use the finished one, and land on the same adapter."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    recipe_file = tmp_path / "recipe.yaml"
    tiny_recipe(tiny_llama, alpaca_file, out).save(recipe_file)
    command = [sys.executable, "-m", "qlora.train", str(recipe_file)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while (
        not (out / "checkpoints" / "checkpoint-4").exists() and process.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before the kill: nothing was tested"
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference_out, _ = finished_run
    got = load_file(out / "adapter" / "adapter_model.safetensors")
    expected = load_file(reference_out / "adapter" / "adapter_model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5)
