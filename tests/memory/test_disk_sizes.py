"""Bytes on disk from the profiler (qlora.memory.disk), `qlora profile`'s disk line and JSON, and a full disk
while it writes its reports."""

from __future__ import annotations

import errno
import json
import os
import re

import qlora.config.disk
import qlora.config.io
from qlora.config.errors import ExitCode, run_cli
from qlora.memory.disk import (
    ADAPTER_FILES_BYTES,
    SAFETENSORS_TENSOR_BYTES,
    TOKENIZER_BYTES_PER_TOKEN,
    checkpoints_at_once,
    merged_model_bytes,
    profile_disk,
    saves_of,
)
from qlora.memory.estimate import settings_inventory
from qlora.memory.settings import Settings
from qlora.profile import main


def test_checkpoints_at_once_follow_the_rotation():
    assert checkpoints_at_once(3, 10) == 4  # the limit, and the newest while it is written
    assert checkpoints_at_once(3, 2) == 2  # a short run never reaches the limit
    assert checkpoints_at_once(None, 7) == 7  # no limit: every save stays
    assert checkpoints_at_once(1, 5, existing=1) == 1  # resumed: one kept on disk already, one more at a time
    assert checkpoints_at_once(3, 0, existing=2) == 0
    assert saves_of(6, 2) == 3 and saves_of(7, 2) == 4 and saves_of(-1, 2) == 0


def test_an_8b_qlora_checkpoint_is_its_adapter_and_adam_moments():
    """Llama 3.1 8B, r 64 on all linear layers: 167,772,160 LoRA parameters, fp32, and two fp32 moments each."""
    settings = Settings(rank=64, targets="all-linear", optimizer="paged_adamw_32bit")
    inv = settings_inventory("llama-3.1-8b", settings)
    disk = profile_disk(inv, "qlora", settings, save_total_limit=3, max_steps=1000, save_steps=100)
    lora = 167_772_160
    tensors = 7 * 32 * 2
    tokenizer = TOKENIZER_BYTES_PER_TOKEN * 128_256
    assert disk["adapter_bytes"] == 4 * lora + tensors * SAFETENSORS_TENSOR_BYTES + ADAPTER_FILES_BYTES + tokenizer
    assert 2 * 4 * lora <= disk["optimizer_bytes"] <= 2 * 4 * lora + 2**20
    assert disk["checkpoints_at_once"] == 4
    assert disk["total_bytes"] > 4 * (4 + 8) * lora  # 4 checkpoints of adapter + moments, and the adapter
    # the merged model: 8.03 B parameters in float16 (the untied head counted once)
    assert abs(merged_model_bytes(inv, "float16") - 2 * 8_030_261_248) < 2**20


def test_profile_prints_the_disk_line_and_the_json_carries_it(llama_config, capsys):
    assert run_cli(main, ["--model", str(llama_config), "--methods", "qlora"]) == 0
    out = capsys.readouterr().out
    [line] = [line for line in out.splitlines() if line.startswith("disk, ")]
    assert re.fullmatch(
        r"disk, \S+ qlora: checkpoint [\d.]+ [KM]iB \(adapter [\d.]+ [KM]iB, optimizer [\d.]+ [KM]iB\) x 4 at once "
        r"\+ adapter = [\d.]+ [KM]iB in output_dir; merged \(float16\) [\d.]+ KiB",
        line,
    ), line
    assert run_cli(main, ["--model", str(llama_config), "--methods", "qlora", "--format", "json"]) == 0
    disk = json.loads(capsys.readouterr().out)["runs"][0]["results"][0]["disk"]
    assert set(disk) == {
        "adapter_bytes",
        "checkpoint_bytes",
        "optimizer_bytes",
        "checkpoints_at_once",
        "total_bytes",
        "merged_float16_bytes",
    }
    assert disk["total_bytes"] > disk["checkpoints_at_once"] * disk["checkpoint_bytes"] + disk["adapter_bytes"]


def test_a_full_disk_while_writing_the_reports_is_one_line(llama_config, tmp_path, monkeypatch, capsys):
    real_fsync = os.fsync

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[-1].startswith(".memory.json."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(qlora.config.io.os, "fsync", fsync)
    monkeypatch.setattr(qlora.config.disk, "free_bytes", lambda path: 512)
    out = tmp_path / "reports"
    assert run_cli(main, ["--model", str(llama_config), "--methods", "qlora", "--out", str(out)]) == ExitCode.DISK_FULL
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert re.fullmatch(
        re.escape(f"error: disk full while writing memory.json ({out / 'memory.json'}): ")
        + r"needs about [\d.]+ KiB, 512 bytes free"
        + re.escape(
            f"; the tables above are complete, and so are the reports written to {out} before it; "
            "free space or choose another --out"
        ),
        line,
    ), line
    assert sorted(p.name for p in out.iterdir()) == ["memory.md"]  # no temporary file left


def test_a_moe_adapter_on_disk_holds_its_expert_lora():
    """Qwen3-30B-A3B, r 8 on all linear layers and every expert stack: the adapter file holds what the memory
    estimate counts as adapters (expert LoRA is most of it), in fp32, plus small files."""
    from qlora.memory.estimate import estimate

    settings = Settings(rank=8, targets="all-linear", optimizer="paged_adamw_8bit")
    inv = settings_inventory("qwen3-30b-a3b", settings)
    adapters = estimate(inv, "qlora", settings).bytes["adapters"]
    disk = profile_disk(inv, "qlora", settings, 3, 100, 10)
    assert adapters > 2**30  # the expert LoRA alone is over a GiB at r 8
    assert adapters <= disk["adapter_bytes"] < adapters * 1.01 + 10 * 2**20
