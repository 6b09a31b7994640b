"""`output_dir/log.jsonl`: every line the Trainer logs (train loss, learning rate, gradient norm, eval loss), one
JSON object per logged step, written by the main process as it happens (a crashed run keeps what it logged).

It is what `training.png` is drawn from, and a file any script reads without a tracker installed.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

LOG_NAME = "log.jsonl"


def log_callback(output_dir: Path):
    """A Trainer callback appending `{"step", "epoch", "time", **logs}` to `output_dir/log.jsonl`."""
    from transformers import TrainerCallback

    path = Path(output_dir) / LOG_NAME

    class LogToJsonl(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3)}
            row.update({k: _plain(v) for k, v in logs.items()})
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    return LogToJsonl()


def _plain(value):
    """A JSON-safe number (NaN/inf as strings: json.dumps would write invalid JSON), or the value."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_log(output_dir: Path) -> list[dict]:
    """The rows of `output_dir/log.jsonl` (none when the file is missing; a torn last line is skipped)."""
    path = Path(output_dir) / LOG_NAME
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows
