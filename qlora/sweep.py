"""`qlora sweep RECIPE --grid key=v1,v2 [--grid ...] [--set ...]` / `python -m qlora.sweep` (qlora.training.sweep)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from qlora.config.environment import prepare_process
from qlora.config.errors import ExitCode, run_cli
from qlora.config.log import add_verbosity_flags, configure_logging, verbosity
from qlora.config.recipe import load_recipe
from qlora.training.sweep import build_points, check_same_recipe, parse_grid, sweep


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="qlora sweep", description="Train every point of a grid over recipe keys and tabulate the results."
    )
    parser.add_argument("recipe", help="recipe YAML file, e.g. recipes/demo.yaml")
    parser.add_argument(
        "--grid",
        action="append",
        required=True,
        metavar="KEY=V1,V2,...",
        help="a recipe key and its values, e.g. --grid lora.alpha=8,32 (repeatable)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key for every point, e.g. --set training.max_steps=8 (repeatable)",
    )
    add_verbosity_flags(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 when every point trained, 1 when some failed (their status says why), 2 on a user mistake."""
    args = parse_args(argv)
    prepare_process()  # expandable segments before CUDA initialises (qlora.config.environment)
    configure_logging(verbosity(args))
    grid = parse_grid(args.grid)
    base_dir = Path(load_recipe(args.recipe, args.overrides).output_dir)
    points = build_points(args.recipe, args.overrides, grid, base_dir)
    for point in points:
        check_same_recipe(point)
    print(f"sweep: {len(points)} points under {base_dir}", file=sys.stderr)
    rows = sweep(points, base_dir, list(grid))
    return ExitCode.OK if all(row["status"] == "ok" for row in rows) else ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(run_cli(main))
