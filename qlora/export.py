"""`qlora export OUT --to DIR | --hub USER/REPO` / `python -m qlora.export` (qlora.post.export)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from qlora.config.environment import prepare_process
from qlora.config.errors import run_cli
from qlora.config.log import add_verbosity_flags, configure_logging, verbosity


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="qlora export", description="Export a trained adapter as a Hub-ready folder, or push it."
    )
    parser.add_argument("run", help="a `qlora train` output folder (holds adapter/, metrics.json, recipe.yaml)")
    parser.add_argument("--to", type=Path, help="write the folder here")
    parser.add_argument("--hub", metavar="USER/REPO", help="upload the folder to this Hugging Face model repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--base-model", metavar="ID", help="the base's Hub id, when training used a local copy of it")
    parser.add_argument(
        "--license", dest="license_id", metavar="ID", help="license for the card (default: the base's)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --to folder")
    parser.add_argument(
        "--skip-space-check",
        action="store_true",
        help="write even when the file system of --to reports less free space than the exported adapter needs "
        "(for file systems that report wrongly, e.g. some network mounts)",
    )
    add_verbosity_flags(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()  # expandable segments before CUDA initialises (qlora.config.environment)
    configure_logging(verbosity(args))
    # Imported after parsing: the export layer imports torch and peft (about 3 s), which `--help` never needs.
    from qlora.post.export import export, read_run

    result = export(
        read_run(args.run),
        args.to,
        args.hub,
        args.private,
        args.base_model,
        args.license_id,
        args.overwrite,
        args.skip_space_check,
    )
    if "folder" in result:
        print(f"exported {args.run} -> {result['folder']} (base_model: {result['base_model']})")
    if "hub" in result:
        print(f"pushed to https://huggingface.co/{args.hub} ({result['hub']})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
