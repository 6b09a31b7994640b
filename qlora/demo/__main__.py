"""`qlora demo` / `python -m qlora.demo`: the offline demo from the installed package, nothing downloaded.

Fine-tunes the packaged 5M-parameter Llama on its instruction data (SFT; `--classify`: the 5-way
classification demo) into ./runs/demo (`--out` to change); the same run as `qlora train` on the recipe.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qlora.config.errors import run_cli
from qlora.config.recipe import load_recipe
from qlora.demo import RECIPES


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="qlora demo", description="Run the offline CPU demo that ships with qlora (about a minute on a CPU)."
    )
    parser.add_argument(
        "--classify", action="store_true", help="the sequence-classification demo instead of instruction tuning"
    )
    parser.add_argument("--out", default=None, help="output folder (default: ./runs/demo, ./runs/demo-classify)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set training.report_to=tensorboard (repeatable)",
    )
    return parser.parse_args(argv)


def recipe_path(classify: bool):
    """The packaged demo recipe (its relative paths resolve against the package's assets/)."""
    return RECIPES / ("demo-classify.yaml" if classify else "demo.yaml")


def main(argv: Sequence[str] | None = None) -> int:
    from qlora.training.run import train

    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"output_dir={args.out}"] if args.out else [])
    recipe = load_recipe(recipe_path(args.classify), overrides)
    print(f"demo: {recipe.source} -> {recipe.output_dir}", file=sys.stderr)
    train(recipe, overwrite=True)  # a demo is rerun as is: its previous results are replaced
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
