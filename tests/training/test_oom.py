"""Out of GPU memory in any GPU phase: exit 3, the phase named, advice, and nothing finished lost."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import tiny_recipe

from qlora.config.errors import ExitCode
from qlora.training.oom import OutOfMemoryExit


def out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_the_handler_names_the_phase_and_exits_3(capsys):
    with pytest.raises(SystemExit) as info, OutOfMemoryExit("merge", ["use --device cpu"], kept="nothing was written"):
        out_of_memory()
    assert info.value.code == ExitCode.OOM
    assert capsys.readouterr().err == "error: out of GPU memory during merge; nothing was written\nuse --device cpu\n"


def test_other_errors_pass_through_and_deferred_waits_for_the_caller(capsys):
    with pytest.raises(ValueError), OutOfMemoryExit("merge"):
        raise ValueError("not memory")
    with OutOfMemoryExit("evaluation", deferred=True) as oom:
        out_of_memory()
    assert oom.happened and capsys.readouterr().err == ""
    with pytest.raises(SystemExit):
        oom.exit_if_out_of_memory()
    assert capsys.readouterr().err.startswith("error: out of GPU memory during evaluation")


def test_oom_while_loading_the_model_exits_3_with_advice(tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys):
    import qlora.model.build
    from qlora.training.run import train

    monkeypatch.setattr(qlora.model.build, "load_base_model", out_of_memory)
    with pytest.raises(SystemExit) as info:
        train(tiny_recipe(tiny_llama, alpaca_file, tmp_path / "run", "target_gpu=24GB"))
    assert info.value.code == ExitCode.OOM
    err = capsys.readouterr().err
    assert "error: out of GPU memory during model loading; no training step ran" in err and "qlora profile" in err


def test_oom_in_the_evaluation_before_training_exits_3_with_advice(
    tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys
):
    import transformers

    from qlora.training.run import train

    steps = []
    monkeypatch.setattr(transformers.Trainer, "evaluate", out_of_memory)  # called back as training begins
    monkeypatch.setattr(transformers.Trainer, "training_step", lambda *a, **k: steps.append(1))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train(tiny_recipe(tiny_llama, alpaca_file, out, "target_gpu=24GB"))
    assert info.value.code == ExitCode.OOM and steps == []
    err = capsys.readouterr().err
    assert "error: out of GPU memory during the evaluation before training; no training step ran" in err
    assert "training.eval_batch_size" in err and "qlora profile --recipe" in err
    assert not (out / "adapter").exists() and not (out / "metrics.json").exists()


def test_oom_in_the_evaluation_after_training_exits_3_with_the_adapter_saved(
    tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys
):
    import transformers

    from qlora.training.run import train

    real_evaluate = transformers.Trainer.evaluate

    def out_of_memory_once_trained(self, *args, **kwargs):
        if self.state.global_step >= self.args.max_steps:
            out_of_memory()
        return real_evaluate(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "evaluate", out_of_memory_once_trained)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train(tiny_recipe(tiny_llama, alpaca_file, out, "training.max_steps=2"))
    assert info.value.code == ExitCode.OOM
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss_before"] > 0 and metrics["train_steps"] == 2
    assert not any(key.endswith("_after") for key in metrics)
    assert metrics["eval_after_skipped"] == "out of GPU memory in the evaluation after training"
    err = capsys.readouterr().err
    assert (
        f"error: out of GPU memory during the evaluation after training; the adapter is saved in {out / 'adapter'}"
        in err
    )


def test_oom_in_merge_exits_3_and_writes_nothing(trained_run, tmp_path, monkeypatch, capsys):
    import qlora.merge
    import qlora.post.merge

    monkeypatch.setattr(qlora.post.merge, "merged_model", out_of_memory)
    with pytest.raises(SystemExit) as info:
        qlora.merge.main([str(trained_run), "--to", str(tmp_path / "m")])
    assert info.value.code == ExitCode.OOM and list(tmp_path.iterdir()) == []
    err = capsys.readouterr().err
    assert f"error: out of GPU memory during merge; nothing was written to {tmp_path / 'm'}" in err
    assert "--device layers" in err


def test_oom_in_generate_exits_3_with_advice(trained_run, monkeypatch, capsys):
    import qlora.post.generate
    from qlora.generate import main

    monkeypatch.setattr(qlora.post.generate, "generate_answers", out_of_memory)
    with pytest.raises(SystemExit) as info:
        main([str(trained_run), "--prompt", "Say the next number."])
    assert info.value.code == ExitCode.OOM
    assert (
        "error: out of GPU memory during generation\ngive fewer or shorter --prompt values" in capsys.readouterr().err
    )
