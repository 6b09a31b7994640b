"""Disk full while saving: one line (exit 6), the last complete checkpoint and any finished adapter intact,
no staging debris."""

from __future__ import annotations

import errno

import pytest
from test_nonfinite import short_recipe

from qlora.config.errors import ExitCode
from qlora.config.io import staged_dir
from qlora.training.checkpoints import damage
from qlora.training.guards import is_disk_full
from qlora.training.lock import LOCK_NAME


def full_disk_on_save(monkeypatch, call):
    """Let peft's safetensors writer fail with ENOSPC from its `call`-th use on (1-based)."""
    import peft.peft_model

    original = peft.peft_model.safe_save_file
    calls = []

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) >= call:
            with open(filename, "wb") as handle:  # what a full disk leaves: part of the file
                handle.write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)


def leftovers(out):
    return sorted(p.name for p in [*out.glob(".*tmp"), *(out / "checkpoints").glob(".*tmp")])


@pytest.mark.parametrize(
    "call, kept",
    [(2, ["checkpoint-2"]), (4, ["checkpoint-2", "checkpoint-4", "checkpoint-6"])],
    ids=["checkpoint", "adapter"],
)
def test_disk_full_is_one_line_and_keeps_what_was_complete(
    tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys, call, kept
):
    from qlora.training.run import train

    out = tmp_path / "full"
    full_disk_on_save(monkeypatch, call)  # call 2: checkpoint-4; call 4: the final adapter
    with pytest.raises(SystemExit) as info:
        train(short_recipe(tiny_llama, alpaca_file, out))
    assert info.value.code == ExitCode.DISK_FULL
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == kept
    assert all(damage(out / "checkpoints" / name) is None for name in kept)
    assert leftovers(out) == [] and not (out / "adapter").exists() and not (out / LOCK_NAME).exists()
    err = capsys.readouterr().err
    errors = [l[l.index("error:") :] for l in err.splitlines() if "error:" in l]  # the progress bar may share the line
    assert len(errors) == 1 and errors[0].startswith("error: disk full while writing (")
    assert errors[0].endswith(
        f"; partial files removed, the last complete checkpoint ({kept[-1]}) kept; "
        "free space, then continue with --resume"
    )


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
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError(
                "[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file"
            ) from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


def test_disk_full_after_the_adapter_keeps_the_finished_adapter(
    tiny_llama, alpaca_file, tmp_path, monkeypatch, capsys
):
    """metrics.json cannot be written: the adapter already published stays, the temporary file goes."""
    import os

    from safetensors.torch import load_file

    import qlora.config.io
    from qlora.training.run import train

    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".metrics.json."):
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
    assert (
        "the last complete checkpoint (checkpoint-6) and the finished adapter kept; free space"
        in capsys.readouterr().err
    )
