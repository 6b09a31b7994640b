"""Disk space of `qlora merge` and `qlora export`: refused before anything loads when the folder cannot hold
what they will write (both sizes in one line, exit 6), and a disk that fills while writing is one line with
nothing left at --to."""

from __future__ import annotations

import errno
import re

import pytest
from safetensors import SafetensorError

import qlora.config.disk
from qlora.config.errors import ExitCode, run_cli

KIB = 2**10
SKIP = ", or pass --skip-space-check if this file system reports its free space wrongly (e.g. a network mount)"


@pytest.fixture(scope="module")
def run(trained_run):
    from qlora.post.export import read_run

    return read_run(trained_run)


def free_space(monkeypatch, free):
    monkeypatch.setattr(qlora.config.disk, "free_bytes", lambda path: free)


def error_lines(err: str) -> list[str]:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == err.count("error:"), err[-2000:]
    return lines


def never_load(monkeypatch):
    """Loading the base (4-bit, with or without the adapter) fails the test."""
    import qlora.post.merge

    def load(*args, **kwargs):
        pytest.fail("the base was loaded")

    monkeypatch.setattr(qlora.post.merge, "load_run_base", load)
    monkeypatch.setattr(qlora.post.merge, "load_adapted_model", load)


def test_merge_to_a_folder_with_too_little_space_refuses_before_loading_the_base(run, tmp_path, monkeypatch, capsys):
    """The must-show: both sizes, one line, exit 6, the base never loaded, nothing at --to."""
    from qlora.merge import main
    from qlora.post.merge import merged_bytes

    never_load(monkeypatch)
    free_space(monkeypatch, 200 * KIB)
    to = tmp_path / "merged"
    assert run_cli(main, [str(run.out_dir), "--to", str(to)]) == ExitCode.DISK_FULL
    [line] = error_lines(capsys.readouterr().err)
    print(line)
    needed = merged_bytes(run, "float16")
    assert line == (
        f"error: not enough disk space for the merged model (float16) in {to}: "
        f"needs about {needed / KIB:.2f} KiB, 200.00 KiB free; free space or choose another --to{SKIP}"
    )
    assert not to.exists() and not list(tmp_path.iterdir())


def test_merge_skip_space_check_goes_on_to_load(run, tmp_path, monkeypatch):
    import qlora.post.merge

    class Loading(Exception):
        pass

    def load(*args, **kwargs):
        raise Loading

    monkeypatch.setattr(qlora.post.merge, "load_adapted_model", load)
    free_space(monkeypatch, 200 * KIB)
    with pytest.raises(Loading):
        qlora.post.merge.merge(run, tmp_path / "merged", device="cpu", skip_space_check=True)


@pytest.mark.parametrize(
    "error",
    [
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        OSError(errno.ENOSPC, "No space left on device"),
    ],
    ids=["safetensors", "oserror"],
)
def test_a_disk_that_fills_while_the_merged_model_is_saved_is_one_line_and_leaves_nothing(
    run, tmp_path, monkeypatch, capsys, error
):
    import transformers.modeling_utils

    from qlora.merge import main

    def save_file(tensors, filename, *args, **kwargs):
        with open(filename, "wb") as handle:
            handle.write(b"\0" * 100)
        raise error

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", save_file)
    to = tmp_path / "merged"
    assert run_cli(main, [str(run.out_dir), "--to", str(to), "--device", "cpu"]) == ExitCode.DISK_FULL
    [line] = error_lines(capsys.readouterr().err)
    print(line)
    assert re.fullmatch(
        re.escape(f"error: disk full while writing the merged model ({to}): ")
        + r"needs about [\d.]+ [KM]iB, [\d.]+ [KMG]iB free"
        + re.escape(f"; partial files removed, nothing was written to {to}; free space, then run qlora merge again"),
        line,
    ), line
    assert list(tmp_path.iterdir()) == []  # no staging folder, no --to


def test_predicted_merged_bytes_cover_the_merged_folder(run, tmp_path):
    """Predicted from the profiler's inventory vs the folder `qlora merge` writes (tiny model: within the
    fixed allowance for config and index files)."""
    from qlora.post.merge import merge, merged_bytes

    to = tmp_path / "merged"
    assert merge(run, to, "float16", device="cpu").ok
    written = sum(p.stat().st_size for p in to.rglob("*") if p.is_file())
    predicted = merged_bytes(run, "float16")
    print(f"merged model: {predicted} bytes predicted, {written} on disk")
    assert written <= predicted <= written + 96 * KIB


def test_export_to_a_folder_with_too_little_space_is_refused_with_both_sizes(run, tmp_path, monkeypatch, capsys):
    from qlora.export import main
    from qlora.post.export import export_bytes

    free_space(monkeypatch, 10 * KIB)
    to = tmp_path / "exported"
    assert run_cli(main, [str(run.out_dir), "--to", str(to)]) == ExitCode.DISK_FULL
    [line] = error_lines(capsys.readouterr().err)
    assert line == (
        f"error: not enough disk space for the exported adapter in {to}: "
        f"needs about {export_bytes(run) / KIB:.2f} KiB, 10.00 KiB free; free space or choose another --to{SKIP}"
    )
    assert not to.exists()


def test_a_disk_that_fills_while_exporting_is_one_line_and_leaves_nothing(run, tmp_path, monkeypatch, capsys):
    import qlora.post.export
    from qlora.export import main

    def copy2(src, dst, *args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", str(dst))

    monkeypatch.setattr(qlora.post.export.shutil, "copy2", copy2)
    free_space(monkeypatch, 5 * 2**20)  # the check passes; the quota is hit while copying
    to = tmp_path / "exported"
    assert run_cli(main, [str(run.out_dir), "--to", str(to)]) == ExitCode.DISK_FULL
    [line] = error_lines(capsys.readouterr().err)
    assert re.fullmatch(
        re.escape(f"error: disk full while writing the exported adapter ({to}): ")
        + r"needs about [\d.]+ KiB, 5.00 MiB free"
        + re.escape(f"; partial files removed, nothing was written to {to}; free space, then run qlora export again"),
        line,
    ), line
    assert list(tmp_path.iterdir()) == []
