"""Render profiles: a rich terminal table, Markdown, JSON and a stacked-bar PNG per model.

Every format is made from the same `Run` objects, so they show the same numbers; JSON keeps exact
integer bytes (components add up to `total_bytes`), the others round to GiB (MiB for small models).
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from qlora.config.disk import size, writing
from qlora.config.io import atomic_write_json, atomic_write_text
from qlora.config.precision import dtype_name
from qlora.memory.estimate import COMPONENTS, Estimate, compute_dtype, liger_kernels
from qlora.memory.planner import FitPlan, MethodFit
from qlora.memory.settings import Settings

COLORS = {
    "weights": "#4c72b0",
    "adapters": "#dd8452",
    "gradients": "#c44e52",
    "optimizer": "#8172b3",
    "activations": "#55a868",
    "overhead": "#937860",
}


@dataclass
class Measurement:
    """Measured peak bytes of one method's training step, split like the prediction where measurable."""

    method: str
    device: str
    peak: int
    bytes: dict[str, int] = field(default_factory=dict)
    phases: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "device": self.device,
            "peak_bytes": self.peak,
            "bytes": dict(self.bytes),
            "phase_peaks": dict(self.phases),
        }


@dataclass
class Result:
    """One method of one run: the prediction and, with --measure, the measured peak."""

    estimate: Estimate
    measured: Measurement | None = None
    disk: dict | None = None  # qlora.memory.disk.profile_disk: checkpoints, adapter and merged model on disk

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured, comparing like with like: tensors against tensors."""
        if self.measured is None:
            return None
        return (self.estimate.allocated - self.measured.peak) / self.measured.peak


@dataclass
class Run:
    """One model (or recipe) at one set of settings, every method profiled, and its fit plan."""

    label: str  # the model name, or the recipe's file name (without .yaml) for --recipe
    model: str
    settings: Settings
    results: list[Result]
    plan: FitPlan | None = None
    recipe: str | None = None
    environment: dict = field(default_factory=dict)  # device and library versions, with --measure
    cards: dict = field(default_factory=dict)  # --gpus auto: method -> sharding.CardPlan per strategy

    def fit(self, method: str) -> MethodFit | None:
        return next((f for f in self.plan.methods if f.method == method), None) if self.plan else None


def loss_words(settings: Settings) -> str:
    """How the step scores tokens: qlora's loss, or a preference objective's pairs through TRL's head."""
    if settings.objective == "sft":
        return f"{settings.loss} loss"
    reference = "precomputed reference" if settings.precompute_ref else "reference forward"
    return f"{settings.objective.upper()} pairs (chosen + rejected), TRL's log-prob head, {reference}"


def describe(settings: Settings) -> str:
    """The settings in one line, as tables and captions show them."""
    targets = settings.targets if isinstance(settings.targets, str) else ",".join(settings.targets)
    task = f"classifier ({settings.num_labels} labels) · " if settings.task == "classification" else ""
    return (
        f"{task}seq {settings.seq_len:,} · batch {settings.batch_size} · r {settings.rank} ({targets}) · "
        f"{settings.optimizer} · {'checkpointing' if settings.checkpointing else 'no checkpointing'} · "
        f"{settings.attn_implementation} · {dtype_name(compute_dtype(settings))} on {settings.device}"
        f"{'' if settings.task == 'classification' else f' · {loss_words(settings)}'}"
        f"{f' · eval batch {settings.eval_batch}' if settings.eval_batch != settings.batch_size else ''}"
        + (" · Liger kernels" if liger_kernels(settings) else "")
        + (f" · MLP tiles {settings.mlp_tiles}" if settings.mlp_tiles != "auto" else "")
        + (
            f" · offloaded checkpoints ({str(settings.offload_checkpoints).lower()})"
            if settings.offload_checkpoints
            else ""
        )
        + (
            f" · per GPU of {settings.gpus}, "
            f"{settings.strategy}{' + CPU offload' if settings.offload == 'cpu' else ''}"
            if settings.gpus > 1
            else ""
        )
    )


def unit(runs: list[Run]) -> tuple[str, int]:
    """GiB, or MiB when every total is below 1 GiB (the small models --measure runs on a CPU)."""
    largest = max(r.estimate.total for run in runs for r in run.results)
    return ("GiB", 2**30) if largest >= 2**30 else ("MiB", 2**20)


def header(runs: list[Run]) -> list[str]:
    name, _ = unit(runs)
    cols = ["Model", "Method"] + [c.capitalize() for c in COMPONENTS] + [f"Total ({name})", "Train step / eval step"]
    if any(r.measured for run in runs for r in run.results):
        cols += [f"Measured ({name})", "Error"]
    plan = next((run.plan for run in runs if run.plan), None)
    if plan:  # a table shows one group: one GPU, one batch size and sequence length
        s = plan.settings
        cols += [
            f"Fits {plan.gpu_bytes / 2**30:g} GiB",
            f"Max seq (batch {s.batch_size})",
            f"Max batch (seq {s.seq_len:,})",
        ]
    return cols


