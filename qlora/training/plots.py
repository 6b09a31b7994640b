"""Figures of a run (`training.png`: train loss, eval loss, learning rate, gradient norm against steps) and of a
sweep (`sweep_results.png`: every point's train loss, and its eval results), drawn from `log.jsonl`.

matplotlib without pyplot (no GUI backend, no global state; a Figure renders with Agg), as qlora.memory.report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qlora.training.logbook import read_log

TRAINING_PNG = "training.png"
# (log key, panel title): the four curves of training.png
CURVES = (
    ("loss", "train loss"),
    ("eval_loss", "eval loss"),
    ("learning_rate", "learning rate"),
    ("grad_norm", "gradient norm"),
)


def series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged key; a step logged twice (a resumed run) keeps its last value."""
    by_step = {}
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            by_step[int(row.get("step", 0))] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def training_figure(rows: Sequence[dict], title: str = ""):
    """A 2 x 2 Figure, one panel per CURVES entry (an empty panel says 'not logged')."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), layout="constrained")
    if title:
        fig.suptitle(title, fontsize=10)
    for ax, (key, name) in zip(fig.subplots(2, 2).flat, CURVES):
        steps, values = series(rows, key)
        ax.set_title(name)
        ax.set_xlabel("step")
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 12 else None, markersize=4)
            ax.grid(alpha=0.3)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    return fig


def write_training_plot(output_dir: Path) -> Path | None:
    """`output_dir/training.png` from `output_dir/log.jsonl` (None when nothing was logged)."""
    rows = read_log(output_dir)
    if not rows:
        return None
    path = Path(output_dir) / TRAINING_PNG
    training_figure(rows, title=str(output_dir)).savefig(path, dpi=100)
    return path


def sweep_figure(points: Sequence[tuple[str, Path, dict]], metric: str | None):
    """Left: each point's train loss against steps; right: each point's result after training (the task metric
    when the sweep measures one, else eval loss). `points`: (name, folder, results-table row), in grid order."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 1.5 + 0.35 * max(len(points), 8)), layout="constrained")
    left, right = fig.subplots(1, 2)
    for name, folder, _ in points:
        steps, values = series(read_log(folder), "loss")
        if steps:
            left.plot(steps, values, label=name)
    left.set_title("train loss")
    left.set_xlabel("step")
    left.grid(alpha=0.3)
    if left.lines:
        left.legend(fontsize=7)
    key = f"eval_{metric}_after" if metric else "eval_loss_after"
    values = [row.get(key) if isinstance(row.get(key), (int, float)) else 0.0 for _, _, row in points]
    right.barh([name for name, _, _ in points], values, color="tab:green" if metric else "tab:blue")
    right.set_title(f"{key} ({'higher' if metric else 'lower'} is better; 0: no result)")
    right.invert_yaxis()
    right.tick_params(axis="y", labelsize=7)
    for y, value in enumerate(values):
        right.annotate(f"{value:.4g}", (value, y), va="center", fontsize=8)
    return fig


def write_sweep_plot(base_dir: Path, points: Sequence[tuple[str, Path, dict]], metric: str | None) -> Path:
    """`base_dir/sweep_results.png`: the sweep's points side by side."""
    path = Path(base_dir) / "sweep_results.png"
    sweep_figure(points, metric).savefig(path, dpi=100)
    return path
