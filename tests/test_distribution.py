"""What `pip install qlora-kit` gets: the name on the package index, and every data file the package reads."""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import tomllib

import qlora

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# `pip install qlora...` that is not qlora-kit: the index's `qlora` is an unrelated project
TAKEN_NAME = re.compile(r"pip install [\"']?qlora(?!-kit)(?=[\[\"' ]|$)", re.MULTILINE)


def test_the_distribution_is_qlora_kit_and_the_command_qlora():
    assert PYPROJECT["project"]["name"] == qlora.DISTRIBUTION == "qlora-kit"
    assert PYPROJECT["project"]["scripts"] == {"qlora": "qlora.cli:main"}
    assert {"kernels", "deepspeed", "tensorboard", "wandb", "trackio", "mlflow"} <= set(
        PYPROJECT["project"]["optional-dependencies"]
    )
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and (ROOT / "LICENSE").exists()


def test_no_message_or_doc_installs_the_taken_name():
    files = [ROOT / "README.md", ROOT / "Makefile", *ROOT.glob("notebooks/*.ipynb"), *(ROOT / "qlora").rglob("*.py")]
    found = [
        f"{path.relative_to(ROOT)}: {m.group(0)}" for path in files for m in TAKEN_NAME.finditer(path.read_text())
    ]
    assert found == []
    assert TAKEN_NAME.search("pip install 'qlora[kernels]'") and not TAKEN_NAME.search("pip install 'qlora-kit[x]'")


def test_every_data_file_of_the_package_is_package_data():
    """The wheel holds what the package reads at run time: the catalog, measured overheads, the demo."""
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["qlora"]
    package = ROOT / "qlora"
    data = [
        p.relative_to(package).as_posix()
        for p in package.rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts
    ]
    assert [f for f in data if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)] == []
    assert {
        "demo/demo.yaml",
        "demo/assets/base-model/model.safetensors",
        "memory/measured/cuda-nvidia-h200/overheads.json",
    } <= set(data)
