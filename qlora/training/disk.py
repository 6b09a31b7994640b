"""Disk space of a training run: checked before the model loads, and a full disk at a checkpoint ends every
process together.

`check_run_space` asks the profiler (qlora.memory.disk) what the run will write: the checkpoints that exist
at once (`training.save_total_limit` + 1 while the newest is written) and the final adapter, and refuses
to start with one line when the output folder's file system has less free (`--skip-space-check` skips
the refusal). `guard_checkpoint_saves` wraps the Trainer's checkpoint save: a full disk there, on any
process, becomes a `DiskFull` raised on every process after the same save (the decision is OR-ed over
processes, as for SIGTERM and a non-finite loss), so none waits in a collective for one that stopped.
"""

from __future__ import annotations

import logging
from math import ceil
from pathlib import Path

from qlora.config.disk import DiskFull, check_free_space, describe_items, is_disk_full
from qlora.config.precision import default_device
from qlora.memory.disk import RunDisk, checkpoints_at_once, run_disk_bytes, saves_of
from qlora.memory.estimate import settings_inventory
from qlora.memory.settings import from_recipe
from qlora.training import distributed
from qlora.training.checkpoints import complete_checkpoints, step_of

TOKENIZER_FILES_BYTES = 16 * 2**10  # tokenizer_config.json, special_tokens_map.json, chat_template.jinja

log = logging.getLogger(__name__)


def tokenizer_bytes(tokenizer) -> int:
    """About what `tokenizer.save_pretrained` writes: tokenizers' JSON (as it saves it) and its small files."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        main = len(backend.to_str(pretty=True).encode("utf-8"))
    else:  # a slow tokenizer: its vocabulary file, a few dozen bytes per entry
        main = 64 * len(tokenizer)
    return main + len((getattr(tokenizer, "chat_template", None) or "").encode("utf-8")) + TOKENIZER_FILES_BYTES


def planned_steps(recipe, train_rows: int, world: int = 1) -> int:
    """Optimizer steps the Trainer will run: `training.max_steps`, or the epochs over the training rows."""
    t = recipe.training
    if t.max_steps > 0:
        return t.max_steps
    batches = ceil(train_rows / max(t.batch_size * world, 1))
    return ceil(ceil(batches / max(t.grad_accum, 1)) * t.num_epochs)


def run_needs(recipe, tokenizer, train_rows: int, num_labels: int | None, output_dir: Path, world: int = 1) -> RunDisk:
    """The bytes the run will still write to `output_dir` (after a resume: what the remaining saves add)."""
    t = recipe.training
    model, method, settings = from_recipe(recipe, num_labels, device=default_device())
    inventory = settings_inventory(model, settings)
    steps = planned_steps(recipe, train_rows, world)
    existing = complete_checkpoints(output_dir)
    done = step_of(existing[-1]) if existing else 0
    saves = saves_of(steps, t.save_steps) - saves_of(done, t.save_steps)
    logs = ceil(steps / t.logging_steps) if t.logging_steps else 0
    count = checkpoints_at_once(t.save_total_limit, saves, len(existing))
    return run_disk_bytes(inventory, method, settings, count, tokenizer_bytes(tokenizer), logs)


def check_run_space(
    recipe, tokenizer, train_rows: int, num_labels: int | None, output_dir: Path, skip: bool = False, world: int = 1
) -> RunDisk | None:
    """Refuse (NotEnoughSpace) a run whose checkpoints and adapter do not fit the free space of its output
    folder; returns what it will write (None when the model cannot be sized: a note says so)."""
    try:
        needs = run_needs(recipe, tokenizer, train_rows, num_labels, output_dir, world)
    except Exception as exc:  # a model the profiler cannot read: training still can
        log.warning(f"note: disk space not checked (the run's size is unknown: {exc})")
        return None
    what = describe_items(
        [(f"{needs.checkpoints} checkpoint(s) of", needs.checkpoint), ("the adapter", needs.adapter)]
    )
    check_free_space(
        f"the run ({what})",
        output_dir,
        needs.total,
        skip,
        advice="free space, lower training.save_total_limit or choose another output_dir",
    )
    return needs


def guard_checkpoint_saves(trainer, needed: int | None) -> None:
    """Make a full disk while the Trainer writes a checkpoint stop every process at that save with `DiskFull`.

    Wrapped on the instance because the Trainer offers no hook around its save: callbacks run only after a
    save that succeeded, and an error inside it leaves the other processes waiting at the next collective.
    """
    save = trainer._save_checkpoint

    def save_checkpoint(*args, **kwargs):
        folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
        failure = None
        try:
            save(*args, **kwargs)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            failure = DiskFull(folder.name, folder, needed)
        if not distributed.any_process(failure is not None):
            return
        # Every process is here: the main process's failure, when it has one, is raised on all of them.
        distributed.on_main(lambda: _raise(failure))
        distributed.finish()
        raise failure or DiskFull(f"{folder.name} (on another process)", folder, needed)

    trainer._save_checkpoint = save_checkpoint


def _raise(failure: BaseException | None) -> None:
    if failure is not None:
        raise failure
