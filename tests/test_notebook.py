"""The Colab notebook runs top to bottom on CPU (its no-GPU path trains the demo recipe), so it cannot rot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "qlora_colab.ipynb"


def this_python_kernel(folder: Path) -> str:
    """A kernelspec that starts the test's own interpreter (a user-level 'python3' spec may point at
    another Python without qlora); JUPYTER_PATH puts it first in the kernel search."""
    spec = folder / "kernels" / "qlora-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "qlora test", "language": "python"}))
    return spec.name


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_executes_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    import nbformat
    from huggingface_hub import ModelCard
    from nbclient import NotebookClient

    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("QLORA_NOTEBOOK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the CPU path, even on a GPU machine
    kernel = this_python_kernel(tmp_path / "jupyter")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name=kernel, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    metrics = json.loads((tmp_path / "work" / "demo" / "metrics.json").read_text())
    assert metrics["train_steps"] == 5 and metrics["device"] == "cpu"
    assert "adapter: " in text and "base: " in text
    card = ModelCard.load(tmp_path / "work" / "export" / "README.md")
    assert card.data.library_name == "peft" and "qlora" in card.data.tags
    assert (tmp_path / "work" / "export" / "adapter_model.safetensors").exists()
    assert "set HUB_REPO above" in text
