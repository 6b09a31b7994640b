"""Preference tuning end to end on a tiny model: a DPO run, its resume, continuing an SFT adapter, two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from qlora.config.errors import QLoraError
from qlora.config.recipe import recipe_from_mapping

REPO = Path(__file__).resolve().parents[2]
WORDS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@pytest.fixture(scope="session")
def preference_file(tmp_path_factory) -> Path:
    """Pairs whose chosen answer is the next number word and rejected an animal (a pattern a tiny model learns)."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = [
        {
            "prompt": f"Say the next number. {w}\n",
            "chosen": WORDS[(i + 1) % 10],
            "rejected": ("cat", "dog", "bird")[i % 3],
        }
        for i, w in enumerate(WORDS * 4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dpo_mapping(model_dir, data_file, out) -> dict:
    return {
        "model": {"name_or_path": str(model_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"path": str(data_file), "format": "preference", "max_seq_len": 48, "eval_size": 8},
        "training": {
            "objective": "dpo",
            "max_steps": 4,
            "batch_size": 4,
            "grad_accum": 1,
            "learning_rate": 1e-2,
            "warmup_ratio": 0.0,
            "save_steps": 2,
            "logging_steps": 2,
        },
        "dpo": {"beta": 0.5},
        "eval": {"metric": "exact_match", "max_examples": 4, "max_new_tokens": 2},
        "output_dir": str(out),
    }


def dpo_recipe(model_dir, data_file, out, *overrides):
    return recipe_from_mapping(dpo_mapping(model_dir, data_file, out), list(overrides))


@pytest.fixture(scope="module")
def dpo_run(tiny_llama, preference_file, tmp_path_factory):
    from qlora.training.run import train

    out = tmp_path_factory.mktemp("dpo") / "run"
    return out, train(dpo_recipe(tiny_llama, preference_file, out))


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_dpo_run_reports_reward_accuracy_and_margin_before_and_after(dpo_run):
    out, metrics = dpo_run
    assert metrics["objective"] == "dpo" and metrics["train_steps"] == 4
    # before training the policy is its reference: every implicit reward is 0 (a tie counts as a miss)
    assert metrics["eval_reward_accuracy_before"] == 0.0 and metrics["eval_reward_margin_before"] == 0.0
    assert metrics["eval_reward_accuracy_after"] > 0.5 and metrics["eval_reward_margin_after"] > 0
    assert {"eval_loss_after", "eval_exact_match_after", "tokens_per_s", "peak_memory_bytes"} <= metrics.keys()
    assert metrics["data"]["train_examples"] == 32 and metrics["data"]["eval_examples"] == 8
    assert sorted(p.name for p in (out / "adapter").iterdir() if p.is_dir()) == []  # no 'ref' copy saved
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (out / "checkpoints" / "checkpoint-4" / "COMPLETE").exists()


@pytest.mark.slow
def test_resumed_dpo_run_lands_on_the_same_adapter(dpo_run, tiny_llama, preference_file, tmp_path, monkeypatch):
    import qlora.training.run as train_module
    from qlora.training.checkpoints import mark_complete

    class Crash(Exception):
        pass

    def crashing_callback():
        from transformers import TrainerCallback

        class MarkThenCrash(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")
                if state.global_step == 2:
                    raise Crash()

        return MarkThenCrash()

    out = tmp_path / "crashed"
    with monkeypatch.context() as patch:
        patch.setattr(train_module, "checkpoint_marker_callback", crashing_callback)
        with pytest.raises(Crash):
            train_module.train(dpo_recipe(tiny_llama, preference_file, out))
    metrics = train_module.train(dpo_recipe(tiny_llama, preference_file, out), resume=True)
    reference_out, reference = dpo_run
    resumed, uninterrupted = adapter(out), adapter(reference_out)
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-5)
    assert metrics["eval_reward_accuracy_after"] == pytest.approx(reference["eval_reward_accuracy_after"])


@pytest.mark.slow
def test_dpo_continues_an_sft_adapter_whose_copy_is_the_reference(trained_run, tiny_llama, preference_file, tmp_path):
    from qlora.training.run import train

    out = tmp_path / "continued"
    metrics = train(dpo_recipe(tiny_llama, preference_file, out, f"model.adapter={trained_run}", "lora.r=8"))
    assert metrics["continued_adapter"] == str(trained_run / "adapter")
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 4  # the SFT adapter's own r
    assert metrics["eval_reward_margin_before"] == 0.0  # the policy starts as its reference (base + SFT adapter)
    sft = adapter(trained_run)
    assert any(not torch.equal(sft[k], v) for k, v in adapter(out).items())


def test_a_missing_adapter_is_one_line_unless_optional(tiny_llama, preference_file, tmp_path, capsys):
    from qlora.model.lora import adapter_folder

    spec = dpo_recipe(tiny_llama, preference_file, tmp_path / "o", f"model.adapter={tmp_path / 'none'}").model
    with pytest.raises(QLoraError, match=r"model.adapter: .*none not found; give an adapter folder or a qlora run"):
        adapter_folder(spec)
    spec.adapter_optional = True
    assert adapter_folder(spec) is None
    assert "does not exist yet: training a new adapter from the base" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    spec.adapter = str(tmp_path / "empty")
    with pytest.raises(QLoraError, match="holds no adapter_config.json"):
        adapter_folder(spec)


# --- two processes (torchrun, gloo) against one with the same global batch --------------------------


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_cli(recipe_file: Path, out: Path, batch: int, procs: int) -> Path:
    from tests.training.test_distributed import free_port

    launcher = [sys.executable, "-m", "qlora.train"]
    if procs > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)]
        launcher += ["--master_port", str(free_port()), "-m", "qlora.train"]
    sets = ["--set", f"training.batch_size={batch}", "--set", f"output_dir={out}", "--set", "eval.metric=none"]
    proc = subprocess.run(
        [*launcher, str(recipe_file), *sets], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_global_batch(tiny_llama, preference_file, tmp_path):
    recipe_file = tmp_path / "dpo.yaml"
    recipe_file.write_text(yaml.safe_dump(dpo_mapping(tiny_llama, preference_file, tmp_path / "unused")))
    two = run_cli(recipe_file, tmp_path / "two", batch=2, procs=2)
    one = run_cli(recipe_file, tmp_path / "one", batch=4, procs=1)
    a, b = adapter(two), adapter(one)
    difference = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"DPO adapter, 2 processes x 2 vs 1 process x 4: largest difference {difference:.2e}")
    assert difference < 1e-5
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch_size"] == 4


