"""Which checkpoints a resume trusts, and what --resume/--overwrite do to an output folder."""

from __future__ import annotations

import pytest

from qlora.checkpoints import latest_complete_checkpoint, mark_complete, prepare_output_dir
from qlora.errors import QLoraError


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
