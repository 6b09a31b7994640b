"""qlora.config.disk: sizes for people, the free-space check, and an error line that starts its own line."""

from __future__ import annotations

import errno
import pickle

import pytest

import qlora.config.disk
from qlora.config.disk import (
    DiskFull,
    NotEnoughSpace,
    check_free_space,
    print_error_line,
    report,
    size,
    writing,
)


def test_sizes_read_like_df():
    assert [size(n) for n in (None, 512, 1536, 5 * 2**20, 3 * 2**30 // 2)] == [
        "an unknown amount",
        "512 bytes",
        "1.50 KiB",
        "5.00 MiB",
        "1.50 GiB",
    ]


def test_the_free_space_check_refuses_with_both_numbers_unless_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(qlora.config.disk, "free_bytes", lambda path: 2**20)
    with pytest.raises(NotEnoughSpace) as info:
        check_free_space("the merged model", tmp_path / "m", 3 * 2**20, advice="free space")
    assert info.value.line() == (
        f"error: not enough disk space for the merged model in {tmp_path / 'm'}: needs about 3.00 MiB, 1.00 MiB free; "
        "free space, or pass --skip-space-check if this file system reports its free space wrongly "
        "(e.g. a network mount)"
    )
    assert check_free_space("the merged model", tmp_path / "m", 3 * 2**20, skip=True) == 2**20
    assert check_free_space("the merged model", tmp_path / "m", 2**20) == 2**20


def test_free_bytes_reads_the_nearest_existing_folder(tmp_path):
    assert qlora.config.disk.free_bytes(tmp_path / "not" / "yet") > 0


def test_a_write_that_meets_a_full_disk_says_what_where_and_how_much(tmp_path, monkeypatch):
    monkeypatch.setattr(qlora.config.disk, "free_bytes", lambda path: 10)
    with pytest.raises(DiskFull) as info, writing("the adapter", tmp_path / "adapter", 2048):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    full = info.value
    assert full.line() == (
        f"error: disk full while writing the adapter ({tmp_path / 'adapter'}): needs about 2.00 KiB, 10 bytes free; "
        "free space, then run it again"
    )
    copy = pickle.loads(pickle.dumps(full))  # sent to the other processes of a launcher
    assert type(copy) is DiskFull and str(copy) == str(full) and copy.needed == 2048
    with pytest.raises(PermissionError), writing("the adapter", tmp_path):  # not a full disk: left alone
        raise PermissionError(errno.EACCES, "Permission denied")
    unknown = qlora.config.disk.as_disk_full(RuntimeError("No space left on device"))  # a writer that names nothing
    assert unknown.line() == "error: disk full while writing a file; free space, then run it again"


def test_the_error_line_starts_its_own_line_after_a_live_progress_bar(capsys):
    from tqdm import tqdm

    bar = tqdm(total=10)  # as the Trainer's bar is left when a save fails mid-run: drawn, no newline
    bar.update(4)
    assert report(DiskFull("checkpoint-4", None, 100, 50)) is None
    err = capsys.readouterr().err
    assert "error: disk full while writing checkpoint-4: needs about 100 bytes, 50 bytes free" in err.splitlines()[-1]
    assert err.splitlines()[-1].startswith("error:") and "4/10" in err.splitlines()[-2]
    print_error_line("error: again")  # no bar left: nothing else printed
    assert capsys.readouterr().err == "error: again\n"
