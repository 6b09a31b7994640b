"""`qlora merge OUT --to DIR` / `python -m qlora.merge` (qlora.post.merge)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from qlora.config.environment import prepare_process
from qlora.config.errors import ExitCode, QLoraError, run_cli
from qlora.config.gpus import parse_gpu_memory
from qlora.config.log import add_verbosity_flags, configure_logging, verbosity

# The merge layers import torch, transformers and peft (about 4 s): main() imports them after parsing, so the
# parser names their choices here (tests/post/test_merge.py checks them against qlora.post.merge's and
# qlora.memory.merge's).
SAVE_DTYPE_NAMES = ("bfloat16", "float16")
PLACEMENT_NAMES = ("auto", "cuda", "layers", "cpu")


def parse_args(argv: Sequence[str] | None):
    parser = argparse.ArgumentParser(
        prog="qlora merge", description="Merge a trained adapter into a plain 16-bit model."
    )
    parser.add_argument("run", help="a `qlora train` output folder")
    parser.add_argument("--to", type=Path, required=True, help="folder for the merged model")
    parser.add_argument("--dtype", choices=SAVE_DTYPE_NAMES, default="float16", help="storage dtype (default float16)")
    parser.add_argument(
        "--device",
        choices=PLACEMENT_NAMES,
        default="auto",
        help="where to merge: cuda (whole model on the GPU), layers (one layer at a time on the GPU, "
        "the merged model in CPU memory), cpu, or auto (the first of these that fits; default)",
    )
    parser.add_argument(
        "--gpu-memory", metavar="SIZE", help="GPU memory the merge may use, e.g. 12GiB (default: all that is free)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --to folder")
    parser.add_argument(
        "--skip-space-check",
        action="store_true",
        help="write even when the file system of --to reports less free space than the merged model needs "
        "(for file systems that report wrongly, e.g. some network mounts)",
    )
    add_verbosity_flags(parser)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    prepare_process()  # expandable segments before CUDA initialises (qlora.config.environment)
    configure_logging(verbosity(args))
    from qlora.post.export import read_run
    from qlora.post.merge import CHECK_INSTRUCTIONS, FLOOR_MULTIPLE, MAX_RELATIVE_DIFF, auto_class, merge
    from qlora.training.oom import OutOfMemoryExit

    run = read_run(args.run)
    try:
        budget = parse_gpu_memory(args.gpu_memory) if args.gpu_memory else None
    except QLoraError:
        raise QLoraError(f"--gpu-memory: expected a size such as '12GiB', got '{args.gpu_memory}'") from None
    advice = ["merge layer by layer (--device layers) or on the CPU (--device cpu), or give a smaller --gpu-memory"]
    with OutOfMemoryExit("merge", advice, kept=f"nothing was written to {args.to}"):
        check = merge(run, args.to, args.dtype, args.overwrite, args.device, budget, args.skip_space_check)
    print(
        f"merge check: max |logit diff| {check.max_abs_diff:.4g} against the adapter's change "
        f"{check.adapter_change:.4g}: "
        f"{100 * check.relative:.3f} % (limit {100 * MAX_RELATIVE_DIFF:.0f} %), "
        f"{check.max_abs_diff / check.floor if check.floor else 0:.2f}x "
        f"the rounding floor {check.floor:.4g} (limit "
        f"{FLOOR_MULTIPLE:g}x){'' if check.finite else ', NON-FINITE logits'} over {check.positions} positions "
        f"of {len(CHECK_INSTRUCTIONS)} prompts, merged {args.dtype} model vs 4-bit base + adapter (merged on "
        f"{check.placement})"
    )
    if not check.ok:
        print(
            f"error: the merged model does not match the 4-bit base + adapter; nothing was written to {args.to}",
            file=sys.stderr,
        )
        return ExitCode.MERGE_MISMATCH
    print(
        f"merged model -> {args.to} ({args.dtype}, safetensors); load it with "
        f"{auto_class(run).__name__}.from_pretrained"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
