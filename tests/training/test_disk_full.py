"""Disk full while saving: one `error:` line on its own line (exit 6) naming what was being written, where,
the bytes it needed and the bytes free, and what is intact; the last complete checkpoint and any finished
adapter kept, no staging debris; `--resume` after freeing space ends on the uninterrupted run's adapter.
And checked before it starts: a run whose checkpoints and adapter do not fit is refused before the model
loads, with both numbers."""

from __future__ import annotations

import errno
import re

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_nonfinite import short_recipe
from test_sweep import fake_train, write_recipe  # noqa: F401 (a fixture)

import qlora.config.disk
from qlora.config.disk import DiskFull, is_disk_full
from qlora.config.errors import ExitCode
from qlora.config.io import staged_dir
from qlora.training.checkpoints import damage
from qlora.training.lock import LOCK_NAME

# What each writer raises on a full disk, word for word (a 2 MiB tmpfs filled by torch.save, safetensors'
# save_file and open().write: torch 2.13, safetensors 0.8).
TORCH_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"
KIB = 2**10


def oserror(filename):
    return OSError(errno.ENOSPC, "No space left on device", str(filename))


def torch_error(filename):
    return RuntimeError(TORCH_FULL)


def safetensors_error(filename):
    return SafetensorError(SAFETENSORS_FULL)


class Disk:
    """The free space every check and every message reads (qlora.config.disk.free_bytes), set by the test."""

    def __init__(self, monkeypatch, free=64 * 2**20):
        self.free = free
        monkeypatch.setattr(qlora.config.disk, "free_bytes", lambda path: self.free)


def full_disk_on_save(monkeypatch, call, error=oserror, disk=None, left=8 * KIB):
    """Let peft's safetensors writer fail with `error` from its `call`-th use on (1-based), leaving `left`
    bytes free on `disk`."""
    import peft.peft_model

    original = peft.peft_model.safe_save_file
    calls = []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) >= call:
            with open(filename, "wb") as handle:  # what a full disk leaves: part of the file
                handle.write(b"\0" * 10)
            if disk is not None:
                disk.free = left
            raise error(filename)
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)


def full_disk_at_optimizer_states(monkeypatch, step, disk, left=8 * KIB):
    """torch.save of checkpoint-`step`'s optimizer states fails as torch's C++ writer does on a full disk."""
    import transformers.trainer

    original = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(f"checkpoint-{step}/optimizer.pt"):
            with open(f, "wb") as handle:
                handle.write(b"PK\3\4" + b"\0" * 100)  # the start of a zip archive, cut short
            disk.free = left
            raise RuntimeError(TORCH_FULL)
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(transformers.trainer.torch, "save", save)


def leftovers(out):
    return sorted(p.name for p in [*out.glob(".*tmp"), *(out / "checkpoints").glob(".*tmp")])


def error_lines(err: str) -> list[str]:
    """The `error:` lines, each required to start its own line (not glued to a progress bar)."""
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == sum(line.count("error:") for line in err.splitlines()), err[-2000:]
    return lines


SIZES = r"needs about [\d.]+ KiB, 8.00 KiB free"


