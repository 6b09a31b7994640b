"""Resolve what the user named (catalog name, Hub id, model folder, config.json) to a local config file.

Everything is offline: recipes name Hub models ('meta-llama/Llama-3.1-8B'), and the catalog records
which Hub ids each shipped config.json stands for, so the profiler never needs the network.
"""

from __future__ import annotations

import json
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
    spelled = {n.lower(): n for n in [*entries, *(h for ids in entries.values() for h in ids)]}
    best = closest(lowered, spelled)
    hint = f" (did you mean '{spelled[best]}'?)" if best else ""
    raise QLoraError(
        f"unknown model '{text}'{hint}: give a catalog name ({', '.join(entries)}), one of their Hub ids, "
        "a model folder or a config.json (the profiler works offline)"
    )