def rows(runs: list[Run]) -> list[list[str]]:
    """The table's cells, one row per model × method, shared by the terminal and Markdown tables."""
    _, scale = unit(runs)
    measuring, planning = any(r.measured for run in runs for r in run.results), any(run.plan for run in runs)
    out = []
    for run in runs:
        for result in run.results:
            e = result.estimate
            row = (
                [run.label, e.method]
                + [f"{e.bytes[c] / scale:.2f}" for c in COMPONENTS]
                + [f"{e.total / scale:.2f}", phase_cell(e, scale)]
            )
            if measuring:
                m = result.measured
                row += [f"{m.peak / scale:.2f}", f"{result.error:+.2%}"] if m else ["", ""]
            if planning:
                fit = run.fit(e.method)
                row += _fit_cells(fit) if fit else ["", "", ""]
            out.append(row)
    return out


def phase_cell(e: Estimate, scale: int) -> str:
    """Both phases' totals, the peak one (what Total shows) marked."""
    cells = [
        f"{e.phases[name]['total_bytes'] / scale:.2f}" + ("*" if name == e.phase else "")
        for name in ("train", "eval")
        if name in e.phases
    ]
    return " / ".join(cells)


def _fit_cells(fit: MethodFit) -> list[str]:
    return [
        "yes" if fit.fits else "no",
        f"{fit.max_seq_len:,}" if fit.max_seq_len else "—",
        f"{fit.max_batch_size:,}" if fit.max_batch_size else "—",
    ]


def groups(runs: list[Run]) -> list[list[Run]]:
    """Consecutive runs that share settings and GPU: one table each."""
    return [
        list(group)
        for _, group in itertools.groupby(runs, lambda run: (run.settings, run.plan.gpu_bytes if run.plan else None))
    ]


def print_table(runs: list[Run], console=None) -> None:
    """The rich terminal table(s), then the fit advice."""
    console = console or Console(width=None if sys.stdout.isatty() else 200)  # piped: no wrapping at 80
    for group in groups(runs):
        name, _ = unit(group)
        table = Table(title=f"Predicted peak training memory ({name})", caption=describe(group[0].settings))
        for i, col in enumerate(header(group)):
            table.add_column(
                col,
                justify="left" if i < 2 else "right",
                no_wrap=i == 0,
                style="bold" if col.startswith("Total") else None,
            )
        for row in rows(group):
            table.add_row(*row)
        console.print(table)
        for line in advice(group):
            console.print(line, markup=False, highlight=False)
        for line in disk_lines(group):
            console.print(line, markup=False, highlight=False, soft_wrap=True)


def disk_lines(runs: list[Run]) -> list[str]:
    """Disk beside memory: what a run writes to its output_dir, and a merged model, per method."""
    lines = []
    for run in runs:
        for result in run.results:
            d = result.disk
            if not d:
                continue
            lines.append(
                f"disk, {run.label} {result.estimate.method}: checkpoint {size(d['checkpoint_bytes'])} (adapter "
                f"{size(d['adapter_bytes'])}, optimizer {size(d['optimizer_bytes'])}) x {d['checkpoints_at_once']} at "
                f"once + adapter = {size(d['total_bytes'])} in output_dir; merged (float16) "
                f"{size(d['merged_float16_bytes'])}"
            )
    return lines


def advice(runs: list[Run]) -> list[str]:
    return [line for run in runs if run.plan for line in run.plan.advice() + cards_advice(run)]


def cards_advice(run: Run) -> list[str]:
    """--gpus auto: how many GPUs of the planned size each strategy needs."""
    lines = []
    for method, plans in run.cards.items():
        lines.append(f"{run.model} {method} on GPUs of {run.plan.gpu_bytes / 2**30:.2f} GiB, fewest per strategy:")
        lines += [f"  - {p.line(run.plan.gpu_bytes)}" for p in plans]
    return lines


def to_markdown(runs: list[Run], command: str | None = None) -> str:
    """Markdown tables (one per settings group), fit advice, and the measuring environment."""
    lines = [f"Made by `{command}`.", ""] if command else []
    for group in groups(runs):
        name, _ = unit(group)
        cols = header(group)
        lines += [
            f"**{describe(group[0].settings)}** — predicted peak memory per training step ({name})",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "|".join(["---"] * 2 + ["---:"] * (len(cols) - 2)) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in rows(group)]
        lines += [
            "",
            "Total is the run's peak: the larger of the training step and the eval step (marked *); the eval step "
            "is a no-grad forward at the eval batch size with the optimizer states alive and no gradients.",
        ]
        lines += measured_rows(group)
        fit_lines = advice(group)
        if fit_lines:
            lines += ["", "Fit plan:", ""] + [
                f"- {line}" if not line.startswith("  ") else f"  {line.strip()}" for line in fit_lines
            ]
        if disk_lines(group):
            lines += [""] + [f"- {line}" for line in disk_lines(group)]
        lines.append("")
    environment = next((run.environment for run in runs if run.environment), None)
    if environment:
        lines += ["Measured on: " + ", ".join(f"{k} {v}" for k, v in environment.items()), ""]
    return "\n".join(lines)


