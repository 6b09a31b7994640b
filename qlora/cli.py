"""The `qlora` command: one entry point, one subcommand per module (each also runs as `python -m`)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from qlora import __version__
from qlora.config.errors import QLoraError, did_you_mean, run_cli

# subcommand -> (module whose `main(argv)` runs it, one-line help)
SUBCOMMANDS = {
    "init": ("qlora.init", "write a recipe sized for your GPU and data"),
    "train": ("qlora.train", "fine-tune from a YAML recipe"),
    "profile": ("qlora.profile", "memory tables, fit planner and measured peaks"),
    "sweep": ("qlora.sweep", "train every point of a grid over recipe keys"),
    "export": ("qlora.export", "write a Hub-ready adapter folder or push it"),
    "merge": ("qlora.merge", "merge the adapter into a 16-bit model"),
    "generate": ("qlora.generate", "generate text with a trained adapter"),
    "demo": ("qlora.demo.__main__", "run the offline demo that ships with qlora (CPU, about a minute)"),
}


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: qlora <command> [options]   (qlora <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def dispatch(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"qlora {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        raise QLoraError(f"unknown command '{name}'{did_you_mean(name, SUBCOMMANDS)}")
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return module.main(rest)


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(dispatch, argv)


if __name__ == "__main__":
    sys.exit(main())