@pytest.mark.parametrize(
    "call, error, kept, what",
    [
        (2, oserror, ["checkpoint-2"], "checkpoint-4"),
        (2, safetensors_error, ["checkpoint-2"], "checkpoint-4"),
        (4, oserror, ["checkpoint-2", "checkpoint-4", "checkpoint-6"], "the adapter"),
        (4, safetensors_error, ["checkpoint-2", "checkpoint-4", "checkpoint-6"], "the adapter"),
    ],
    ids=["checkpoint-oserror", "checkpoint-safetensors", "adapter-oserror", "adapter-safetensors"],
)
def test_disk_full_is_one_line_and_keeps_what_was_complete(
    tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys, call, error, kept, what
):
    from qlora.training.run import train

    out = tmp_path / "full"
    disk = Disk(monkeypatch)
    full_disk_on_save(monkeypatch, call, error, disk)  # call 2: checkpoint-4; call 4: the final adapter
    with pytest.raises(SystemExit) as info:
        train(short_recipe(tiny_llama, alpaca_file, out))
    assert info.value.code == ExitCode.DISK_FULL
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == kept
    assert all(damage(out / "checkpoints" / name) is None for name in kept)
    assert leftovers(out) == [] and not (out / "adapter").exists() and not (out / LOCK_NAME).exists()
    [line] = error_lines(capsys.readouterr().err)
    where = out / "checkpoints" / what if what.startswith("checkpoint") else out / "adapter"
    assert re.fullmatch(
        re.escape(f"error: disk full while writing {what} ({where}): ")
        + SIZES
        + re.escape(
            f"; partial files removed; the last complete checkpoint is {kept[-1]}; "
            "free space, then continue with --resume"
        ),
        line,
    ), line


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, alpaca_file, tmp_path_factory):
    from qlora.training.run import train

    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(short_recipe(tiny_llama, alpaca_file, out))
    return load_file(out / "adapter" / "adapter_model.safetensors")


