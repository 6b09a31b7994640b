"""Every command builds its parser without importing torch or transformers: `--help` and a mistyped flag answer
at once (benchmarks/cli_startup.py times it)."""

from __future__ import annotations

import subprocess
import sys

COMMANDS = ("train", "profile", "sweep", "export", "merge", "generate")

PROBE = """
import contextlib, importlib, io, sys
import qlora.cli
for name in {commands!r}:
    module = importlib.import_module("qlora." + name)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        module.parse_args(["--help"])
    heavy = sorted(m for m in ("torch", "transformers", "peft", "datasets", "bitsandbytes") if m in sys.modules)
    print(name, ",".join(heavy) or "-")
"""


def test_no_parser_imports_torch():
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(commands=COMMANDS)], capture_output=True, text=True, check=True
    )
    assert done.stdout.split("\n")[:-1] == [f"{name} -" for name in COMMANDS], done.stderr


def test_qlora_profile_help_answers_without_torch():
    probe = (
        "import contextlib, io, sys, qlora.cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
        "    qlora.cli.main(['profile', '--help'])\n"
        "print('torch' in sys.modules, '--seq-len' in out.getvalue())"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "True"], done.stderr
