"""`qlora sweep RECIPE --grid key=v1,v2 [--grid ...] [--set ...]`: train every grid point, one table.

Each point is an ordinary training run in its own sub-folder of `output_dir`, run as its own
`python -m qlora.train` process, so its results are exactly what `qlora train` would write and
nothing one point allocated (bitsandbytes never frees its paged optimizer buffers) outlives it. Every
point is built and validated before the first one trains (a typo costs seconds, not the first point's hours).
The results table is rewritten atomically after each point, and a rerun of the same command skips finished
points, resumes points that left a complete checkpoint, and restarts the rest.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from qlora.config.disk import DiskFull
from qlora.config.errors import ExitCode, QLoraError
from qlora.config.io import atomic_write_text
from qlora.config.recipe import Recipe, all_keys, load_recipe, split_assignment
from qlora.training.checkpoints import latest_complete_checkpoint
from qlora.training.plots import write_sweep_plot

log = logging.getLogger(__name__)

RESULTS_NAME = "sweep_results"
RESULT_COLUMNS = ("trainable_params", "eval_loss_before", "eval_loss_after")
TAIL_COLUMNS = ("peak_memory_bytes", "train_runtime_s", "status")
UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._=+-]")
TRAIN_MODULE = "qlora.train"  # what each point runs, as `python -m TRAIN_MODULE RECIPE --set ...`


@dataclass
class Point:
    """One grid point: its values, its sub-folder name, the full recipe it trains, and how to say it on
    the command line (the recipe file and every --set, the sweep's and the point's)."""

    values: dict[str, Any]
    name: str
    recipe: Recipe
    recipe_path: str = ""
    overrides: tuple[str, ...] = ()

    @property
    def folder(self) -> Path:
        return Path(self.recipe.output_dir)


# --- the grid -------------------------------------------------------------------------------------


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """`['lora.alpha=8,32']` -> `{'lora.alpha': [8, 32]}`, values typed like `--set` (YAML)."""
    valid = set(all_keys()) - {"output_dir"}  # the sweep owns each point's output_dir
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, raw = split_assignment(item, "--grid", "key=v1,v2,...", valid)
        if key in grid:
            raise QLoraError(f"--grid {key} is given twice; list all its values in one --grid")
        grid[key] = parse_values(key, raw)
    return grid


def parse_values(key: str, raw: str) -> list[Any]:
    """Comma-separated YAML values; a bracketed list such as `[q_proj,v_proj]` stays one value."""
    try:
        values = yaml.safe_load(f"[{raw}]")
    except yaml.YAMLError:
        raise QLoraError(f"--grid {key}: cannot read the values '{raw}' (expected v1,v2,...)") from None
    if not values:
        raise QLoraError(f"--grid {key}: no values given (expected {key}=v1,v2,...)")
    return values


def display(value: Any) -> str:
    """A grid value as people write it: `8`, `qv`, `[q_proj, v_proj]`."""
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def point_name(values: dict[str, Any]) -> str:
    """A readable, filesystem-safe sub-folder name, e.g. `lora.alpha=8__lora.targets=qv`."""
    parts = []
    for key, value in values.items():
        text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(UNSAFE_NAME_CHARS.sub("_", f"{key}={text}"))
    return "__".join(parts)


def build_points(
    recipe_path: str, overrides: Sequence[str], grid: dict[str, list[Any]], base_dir: Path
) -> list[Point]:
    """Every point of the cartesian product as a validated recipe under `base_dir` (nothing trains yet)."""
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key in grid:
            raise QLoraError(f"{key} is both in --set and in --grid; keep one")
    points = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        name = point_name(values)
        # JSON is YAML, so each value reaches the recipe exactly as it was parsed from --grid.
        point_overrides = [f"{key}={json.dumps(value)}" for key, value in values.items()]
        point_overrides.append(f"output_dir={json.dumps(str(base_dir / name))}")
        try:
            recipe = load_recipe(recipe_path, [*overrides, *point_overrides])
        except QLoraError as exc:
            raise QLoraError(f"grid point {name}: {exc}") from None
        points.append(Point(values, name, recipe, str(recipe_path), (*overrides, *point_overrides)))
    check_unique_names(points)
    return points


def check_unique_names(points: list[Point]) -> None:
    """Two points in one folder would overwrite each other (a repeated value, or names made equal by '_')."""
    seen: set[str] = set()
    for point in points:
        if point.name in seen:
            raise QLoraError(f"--grid: two points share the folder '{point.name}'; remove the repeated value")
        seen.add(point.name)


# --- running the points ---------------------------------------------------------------------------


def read_metrics(folder: Path) -> dict[str, Any] | None:
    """A finished point's metrics.json (written atomically, so present means complete), else None."""
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def lookup(data: dict, key: str) -> Any:
    """The value at a dotted key in plain recipe data (None where a section is missing)."""
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def check_same_recipe(point: Point) -> None:
    """Refuse to reuse a point folder trained with another recipe (its results would be mislabelled)."""
    saved_path = point.folder / "recipe.yaml"
    if not saved_path.is_file():
        return
    saved, current = yaml.safe_load(saved_path.read_text(encoding="utf-8")), point.recipe.to_dict()
    for key in all_keys():
        old, new = lookup(saved, key), lookup(current, key)
        if old != new:
            raise QLoraError(
                f"{point.folder} was trained with {key}={display(old)}, this sweep has {key}={display(new)}; "
                "use another output_dir or delete that folder"
            )


