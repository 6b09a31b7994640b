"""A run with `training.report_to: tensorboard`: event files TensorBoard's reader loads, log.jsonl, training.png."""

from __future__ import annotations

import json

import pytest

from qlora.config.recipe import recipe_from_mapping

pytest.importorskip("tensorboard")


@pytest.mark.slow
def test_tensorboard_events_log_jsonl_and_training_png(tiny_llama, alpaca_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from qlora.training.run import train

    out = tmp_path / "run"
    recipe = recipe_from_mapping(
        {
            "model": {"name_or_path": str(tiny_llama)},
            "lora": {"r": 4},
            "data": {"path": str(alpaca_file), "max_seq_len": 200, "eval_size": 8},
            "training": {"max_steps": 4, "batch_size": 4, "grad_accum": 1, "save_steps": 100, "logging_steps": 2},
            "output_dir": str(out),
        },
        ["training.report_to=tensorboard", "training.run_name=tb-check"],
    )
    train(recipe)
    events = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.iterdir())
    reader = EventAccumulator(str(events[0].parent)).Reload()
    assert [e.step for e in reader.Scalars("train/loss")] == [2, 4]
    assert {"train/learning_rate", "train/grad_norm", "eval/loss"} <= set(reader.Tags()["scalars"])
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]
    assert [r["step"] for r in rows if "eval_loss" in r] == [0, 4]  # before and after training
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
