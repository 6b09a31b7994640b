"""Which checkpoints a resume trusts, and what --resume/--overwrite do to an output folder."""

from __future__ import annotations

import pytest

from qlora.config.errors import QLoraError
from qlora.training.checkpoints import damage, latest_complete_checkpoint, mark_complete, prepare_output_dir, rotate


def half_written_run(folder, steps=(2,)):
    """A run killed while writing its checkpoints: recipe saved, checkpoint folders without the marker."""
    for step in steps:
        (folder / "checkpoints" / f"checkpoint-{step}").mkdir(parents=True)
    (folder / "recipe.yaml").write_text("output_dir: x\n")


def test_resume_ignores_unmarked_checkpoints(tmp_path):
    half_written_run(tmp_path, steps=(2, 4, 6))
    mark_complete(tmp_path / "checkpoints" / "checkpoint-2")
    mark_complete(tmp_path / "checkpoints" / "checkpoint-4")
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-4"  # checkpoint-6 was half-written
    assert prepare_output_dir(tmp_path, overwrite=False, resume=True) == tmp_path / "checkpoints" / "checkpoint-4"
    assert not (tmp_path / "checkpoints" / "checkpoint-6").exists()  # the resume writes step 6 into a clean folder
    assert (tmp_path / "checkpoints" / "checkpoint-2").exists()


def test_resume_before_the_first_complete_checkpoint_starts_again(tmp_path, capsys):
    half_written_run(tmp_path, steps=(8,))
    assert prepare_output_dir(tmp_path, overwrite=False, resume=True) is None
    assert not (tmp_path / "checkpoints").exists()  # the half-written checkpoint-8 is gone
    assert "starting again from step 0" in capsys.readouterr().err


@pytest.mark.parametrize("state", ["empty", "finished"])
def test_resume_with_nothing_to_continue_is_an_error(tmp_path, state):
    if state == "finished":
        half_written_run(tmp_path)
        (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(QLoraError, match="--resume: no complete checkpoint under"):
        prepare_output_dir(tmp_path, overwrite=False, resume=True)


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    half_written_run(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(QLoraError, match="already holds results"):
        prepare_output_dir(tmp_path, overwrite=False, resume=False)
    assert prepare_output_dir(tmp_path, overwrite=True, resume=False) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


# --- checksums in the marker, damaged checkpoints, rotation ---------------------------------------


def written_checkpoint(folder, step, payload=b"weights" * 100):
    """A checkpoint folder with two files (one in a subfolder), marked complete."""
    checkpoint = folder / "checkpoints" / f"checkpoint-{step}"
    (checkpoint / "sub").mkdir(parents=True)
    (checkpoint / "adapter_model.safetensors").write_bytes(payload + bytes([step]))
    (checkpoint / "sub" / "optimizer.pt").write_bytes(b"state" * 50)
    mark_complete(checkpoint)
    return checkpoint


def test_marker_records_size_and_sha256_of_every_file(tmp_path):
    import hashlib
    import json

    checkpoint = written_checkpoint(tmp_path, 2)
    files = json.loads((checkpoint / "COMPLETE").read_text())["files"]
    assert sorted(files) == ["adapter_model.safetensors", "sub/optimizer.pt"]
    data = (checkpoint / "adapter_model.safetensors").read_bytes()
    assert files["adapter_model.safetensors"] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert damage(checkpoint) is None


@pytest.mark.parametrize(
    "how, reason",
    [
        ("truncate", "adapter_model.safetensors: 10 bytes, 701 recorded (truncated or replaced)"),
        ("flip", "adapter_model.safetensors: checksum differs from the one recorded (corrupted)"),
        ("delete", "sub/optimizer.pt: missing"),
    ],
)
def test_damage_names_the_file(tmp_path, how, reason):
    checkpoint = written_checkpoint(tmp_path, 2)
    weights = checkpoint / "adapter_model.safetensors"
    if how == "truncate":
        weights.write_bytes(weights.read_bytes()[:10])
    elif how == "flip":
        data = bytearray(weights.read_bytes())
        data[100] ^= 0xFF
        weights.write_bytes(bytes(data))
    else:
        (checkpoint / "sub" / "optimizer.pt").unlink()
    assert damage(checkpoint) == reason


def test_old_ok_markers_are_still_trusted(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "COMPLETE").write_text("ok\n")
    assert damage(checkpoint) is None


def test_resume_falls_back_past_a_damaged_checkpoint_with_one_warning(tmp_path, capsys):
    half_written_run(tmp_path, steps=())
    written_checkpoint(tmp_path, 2)
    newest = written_checkpoint(tmp_path, 4)
    (newest / "adapter_model.safetensors").write_bytes(b"")
    assert prepare_output_dir(tmp_path, overwrite=False, resume=True) == tmp_path / "checkpoints" / "checkpoint-2"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "warning: --resume: checkpoint-4 is damaged (adapter_model.safetensors: 0 bytes, 701 recorded "
        "(truncated or replaced)); removed it, resuming from checkpoint-2"
    ]
    assert not newest.exists()  # the resume writes step 4 again into a clean folder


def test_resume_with_every_checkpoint_damaged_is_one_error(tmp_path):
    half_written_run(tmp_path, steps=())
    for step in (2, 4):
        (written_checkpoint(tmp_path, step) / "sub" / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(
        QLoraError,
        match=r"^--resume: no intact checkpoint under .*checkpoints \(checkpoint-4: "
        r"sub/optimizer.pt: 1 bytes, 250 recorded .*; checkpoint-2: .*\); pass --overwrite",
    ):
        prepare_output_dir(tmp_path, overwrite=False, resume=True)
    assert (tmp_path / "checkpoints" / "checkpoint-2").exists()  # nothing is deleted when nothing is usable


def test_rotation_keeps_the_newest_complete_ones_and_never_the_half_written_alone(tmp_path):
    for step in (2, 4, 6):
        written_checkpoint(tmp_path, step)
    (tmp_path / "checkpoints" / "checkpoint-1").mkdir()  # debris older than every kept checkpoint
    (tmp_path / "checkpoints" / "checkpoint-8").mkdir()  # being written: not complete yet
    rotate(tmp_path / "checkpoints", keep=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-6", "checkpoint-8"]
    rotate(tmp_path / "checkpoints", keep=None)  # no limit: nothing goes
    assert latest_complete_checkpoint(tmp_path).name == "checkpoint-6"