def test_a_disk_that_fills_at_the_second_checkpoint_is_one_line_and_resume_ends_on_the_same_adapter(
    tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys, uninterrupted
):
    """The must-show: torch.save of checkpoint-4's optimizer states meets a full disk (torch's own error)."""
    from qlora.training.run import train

    out = tmp_path / "fills"
    disk = Disk(monkeypatch)  # room for the run when it starts; something else fills the disk meanwhile
    with monkeypatch.context() as patch:
        full_disk_at_optimizer_states(patch, 4, disk)
        with pytest.raises(SystemExit) as info:
            train(short_recipe(tiny_llama, alpaca_file, out))
    assert info.value.code == ExitCode.DISK_FULL
    err = capsys.readouterr().err
    [line] = error_lines(err)
    print(line)
    assert "Traceback" not in err
    assert re.fullmatch(
        re.escape(f"error: disk full while writing checkpoint-4 ({out / 'checkpoints' / 'checkpoint-4'}): ")
        + SIZES
        + re.escape(
            "; partial files removed; the last complete checkpoint is checkpoint-2; "
            "free space, then continue with --resume"
        ),
        line,
    ), line
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert leftovers(out) == [] and not (out / LOCK_NAME).exists()

    disk.free = 64 * 2**20  # space freed
    train(short_recipe(tiny_llama, alpaca_file, out), resume=True)
    resumed = load_file(out / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    worst = max(float((resumed[k] - uninterrupted[k]).abs().max()) for k in resumed)
    print(f"max |diff| of the resumed adapter vs the uninterrupted run: {worst:.3g}")
    assert worst <= 1e-5


def test_a_run_that_cannot_fit_is_refused_before_the_model_loads_with_both_numbers(
    tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys
):
    import qlora.training.run as run_module

    loaded = []
    monkeypatch.setattr(run_module, "build_model", lambda *a, **k: loaded.append(True) or pytest.fail("loaded"))
    Disk(monkeypatch, free=100 * KIB)
    out = tmp_path / "small"
    with pytest.raises(SystemExit) as info:
        run_module.train(short_recipe(tiny_llama, alpaca_file, out, "training.save_total_limit=1"))
    assert info.value.code == ExitCode.DISK_FULL and loaded == []
    [line] = error_lines(capsys.readouterr().err)
    print(line)
    assert re.fullmatch(
        re.escape("error: not enough disk space for the run (2 checkpoint(s) of ")
        + r"[\d.]+ KiB, the adapter [\d.]+ KiB\) in "
        + re.escape(f"{out}: ")
        + r"needs about [\d.]+ KiB, 100.00 KiB free"
        + re.escape(
            "; free space, lower training.save_total_limit or choose another output_dir, or pass --skip-space-check "
            "if this file system reports its free space wrongly (e.g. a network mount)"
        ),
        line,
    ), line
    assert not (out / "recipe.yaml").exists() and not (out / LOCK_NAME).exists()


def test_skip_space_check_starts_anyway(tiny_llama, alpaca_file, tmp_path, monkeypatch):
    import qlora.training.run as run_module

    class Loading(Exception):
        pass

    def build_model(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(run_module, "build_model", build_model)
    Disk(monkeypatch, free=100 * KIB)
    with pytest.raises(Loading):
        run_module.train(short_recipe(tiny_llama, alpaca_file, tmp_path / "skip"), skip_space_check=True)


def test_the_space_check_counts_the_checkpoints_that_exist_at_once(tiny_llama, alpaca_file, tmp_path):
    from transformers import AutoTokenizer

    from qlora.training.disk import run_needs

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    recipe = short_recipe(tiny_llama, alpaca_file, tmp_path / "r")  # 6 steps, a save every 2: 3 saves
    assert run_needs(recipe, tokenizer, 36, None, tmp_path / "r").checkpoints == 3  # save_total_limit 3: never 4
    limited = short_recipe(tiny_llama, alpaca_file, tmp_path / "r", "training.save_total_limit=1")
    assert run_needs(limited, tokenizer, 36, None, tmp_path / "r").checkpoints == 2  # limit + 1 while writing
    epochs = short_recipe(tiny_llama, alpaca_file, tmp_path / "r", "training.max_steps=-1", "training.num_epochs=2")
    assert run_needs(epochs, tokenizer, 36, None, tmp_path / "r").checkpoints == 4  # 2 x 9 steps: 9 saves, limit 3


@pytest.mark.parametrize(
    "overrides",
    [(), ("training.optimizer=paged_adamw_8bit", "lora.r=64"), ("training.optimizer=adamw_torch",)],
    ids=["paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch"],
)
def test_predicted_checkpoint_and_adapter_bytes_cover_what_a_run_writes(tiny_llama, alpaca_file, tmp_path, overrides):
    """Predicted (qlora.memory.disk, from the profiler's inventory) vs measured on disk: never less, and on a
    tiny model within its fixed allowances (a real model's tensors dwarf them)."""
    from transformers import AutoTokenizer

    from qlora.training.disk import run_needs
    from qlora.training.run import train

    out = tmp_path / "measured"
    train(short_recipe(tiny_llama, alpaca_file, out, *overrides))
    recipe = short_recipe(tiny_llama, alpaca_file, tmp_path / "fresh", *overrides)
    needs = run_needs(recipe, AutoTokenizer.from_pretrained(tiny_llama), 36, None, tmp_path / "fresh")

    def folder_bytes(folder):
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())

    checkpoint = folder_bytes(out / "checkpoints" / "checkpoint-6")
    adapter = folder_bytes(out / "adapter")
    optimizer = (out / "checkpoints" / "checkpoint-6" / "optimizer.pt").stat().st_size
    print(f"checkpoint {needs.checkpoint} predicted, {checkpoint} on disk; adapter {needs.adapter} vs {adapter}; ")
    print(f"optimizer.pt {needs.optimizer} vs {optimizer}")
    assert checkpoint <= needs.checkpoint <= checkpoint + 128 * KIB
    assert adapter <= needs.adapter <= adapter + 32 * KIB
    assert optimizer <= needs.optimizer <= 1.1 * optimizer + 16 * KIB


def test_a_failed_staged_write_keeps_the_finished_folder_and_leaves_no_debris(tmp_path):
    final = tmp_path / "adapter"
    final.mkdir()
    (final / "adapter_model.safetensors").write_bytes(b"finished")
    with pytest.raises(OSError), staged_dir(final) as staging:
        (staging / "adapter_model.safetensors").write_bytes(b"par")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (final / "adapter_model.safetensors").read_bytes() == b"finished"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_disk_full_is_recognised_from_every_writer():
    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, ... })"))
    assert is_disk_full(SafetensorError(SAFETENSORS_FULL))
    assert is_disk_full(RuntimeError(TORCH_FULL))
    assert is_disk_full(DiskFull("checkpoint-4", None))
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError("something a library wrapped it in") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not is_disk_full(
        RuntimeError("[enforce fail at inline_container.cc:301] . file not found: archive/data.pkl")
    )
    assert not is_disk_full(RuntimeError("CUDA out of memory"))