def test_sweep_accepts_objective_and_beta_and_ranks_by_reward_accuracy(tmp_path):
    from qlora.training.sweep import build_points, metric_names, parse_grid

    grid = parse_grid(["training.objective=dpo", "dpo.beta=0.1,0.5"])
    points = build_points(str(REPO / "recipes" / "demo-dpo.yaml"), [], grid, tmp_path)
    assert [p.recipe.dpo.beta for p in points] == [0.1, 0.5]
    assert metric_names(points) == ["reward_accuracy", "reward_margin", "exact_match"]


@pytest.mark.slow
def test_a_nan_dpo_loss_stops_with_exit_5_and_keeps_the_last_good_checkpoint(
    tiny_llama, preference_file, tmp_path, monkeypatch
):
    """TRL's DPO loss is not the model output's loss: the stop sees it through the non-finite gradients."""
    import trl

    from qlora.config.errors import ExitCode
    from qlora.training.run import train

    original = trl.DPOTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.model.training and self.state.global_step + 1 == 3 else loss

    monkeypatch.setattr(trl.DPOTrainer, "compute_loss", compute_loss)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as info:
        train(dpo_recipe(tiny_llama, preference_file, out))
    assert info.value.code == ExitCode.NONFINITE
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "adapter").exists()


@pytest.mark.slow
def test_sigterm_mid_dpo_run_saves_the_step_reached_and_resumes(
    tiny_llama, preference_file, tmp_path, monkeypatch, dpo_run
):
    import os
    import signal

    import trl

    from qlora.config.errors import ExitCode
    from qlora.training.run import train

    original = trl.DPOTrainer.compute_loss

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self.model.training and self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step; the step still finishes
        return original(self, model, inputs, *args, **kwargs)

    out = tmp_path / "term"
    with monkeypatch.context() as patch:
        patch.setattr(trl.DPOTrainer, "compute_loss", compute_loss)
        with pytest.raises(SystemExit) as info:
            train(dpo_recipe(tiny_llama, preference_file, out))
    assert info.value.code == ExitCode.PREEMPTED
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    train(dpo_recipe(tiny_llama, preference_file, out), resume=True)
    resumed, uninterrupted = adapter(out), adapter(dpo_run[0])
    for name in resumed:
        torch.testing.assert_close(resumed[name], uninterrupted[name], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_precomputed_reference_log_probs_train_the_same_adapter(dpo_run, tiny_llama, preference_file, tmp_path):
    from qlora.training.run import train

    out = tmp_path / "precomputed"
    metrics = train(dpo_recipe(tiny_llama, preference_file, out, "dpo.precompute_ref_log_probs=true"))
    precomputed, per_step = adapter(out), adapter(dpo_run[0])
    for name in precomputed:
        torch.testing.assert_close(precomputed[name], per_step[name], rtol=0, atol=1e-5)
    assert metrics["eval_reward_margin_after"] == pytest.approx(dpo_run[1]["eval_reward_margin_after"], abs=1e-5)
