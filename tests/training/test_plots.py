"""training.png (four curves from log.jsonl) and sweep_results.png, drawn from known rows."""

from __future__ import annotations

import json

from qlora.training.logbook import read_log
from qlora.training.plots import sweep_figure, training_figure, write_training_plot

ROWS = [
    {"step": 0, "eval_loss": 4.0},
    {"step": 2, "loss": 3.0, "grad_norm": 1.5, "learning_rate": 1e-3},
    {"step": 4, "loss": 2.0, "grad_norm": 1.0, "learning_rate": 5e-4},
    {"step": 4, "loss": 1.8, "grad_norm": 0.9, "learning_rate": 5e-4},  # a resumed run logs step 4 again
    {"step": 4, "eval_loss": 2.5},
    {"step": 4, "train_loss": 2.4, "train_runtime": 1.0},
]


def curves(fig):
    return {ax.get_title(): [tuple(map(list, line.get_data())) for line in ax.lines] for ax in fig.axes}


def test_training_figure_draws_the_four_curves_against_steps():
    assert curves(training_figure(ROWS)) == {
        "train loss": [([2, 4], [3.0, 1.8])],
        "eval loss": [([0, 4], [4.0, 2.5])],
        "learning rate": [([2, 4], [1e-3, 5e-4])],
        "gradient norm": [([2, 4], [1.5, 0.9])],
    }


def test_training_png_is_written_from_log_jsonl(tmp_path):
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + '\n{"step": 6, "lo')  # torn line
    assert len(read_log(tmp_path)) == len(ROWS)
    path = write_training_plot(tmp_path)
    assert path == tmp_path / "training.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_training_plot(tmp_path / "nothing-logged") is None


def test_sweep_figure_compares_the_points(tmp_path):
    for name, losses in (("a", [3.0, 2.0]), ("b", [3.0, 1.0])):
        (tmp_path / name).mkdir()
        rows = [{"step": 2 * (i + 1), "loss": v} for i, v in enumerate(losses)]
        (tmp_path / name / "log.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    points = [("a", tmp_path / "a", {"eval_exact_match_after": 0.5}), ("b", tmp_path / "b", {"status": "failed"})]
    fig = sweep_figure(points, "exact_match")
    left, right = fig.axes
    assert [line.get_label() for line in left.lines] == ["a", "b"]
    assert [bar.get_width() for bar in right.patches] == [0.5, 0.0]
    assert right.get_title().startswith("eval_exact_match_after (higher is better")
