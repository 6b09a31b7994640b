"""Resolve what the user named (catalog name, Hub id, model folder, config.json) to a local config file.

Recipes name Hub models ('meta-llama/Llama-3.1-8B'), and the catalog records which Hub ids each shipped
config.json stands for, so the profiler needs no network for them. Any other Hub id: its config.json alone is
fetched with huggingface_hub (cached; never the weights); offline or not found, a one-line error says what to pass.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from qlora.config.errors import QLoraError, closest

CATALOG_DIR = Path(__file__).resolve().parent.parent / "catalog"


@dataclass(frozen=True)
class ModelSource:
    """A named config file: `name` is what reports show (catalog name, folder or file name)."""

    name: str
    config_path: Path
    hub_ids: tuple[str, ...] = ()


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # 'org/name'


def hub_config(repo_id: str) -> Path:
    """The Hub model's config.json, from the cache or downloaded alone (one request, no weights)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, "config.json", etag_timeout=10))
    except Exception as exc:  # offline, not found, gated, no network: all mean "cannot have it here"
        raise QLoraError(
            f"unknown model '{repo_id}': not in the catalog, and its config.json cannot be fetched from the "
            f"Hugging Face Hub ({type(exc).__name__}); pass a local model folder or its config.json"
        ) from None


@lru_cache(maxsize=1)
def catalog() -> dict[str, tuple[str, ...]]:
    """Catalog name -> the Hub ids whose config it is."""
    index = json.loads((CATALOG_DIR / "index.json").read_text(encoding="utf-8"))
    return {name: tuple(entry["hub_ids"]) for name, entry in index.items()}


def resolve(source: str) -> ModelSource:
    """The config file for `source`; a `QLoraError` listing the catalog when nothing matches."""
    text = str(source).strip()
    entries = catalog()
    lowered = text.lower()
    for name, hub_ids in entries.items():
        if lowered == name or lowered in (h.lower() for h in hub_ids):
            return ModelSource(name, CATALOG_DIR / name / "config.json", hub_ids)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise QLoraError(f"model folder {text} has no config.json")
        return ModelSource(path.resolve().name, path / "config.json")
    if path.is_file():
        return ModelSource(path.stem if path.name != "config.json" else path.resolve().parent.name, path)
    if text.endswith(".json") or text.startswith(("/", "./", "../", "~")):
        raise QLoraError(f"model config not found: {text}")
    if HUB_ID.match(text):
        return ModelSource(text, hub_config(text), (text,))
    spelled = {n.lower(): n for n in [*entries, *(h for ids in entries.values() for h in ids)]}
    best = closest(lowered, spelled)
    hint = f" (did you mean '{spelled[best]}'?)" if best else ""
    raise QLoraError(
        f"unknown model '{text}'{hint}: give a catalog name ({', '.join(entries)}), one of their Hub ids, "
        "a model folder or a config.json (the profiler works offline)"
    )