def test_disk_full_after_the_adapter_keeps_the_finished_adapter(
    tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys
):
    """metrics.json cannot be written: the adapter already published stays, the temporary file goes."""
    import os

    import qlora.config.io
    from qlora.training.run import train

    real_fsync = os.fsync
    disk = Disk(monkeypatch)

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".metrics.json."):
            disk.free = 100
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(qlora.config.io.os, "fsync", fsync)
    out = tmp_path / "metrics-full"
    with pytest.raises(SystemExit) as info:
        train(short_recipe(tiny_llama, alpaca_file, out))
    assert info.value.code == ExitCode.DISK_FULL
    final = load_file(out / "adapter" / "adapter_model.safetensors")
    last = load_file(out / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors")
    assert final.keys() == last.keys() and all((final[k] == last[k]).all() for k in final)
    assert not (out / "metrics.json").exists() and leftovers(out) == []
    [line] = error_lines(capsys.readouterr().err)
    assert re.fullmatch(
        re.escape(f"error: disk full while writing metrics.json ({out / 'metrics.json'}): ")
        + r"needs about [\d.]+ bytes, 100 bytes free"
        + re.escape(
            "; partial files removed; the last complete checkpoint is checkpoint-6 and the finished adapter is kept; "
            "free space, then continue with --resume"
        ),
        line,
    ), line


def test_a_full_disk_while_writing_the_sweep_table_is_one_line(tmp_path, fake_train, monkeypatch, capsys):  # noqa: F811
    import os

    import qlora.config.io
    import qlora.sweep
    from qlora.config.errors import run_cli

    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".sweep_results.md."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(qlora.config.io.os, "fsync", fsync)
    Disk(monkeypatch, free=300)
    code = run_cli(qlora.sweep.main, [str(write_recipe(tmp_path)), "--grid", "lora.alpha=8,16"])
    assert code == ExitCode.DISK_FULL and len(fake_train.calls()) == 1  # stopped after the first point's row
    [line] = error_lines(capsys.readouterr().err)
    base = tmp_path / "sweep"
    assert re.fullmatch(
        re.escape(f"error: disk full while writing sweep_results.md ({base / 'sweep_results.md'}): ")
        + r"needs about [\d.]+ bytes, 300 bytes free"
        + re.escape(
            "; every point's own folder is kept; free space, then run the same qlora sweep again "
            "(finished points are skipped, the table is rewritten)"
        ),
        line,
    ), line
    assert (base / "lora.alpha=8" / "metrics.json").exists() and leftovers(base) == []


@pytest.mark.parametrize("name", ["recipe.yaml", "baseline.json"])
def test_a_full_disk_at_the_first_small_files_is_one_line(
    tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys, name
):
    """The recipe copy (before loading) and the metrics before training (once training begins)."""
    import os

    import qlora.config.io
    from qlora.training.run import train

    real_fsync = os.fsync
    Disk(monkeypatch, free=100)

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(qlora.config.io.os, "fsync", fsync)
    out = tmp_path / "small-files"
    with pytest.raises(SystemExit) as info:
        train(short_recipe(tiny_llama, alpaca_file, out), skip_space_check=True)
    assert info.value.code == ExitCode.DISK_FULL
    where = out / name if name == "recipe.yaml" else out / "checkpoints" / name
    [line] = error_lines(capsys.readouterr().err)
    assert re.fullmatch(
        re.escape(f"error: disk full while writing {name} ({where}): ")
        + r"needs about [\d.]+ (bytes|KiB), 100 bytes free"
        + re.escape("; partial files removed; no checkpoint was written yet; free space, then run again"),
        line,
    ), line
    assert leftovers(out) == [] and not (out / LOCK_NAME).exists() and not (where).exists()
