"""Today's models in the offline catalog, and any other Hub id by its config.json alone."""

from __future__ import annotations

import pytest

from qlora.config.errors import QLoraError
from qlora.memory.catalog import resolve
from qlora.memory.inventory import load_inventory

# published parameter counts (billions; Gemma 3 4B-27B: the text model without the vision tower)
PUBLISHED = {
    "llama-3.2-1b": 1.24,
    "llama-3.2-3b": 3.21,
    "llama-3.3-70b": 70.6,
    "qwen3-0.6b": 0.60,
    "qwen3-1.7b": 1.72,
    "qwen3-4b": 4.02,
    "qwen3-8b": 8.19,
    "qwen3-14b": 14.8,
    "qwen3-32b": 32.8,
    "gemma-3-1b": 1.00,
    "gemma-3-4b": 3.88,
    "gemma-3-12b": 11.8,
    "gemma-3-27b": 27.0,
    "mistral-small-24b": 23.6,
    "phi-4": 14.7,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_catalog_entries_have_their_published_size(name):
    assert load_inventory(name).parameter_count() / 1e9 == pytest.approx(PUBLISHED[name], rel=0.01)


def test_hub_ids_of_the_new_entries_resolve_offline():
    assert resolve("google/gemma-3-12b-it").name == "gemma-3-12b"
    assert resolve("Qwen/Qwen3-8B").name == "qwen3-8b"


def test_another_hub_id_fetches_its_config_alone(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(tmp_path / "config.json")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", download)
    source = resolve("someone/tiny-model")
    assert (source.name, source.config_path, asked) == (
        "someone/tiny-model",
        tmp_path / "config.json",
        [("someone/tiny-model", "config.json")],
    )


def test_offline_a_hub_id_outside_the_catalog_is_one_line_saying_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(QLoraError) as err:
        resolve("nobody/no-such-model")
    assert str(err.value).startswith(
        "unknown model 'nobody/no-such-model': not in the catalog, and its config.json cannot be fetched from the "
        "Hugging Face Hub ("
    )
    assert str(err.value).endswith("pass a local model folder or its config.json")
