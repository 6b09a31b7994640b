"""`python -m qlora.profile`: see `qlora.profile.cli`."""

import sys

from qlora.errors import run_cli
from qlora.profile.cli import main

sys.exit(run_cli(main))
