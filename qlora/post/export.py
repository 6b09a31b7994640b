"""`qlora export OUT --to DIR [--hub USER/REPO [--private]]`: a finished run's adapter, ready to share.

The folder holds what someone else needs to use the adapter and nothing they would have to trust:
the adapter in safetensors (never pickles), its config naming the base by Hub id instead of this
machine's path, the tokenizer, and a model card. `--hub` uploads that same folder; the token comes
from huggingface_hub (HF_TOKEN or the login cache) and is never read, printed or written here.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id
from peft import PeftConfig

from qlora.config.disk import DiskFull, check_free_space, writing
from qlora.config.errors import QLoraError
from qlora.config.io import atomic_write_text, publish_dir, staging_dir_for
from qlora.config.recipe import Recipe, load_recipe
from qlora.post.model_card import base_license, base_model_id, card_base_model, render_card

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")  # loading these runs arbitrary code
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD_BYTES = 64 * 2**10  # the model card (README.md): recipe, data, metrics and memory tables, ~10 KiB


@dataclass
class TrainedRun:
    """A finished `qlora train` output folder: its resolved recipe, metrics and adapter."""

    out_dir: Path
    recipe: Recipe
    metrics: dict[str, Any]

    @property
    def adapter_dir(self) -> Path:
        return self.out_dir / "adapter"

    @property
    def label_names(self) -> list[str] | None:
        """A classifier's labels in head order, as training recorded them (None for a causal LM)."""
        if self.recipe.task != "classification":
            return None
        labels = self.metrics.get("data", {}).get("labels")
        if not labels:
            raise QLoraError(
                f"{self.out_dir / 'metrics.json'}: a classification run without its label names (data.labels)"
            )
        return labels


def read_run(out_dir: str | Path) -> TrainedRun:
    """Open a run folder, naming the missing piece when training did not finish there."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise QLoraError(f"run folder not found: {out_dir} (the output_dir of a `qlora train` run)")
    for name in ("recipe.yaml", "adapter/adapter_config.json", "metrics.json"):
        if not (out_dir / name).exists():
            raise QLoraError(f"{out_dir} has no {name}: not a finished `qlora train` run (did training complete?)")
    return TrainedRun(
        out_dir, load_recipe(out_dir / "recipe.yaml"), json.loads((out_dir / "metrics.json").read_text())
    )


def check_destination(to: Path, run: TrainedRun, overwrite: bool) -> None:
    """Refuse to replace the run itself, or anything already at `to` without --overwrite."""
    to, out = Path(to).resolve(), run.out_dir.resolve()
    if to == out or to in out.parents or to == out / "adapter":
        raise QLoraError(f"--to: {to} would replace the run folder {out}; choose another folder")
    if to.exists() and not to.is_dir():
        raise QLoraError(f"--to: {to} exists and is not a folder")
    if to.is_dir() and any(to.iterdir()) and not overwrite:
        raise QLoraError(f"--to: {to} already exists and is not empty; pass --overwrite to replace it")


def tokenizer_files_bytes(run: TrainedRun) -> int:
    """Bytes of the tokenizer files training saved beside the adapter (a merged model carries the same)."""
    adapter_files = {ADAPTER_WEIGHTS, "adapter_config.json", "README.md"}
    return sum(p.stat().st_size for p in run.adapter_dir.iterdir() if p.is_file() and p.name not in adapter_files)


def exported_files(run: TrainedRun) -> list[Path]:
    """The adapter folder's files an export copies: safetensors and text, never pickles or the old card."""
    return [
        path
        for path in sorted(run.adapter_dir.iterdir())
        if path.is_file() and path.suffix not in PICKLE_SUFFIXES and path.name != "README.md"
    ]


def export_bytes(run: TrainedRun) -> int:
    """What an export writes: the files it copies (their sizes on disk) and the model card."""
    return sum(p.stat().st_size for p in exported_files(run)) + CARD_BYTES


def copy_adapter(run: TrainedRun, dest: Path, hub_id: str | None) -> None:
    """Adapter weights (safetensors only), tokenizer files, and the config pointed at the base's Hub id
    (kept on the local path when there is none, so the folder still loads on this machine)."""
    if not (run.adapter_dir / ADAPTER_WEIGHTS).exists():
        raise QLoraError(f"{run.adapter_dir} has no {ADAPTER_WEIGHTS} (only safetensors adapters are exported)")
    for path in exported_files(run):
        shutil.copy2(path, dest / path.name)
    if hub_id is not None:
        config = PeftConfig.from_pretrained(str(run.adapter_dir))
        config.base_model_name_or_path = hub_id
        config.revision = run.recipe.model.revision
        config.save_pretrained(str(dest))


def write_export(run: TrainedRun, dest: Path, hub_id: str | None, license_id: str | None, repo_id: str | None) -> str:
    """Fill the empty folder `dest` with the adapter and its model card; returns the card's base_model."""
    base_model = card_base_model(run.recipe.model, hub_id, for_hub=repo_id is not None)
    copy_adapter(run, dest, hub_id)
    atomic_write_text(dest / "README.md", render_card(run, base_model, license_id, repo_id))
    return base_model


def push(folder: Path, repo_id: str, private: bool) -> str:
    """Create (or reuse) the Hub repo and upload `folder`; returns the commit URL."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise QLoraError(
            f"--hub: '{repo_id}' is not a valid repo id (expected USER/REPO, e.g. alice/llama-qlora)"
        ) from None
    if huggingface_hub.get_token() is None:
        raise QLoraError("--hub: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    api = huggingface_hub.HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message="Upload QLoRA adapter (qlora export)"
        )
    except HfHubHTTPError as exc:
        raise QLoraError(f"--hub: upload to {repo_id} failed: {str(exc).splitlines()[0]}") from None
    return commit.commit_url


def export(
    run: TrainedRun,
    to: Path | None,
    hub: str | None = None,
    private: bool = False,
    base_model: str | None = None,
    license_id: str | None = None,
    overwrite: bool = False,
    skip_space_check: bool = False,
) -> dict[str, str]:
    """Write the folder to `to` and/or push it to `hub`; returns where it went. The free space where the
    folder is written is checked first (`skip_space_check`: not); a full disk there is `DiskFull`, with
    nothing left behind."""
    if to is None and hub is None:
        raise QLoraError("nothing to do: give --to DIR, --hub USER/REPO, or both")
    if private and hub is None:
        raise QLoraError("--private applies to --hub only")
    if to is not None:
        check_destination(to, run, overwrite)
    hub_id = base_model_id(run.recipe.model, base_model)
    license_id = license_id or base_license(run.recipe.model, hub_id)
    where = to if to is not None else Path(tempfile.gettempdir())  # --hub alone: a temporary folder
    needed = export_bytes(run)
    check_free_space(
        "the exported adapter", where, needed, skip_space_check, advice="free space or choose another --to"
    )
    with writing("the exported adapter", where, needed):
        staging = staging_dir_for(to) if to is not None else Path(tempfile.mkdtemp(prefix="qlora-export-"))
    try:
        with writing("the exported adapter", where, needed):
            result = {"base_model": write_export(run, staging, hub_id, license_id, hub)}
        if hub is not None:
            result["hub"] = push(staging, hub, private)
        if to is not None:
            publish_dir(staging, to)
            result["folder"] = str(to)
    except DiskFull as full:
        shutil.rmtree(staging, ignore_errors=True)
        full.measure_free()
        full.kept = f"partial files removed, nothing was written to {where}; free space, then run qlora export again"
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result