def done_status(metrics: dict[str, Any]) -> str:
    """A finished point's status: ok, unless its last evaluation ran out of memory (train.py notes it)."""
    skipped = metrics.get("eval_after_skipped")
    return f"failed: {skipped}" if skipped else "ok"


def train_command(point: Point, resume: bool) -> list[str]:
    """`python -m qlora.train RECIPE --set ... --resume|--overwrite` for one point."""
    sets = [arg for item in point.overrides for arg in ("--set", item)]
    return [sys.executable, "-m", TRAIN_MODULE, point.recipe_path, *sets, "--resume" if resume else "--overwrite"]


def child_env() -> dict[str, str]:
    """The environment for a point's process: this one, with this qlora first on the import path."""
    package_root = str(Path(__file__).resolve().parents[2])
    paths = [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def run_process(command: list[str]) -> tuple[int, str]:
    """Run `command`, passing its stderr through as it comes; returns (exit code, last `error:` line)."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, env=child_env())
    tail = b""
    try:
        for chunk in iter(lambda: process.stderr.read1(65536), b""):  # progress bars end with \r, not \n
            sys.stderr.write(chunk.decode(errors="replace"))
            sys.stderr.flush()
            tail = (tail + chunk)[-8192:]
        code = process.wait()
    except KeyboardInterrupt:  # the point's process got the same Ctrl-C: let it finish its own exit
        process.wait()
        raise
    errors = [line for line in tail.decode(errors="replace").splitlines() if line.startswith("error: ")]
    return code, errors[-1].removeprefix("error: ") if errors else ""


def run_point(point: Point) -> tuple[str, dict[str, Any] | None]:
    """Train one point (or resume it) in its own process; a failure of the point is returned as a status."""
    resume = latest_complete_checkpoint(point.folder) is not None
    code, error = run_process(train_command(point, resume))
    if code == ExitCode.INTERRUPTED:
        raise KeyboardInterrupt
    if code == ExitCode.OOM:  # in the evaluation after training, the adapter and metrics.json are kept
        return "failed: out of GPU memory", read_metrics(point.folder)
    if code == ExitCode.USAGE and error:
        return f"failed: {error}", None
    if code == ExitCode.NONFINITE:  # this point's learning rate diverged: the others may not
        return "failed: non-finite loss", None
    if code in (ExitCode.PREEMPTED, ExitCode.DISK_FULL, ExitCode.TERMINATED):  # the whole sweep stops (and resumes)
        raise SystemExit(code)
    metrics = read_metrics(point.folder)
    if code != 0 or metrics is None:
        return f"failed: exit code {code}" + (f": {error}" if error else ""), None
    return "ok", metrics


# --- the results table ----------------------------------------------------------------------------


def metric_names(points: list[Point]) -> list[str]:
    """The task metrics the points measure, e.g. ['exact_match'] (the first one ranks the table); preference
    runs measure reward accuracy and margin first."""
    preference = any(p.recipe.training.objective != "sft" for p in points)
    return [
        *(("reward_accuracy", "reward_margin") if preference else ()),
        *sorted({p.recipe.eval.metric for p in points} - {"none"}),
    ]


def columns(grid_keys: Sequence[str], metrics: Sequence[str]) -> list[str]:
    metric_columns = [f"eval_{m}_{when}" for m in metrics for when in ("before", "after")]
    return [*grid_keys, *RESULT_COLUMNS, *metric_columns, *TAIL_COLUMNS]


def result_row(point: Point, status: str, metrics: dict[str, Any] | None, cols: Sequence[str]) -> dict[str, Any]:
    row = {key: display(value) for key, value in point.values.items()}
    row.update({c: (metrics or {}).get(c) for c in cols if c not in row})
    row["status"] = status
    return row


def sort_key(metric: str | None):
    """Best first: ok rows by the task metric (higher is better) else eval loss (lower); then the rest."""

    def key(row: dict[str, Any]):
        if row["status"] != "ok":
            return (2, 0.0, 0.0)
        loss = row.get("eval_loss_after")
        loss = loss if loss is not None else float("inf")  # ties on the metric go to the lower loss
        if metric and row.get(f"eval_{metric}_after") is not None:
            return (0, -row[f"eval_{metric}_after"], loss)
        return (1, loss, 0.0)

    return key


def to_csv(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def cell(column: str, value: Any) -> str:
    """How one value reads in the Markdown and terminal tables."""
    if value is None:
        return ""
    if column == "peak_memory_GiB":
        return f"{value / 2**30:.2f}"
    if column == "train_runtime_s":
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def display_table(rows: list[dict[str, Any]], cols: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Header and cells for people: peak memory in GiB next to (or instead of) the bytes."""
    header = list(cols)
    header.insert(header.index("train_runtime_s"), "peak_memory_GiB")
    body = [[cell(c, row.get("peak_memory_bytes" if c == "peak_memory_GiB" else c)) for c in header] for row in rows]
    return header, body


def to_markdown(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    header, body = display_table(rows, cols)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def write_results(base_dir: Path, rows: list[dict[str, Any]], cols: Sequence[str]) -> None:
    """`sweep_results.csv` and `.md`, each replaced atomically (a reader never sees half a table); a full disk
    is `DiskFull` saying what a rerun keeps."""
    try:
        atomic_write_text(base_dir / f"{RESULTS_NAME}.csv", to_csv(rows, cols))
        atomic_write_text(base_dir / f"{RESULTS_NAME}.md", to_markdown(rows, cols))
    except DiskFull as full:
        full.kept = (
            "every point's own folder is kept; free space, then run the same qlora sweep again "
            "(finished points are skipped, the table is rewritten)"
        )
        raise


def grid_keys_of(header: Sequence[str]) -> list[str]:
    """The grid's columns (dotted recipe keys), whose values may be long lists of targets."""
    return [name for name in header if "." in name]


def print_results(rows: list[dict[str, Any]], cols: Sequence[str], base_dir: Path) -> None:
    header, body = display_table(rows, [c for c in cols if c != "peak_memory_bytes"])
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped or logged: one line per point rather than wrapped cells
    table = Table(title=f"qlora sweep: {base_dir}")
    grid_keys = grid_keys_of(header)
    for name in header:
        # headings wrap at their underscores; values are short and stay on one line
        table.add_column(name.replace("_", " "), overflow="fold", no_wrap=name not in grid_keys)
    for cells in body:
        table.add_row(*cells)
    console.print(table)
    console.print(f"results: {base_dir / RESULTS_NAME}.csv, .md and .png")


# --- the sweep ------------------------------------------------------------------------------------


def sweep(points: list[Point], base_dir: Path, grid_keys: Sequence[str]) -> list[dict[str, Any]]:
    """Run the points in order, rewriting the table after each; returns the rows, best first."""
    names = metric_names(points)
    cols = columns(grid_keys, names)
    rank = sort_key(names[0] if names else None)
    rows = [result_row(p, "pending", None, cols) for p in points]
    for i, point in enumerate(points):
        done = read_metrics(point.folder)
        if done is not None:
            log.info(f"sweep: [{i + 1}/{len(points)}] {point.name}: finished earlier, skipped")
            rows[i] = result_row(point, done_status(done), done, cols)
            continue
        log.info(f"sweep: [{i + 1}/{len(points)}] {point.name}")
        status, metrics = run_point(point)
        rows[i] = result_row(point, status, metrics, cols)
        write_results(base_dir, sorted(rows, key=rank), cols)
    ranked = sorted(rows, key=rank)
    write_results(base_dir, ranked, cols)
    write_sweep_plot(base_dir, [(p.name, p.folder, row) for p, row in zip(points, rows)], names[0] if names else None)
    print_results(ranked, cols, base_dir)
    return ranked
