"""`qlora generate OUT --prompt TEXT` / `python -m qlora.generate` (qlora.post.generate)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from qlora.config.environment import prepare_process
from qlora.config.errors import QLoraError, run_cli
from qlora.config.log import add_verbosity_flags, configure_logging, verbosity


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="qlora generate", description="Generate with a trained adapter on its 4-bit base."
    )
    parser.add_argument("run", help="a `qlora train` output folder")
    parser.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="an instruction, or for a classifier a text to label (repeatable)",
    )
    parser.add_argument(
        "--input", dest="inputs", action="append", help="the instruction's input/context (one per --prompt)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    parser.add_argument("--raw", action="store_true", help="send the prompt as is, without the training template")
    parser.add_argument("--compare", action="store_true", help="also show the base model's answer (adapter off)")
    add_verbosity_flags(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()  # expandable segments before CUDA initialises (qlora.config.environment)
    configure_logging(verbosity(args))
    if args.max_new_tokens < 1:
        raise QLoraError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    # Imported after parsing: generation imports torch, transformers and peft (about 3 s), which `--help` and
    # an argument mistake never need.
    from qlora.post.export import read_run
    from qlora.post.generate import generate
    from qlora.training.oom import OutOfMemoryExit

    advice = ["give fewer or shorter --prompt values, or a smaller --max-new-tokens"]
    with OutOfMemoryExit("generation", advice):
        results = generate(read_run(args.run), args.prompt, args.inputs, args.max_new_tokens, args.raw, args.compare)
    for result in results:
        print(f"### prompt\n{result['prompt']}")
        if "base" in result:
            print(f"### base\n{result['base'].strip()}")
        print(f"### adapter\n{result['adapter'].strip()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
