"""The qlora logger: lines exactly as written, on the current stderr, -q / -v, the main process only."""

from __future__ import annotations

import logging

import pytest

from qlora.config.log import add_verbosity_flags, configure_logging, verbosity

log = logging.getLogger("qlora.tests")


@pytest.fixture(autouse=True)
def default_level():
    yield
    configure_logging(0)


def test_lines_are_printed_as_written_at_the_default_level(capsys):
    configure_logging(0)
    log.info("training.kernels: auto: something chosen")
    log.warning("warning: careful")
    log.debug("detail")
    assert capsys.readouterr().err == "training.kernels: auto: something chosen\nwarning: careful\n"


def test_quiet_keeps_warnings_and_verbose_adds_debug(capsys):
    configure_logging(-1)
    log.info("chosen")
    log.warning("warning: careful")
    assert capsys.readouterr().err == "warning: careful\n"
    configure_logging(1)
    log.debug("detail")
    assert capsys.readouterr().err == "detail\n"


def test_configuring_twice_prints_once(capsys):
    configure_logging(0)
    configure_logging(0)
    log.info("once")
    assert capsys.readouterr().err == "once\n"


def test_under_torchrun_only_rank_0_speaks_but_every_rank_reports_errors(capsys, monkeypatch):
    configure_logging(0)
    monkeypatch.setenv("RANK", "1")
    log.info("chosen")
    log.warning("warning: careful")
    log.error("error: disk full")
    assert capsys.readouterr().err == "error: disk full\n"
    monkeypatch.setenv("RANK", "0")
    log.info("chosen")
    assert capsys.readouterr().err == "chosen\n"


def test_the_flags():
    import argparse

    parser = argparse.ArgumentParser()
    add_verbosity_flags(parser)
    assert [verbosity(parser.parse_args(a)) for a in ([], ["-q"], ["-v"], ["--quiet"])] == [0, -1, 1, -1]
    with pytest.raises(SystemExit):
        parser.parse_args(["-q", "-v"])
