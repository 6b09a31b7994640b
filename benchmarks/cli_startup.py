"""How long `qlora profile --help` takes to answer: the start-up cost every command pays before its first line.

    python benchmarks/cli_startup.py [--runs 5] [--command "profile --help"]

Runs `python -m qlora.cli <command>` in a fresh process `--runs` times (this interpreter, this checkout on
PYTHONPATH) and prints the best and the median wall time. It asserts nothing: a timing depends on the
machine and its load; tests/test_cli_startup.py holds the property behind it (no torch before parsing).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def time_command(args: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qlora.cli", *args], cwd=ROOT, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes to time (default 5)")
    parser.add_argument(
        "--command", default="profile --help", help="the qlora command line (default 'profile --help')"
    )
    args = parser.parse_args(argv)
    times = [time_command(shlex.split(args.command)) for _ in range(args.runs)]
    print(
        f"qlora {args.command}: best {min(times):.3f} s, median {statistics.median(times):.3f} s "
        f"over {args.runs} runs ({sys.executable})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