def measured_rows(runs: list[Run]) -> list[str]:
    """A Markdown table of the measured components beside the predicted ones (bytes), when measured."""
    measured = [(run, r) for run in runs for r in run.results if r.measured]
    if not measured:
        return []
    lines = [
        "",
        "Measured at the peak vs predicted, bytes (measured / predicted):",
        "",
        "| Model | Method | " + " | ".join(c.capitalize() for c in COMPONENTS) + " | Peak |",
        "|---|---|" + "---:|" * (len(COMPONENTS) + 1),
    ]
    for run, r in measured:
        cells = [f"{r.measured.bytes.get(c, 0):,} / {r.estimate.bytes[c]:,}" for c in COMPONENTS]
        lines.append(
            f"| {run.label} | {r.estimate.method} | "
            + " | ".join(cells)
            + f" | {r.measured.peak:,} / {r.estimate.allocated:,} |"
        )
    return lines


def to_json(runs: list[Run]) -> dict:
    """The GUIDE's schema: runs → model, settings, results (method, bytes, total_bytes, …)."""
    out = []
    for run in runs:
        results = []
        for result in run.results:
            entry = result.estimate.to_dict()
            if result.measured:
                entry["measured_total_bytes"] = result.measured.peak
                entry["measured"] = result.measured.to_dict()
            fit = run.fit(result.estimate.method)
            if fit:
                entry["fit"] = fit.to_dict()
            if result.disk:
                entry["disk"] = dict(result.disk)
            results.append(entry)
        item = {
            "model": run.model,
            "settings": run.settings.to_dict(),
            "compute_dtype": dtype_name(compute_dtype(run.settings)),
            "results": results,
        }
        if run.recipe:
            item["recipe"] = run.recipe
        if run.plan:
            item["gpu_bytes"], item["advice"] = run.plan.gpu_bytes, run.plan.advice() + cards_advice(run)
        if run.cards:
            item["gpus_needed"] = {m: [p.to_dict() for p in plans] for m, plans in run.cards.items()}
        if run.environment:
            item["environment"] = run.environment
        out.append(item)
    return {"runs": out}


def plot(run: Run, path: Path) -> Path:
    """A stacked bar per method (components in GiB), the GPU's size as a line, measured peaks as marks."""
    # Imported here: only --out draws a PNG, and matplotlib costs about 0.5 s to import on every profile.
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state (renders with Agg)

    name, scale = unit([run])
    width = 3.4 + 1.4 * len(run.results)  # inches: the bars and the legend beside them
    fig = Figure(figsize=(width, 4.8), layout="constrained")
    ax = fig.add_subplot()
    methods = [r.estimate.method for r in run.results]
    bottoms = [0.0] * len(methods)
    for component in COMPONENTS:
        heights = [r.estimate.bytes[component] / scale for r in run.results]
        ax.bar(methods, heights, bottom=bottoms, label=component, color=COLORS[component], width=0.6)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, total in enumerate(bottoms):
        ax.annotate(f"{total:.1f}", (x, total), ha="center", va="bottom", fontsize=9)
    measured = [(x, r.measured.peak / scale) for x, r in enumerate(run.results) if r.measured]
    if measured:
        ax.scatter(*zip(*measured), marker="_", s=900, color="black", zorder=3, label="measured")
    if run.plan:
        ax.axhline(
            run.plan.gpu_bytes / scale,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"GPU ({run.plan.gpu_bytes / scale:g} {name})",
        )
    ax.set_ylabel(name)
    ax.set_xlabel(
        textwrap.fill(describe(run.settings), int(width * 11)), fontsize=7, color="dimgray"
    )  # within the figure
    ax.set_title(textwrap.fill(f"{run.label}: peak training memory", int(width * 8)), fontsize=11)
    handles, labels = ax.get_legend_handles_labels()  # outside the bars, top to bottom as they stack
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    partial = path.with_name(f".{path.name}.tmp")  # then renamed: a reader never sees half a PNG
    try:
        with writing(path.name, path):
            fig.savefig(partial, dpi=120, format="png")
            os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def slug(text: str) -> str:
    """A file-name-safe form of a model or recipe label."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"


def write(runs: list[Run], folder: Path, command: str | None = None) -> list[Path]:
    """memory.md, memory.json and memory-<label>.png per run, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / "memory.md", folder / "memory.json"]
    atomic_write_text(written[0], to_markdown(runs, command))
    atomic_write_json(written[1], to_json(runs))
    for run in runs:
        written.append(plot(run, folder / f"memory-{slug(run.label)}.png"))
    return written
