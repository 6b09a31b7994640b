"""`qlora train RECIPE` / `python -m qlora.train RECIPE`: recipe in, adapter + metrics out (qlora.training.run)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qlora.config.environment import prepare_process
from qlora.config.errors import run_cli
from qlora.config.log import add_verbosity_flags, configure_logging, verbosity
from qlora.config.recipe import load_recipe


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="qlora train", description="Fine-tune a model with (Q)LoRA from a YAML recipe."
    )
    parser.add_argument("recipe", help="recipe YAML file, e.g. recipes/demo.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set lora.r=16 (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace results already in output_dir")
    parser.add_argument(
        "--skip-space-check",
        action="store_true",
        help="start even when output_dir's file system reports less free space than the run's checkpoints "
        "and adapter need (for file systems that report wrongly, e.g. some network mounts)",
    )
    add_verbosity_flags(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()  # expandable segments before CUDA initialises (qlora.config.environment)
    configure_logging(verbosity(args))
    recipe = load_recipe(args.recipe, args.overrides)
    # Imported once the arguments and the recipe are checked: training imports torch, transformers and peft
    # (about 8 s on two cores), which `--help` and a recipe mistake never need.
    from qlora.training.run import train

    train(recipe, resume=args.resume, overwrite=args.overwrite, skip_space_check=args.skip_space_check)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
