"""GPU memory sizes: explicit units and named presets holding what torch reports on each card.

Why presets: a card sold as "16 GB" is neither 16 GiB nor 16 x 10^9 usable bytes. The driver keeps
part of it (ECC, its own reservations), and what a program can plan for is
`torch.cuda.get_device_properties(i).total_memory` (CUDA's `totalGlobalMem`, the figure deviceQuery
prints and PyTorch's out-of-memory message calls "total capacity"): a T4 reports ~14.74 GiB. A plan
made against the box label OOMs on the card; `--gpu t4` plans against the card.

Units (`parse_gpu_memory`):
- `GB`, `MB`, `TB` are decimal (10^9, 10^6, 10^12 bytes), as GPU makers and nvidia-smi's "GB" mean them;
- `GiB`, `MiB`, `TiB` are binary (2^30, 2^20, 2^40 bytes);
- a plain integer (or `B`) is bytes, so `total_memory` can be pasted as it is printed;
- a bare `G`/`M` is refused as ambiguous (say GB or GiB).

Each preset's figure is the lowest published `totalGlobalMem` / `total_memory` found for the card
(drivers differ by up to ~1 %: lower is the safe side for a plan), with its source. Where only an
nvidia-smi `memory.total` was found (kind "nvidia-smi"), the figure is an upper bound: torch
reports 1-2 % less on the cards where both are published (T4: 15095 vs 15360 MiB, A100 40GB: 40339 vs
40960 MiB). `make gpu-check` records the exact figure of the card it runs on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qlora.config.errors import QLoraError, closest

MIB = 2**20
GIB = 2**30


@dataclass(frozen=True)
class GpuPreset:
    """One card: the bytes torch reports, its compute capability, and where the figure comes from."""

    name: str
    card: str
    bytes: int
    capability: tuple[int, int]
    kind: str  # 'deviceQuery' / 'torch' (= total_memory) or 'nvidia-smi' (an upper bound)
    source: str

    @property
    def gib(self) -> float:
        return self.bytes / GIB


def _gib_shown(value: float) -> int:
    """Bytes of a figure that torch printed rounded to 0.01 GiB: its lower end, whole MiB."""
    return int((value - 0.005) * 1024) * MIB


GPU_PRESETS: dict[str, GpuPreset] = {
    p.name: p
    for p in (
        GpuPreset(
            "t4",
            "Tesla T4 16 GB",
            15095 * MIB,
            (7, 5),
            "deviceQuery",
            "Colab T4 deviceQuery 'Global Memory 15095 MBytes': github.com/sylvia-ymlin/cuda-kernels-from-scratch "
            "README.md (torch on Colab prints total_memory=15102MB; OOM '14.76 GiB total capacity', "
            "github.com/Morizeyao/GPT2-Chinese/issues/215)",
        ),
        GpuPreset(
            "v100-16gb",
            "Tesla V100 16 GB",
            _gib_shown(15.78),
            (7, 0),
            "torch",
            "OOM on a 16 GB V100 '15.78 GiB total capacity': github.com/kchengiva/Shift-GCN/issues/34",
        ),
        GpuPreset(
            "3060",
            "GeForce RTX 3060 12 GB",
            _gib_shown(11.75),
            (8, 6),
            "torch",
            "OOM on an RTX 3060 '11.75 GiB total capacity': github.com/Kunhao-Liu/StyleGaussian/issues/12 "
            "(11.76 in github.com/TencentARC/PhotoMaker/issues/47)",
        ),
        GpuPreset(
            "a10g",
            "A10G / A10 24 GB",
            23609475072,
            (8, 6),
            "deviceQuery",
            "A10 deviceQuery '21.99 GBytes (23609475072 bytes)': github.com/aalanwyr/face2cuda step2cuda/README.md; "
            "the A10G has the same 24 GB GDDR6 with ECC ('A10G reports ~22GB', "
            "github.com/huggingface/local-gemma/pull/25)",
        ),
        GpuPreset(
            "l4",
            "NVIDIA L4 24 GB",
            23034 * MIB,
            (8, 9),
            "nvidia-smi",
            "nvidia-smi memory.total 23034MiB: github.com/modal-labs/modal-client/pull/2797 (upper bound; no torch "
            "figure found)",
        ),
        GpuPreset(
            "3090",
            "GeForce RTX 3090 24 GB",
            25286672384,
            (8, 6),
            "deviceQuery",
            "deviceQuery 'Global Memory: 25286672384 bytes': github.com/Jumperkables/cuda-benchmarking "
            "00_deviceQuery/README.md",
        ),
        GpuPreset(
            "4090",
            "GeForce RTX 4090 24 GB",
            25386352640,
            (8, 9),
            "deviceQuery",
            "deviceQuery '24210 MBytes (25386352640 bytes)': github.com/thamada/nvidia-smi gls/RTX4090_deviceQuery.py "
            "(OOM '23.64 GiB', github.com/3DTopia/Phidias-Diffusion/issues/8)",
        ),
        GpuPreset(
            "rtx6000-ada",
            "RTX 6000 Ada 48 GB",
            _gib_shown(44.43),
            (8, 9),
            "torch",
            "OOM on an RTX 6000 Ada '44.43 GiB total capacity': github.com/DINGYANB/MTVCrafter/issues/21",
        ),
        GpuPreset(
            "l40s",
            "NVIDIA L40S 48 GB",
            46068 * MIB,
            (8, 9),
            "nvidia-smi",
            "nvidia-smi memory.total 46068 MiB: github.com/akash-network/provider-configs/pull/99, "
            "github.com/modal-labs/modal-client/pull/2797 (upper bound; no torch figure found)",
        ),
        GpuPreset(
            "a100-40gb",
            "A100 40 GB",
            42298834944,
            (8, 0),
            "deviceQuery",
            "A100-SXM4-40GB deviceQuery '40339 MBytes (42298834944 bytes)': "
            "github.com/bottlerocket-os/bottlerocket/pull/3873",
        ),
        GpuPreset(
            "a100-80gb",
            "A100 80 GB",
            85100068864,
            (8, 0),
            "deviceQuery",
            "A100-SXM4-80GB deviceQuery '81158 MBytes (85100068864 bytes)': github.com/thamada/nvidia-smi "
            "nvsim/A100SXMx4_deviceQuery.py",
        ),
        GpuPreset(
            "h100",
            "H100 80 GB (SXM)",
            85045477376,
            (9, 0),
            "deviceQuery",
            "H100 80GB HBM3 deviceQuery '81106 MBytes (85045477376 bytes)': github.com/thamada/nvidia-smi "
            "nvsim/H100SXMx8_deviceQuery.py",
        ),
        GpuPreset(
            "h200",
            "H200 141 GB",
            143771 * MIB,
            (9, 0),
            "nvidia-smi",
            "nvidia-smi 143771 MiB on an H200 with driver 580 (upper bound until `make gpu-check` records "
            "total_memory there)",
        ),
    )
}
ALIASES = {
    "a10": "a10g",
    "v100": "v100-16gb",
    "rtx3060": "3060",
    "rtx3090": "3090",
    "rtx4090": "4090",
    "a100": "a100-80gb",
    "h100-80gb": "h100",
    "l40": "l40s",
}

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def preset(name: str) -> GpuPreset | None:
    """The preset called `name` (case-insensitive, aliases too), else None."""
    key = name.strip().lower()
    return GPU_PRESETS.get(ALIASES.get(key, key))


def parse_gpu_memory(text: str | int, key: str = "target_gpu") -> int:
    """A preset name or a size with an explicit unit -> bytes; one-line error naming `key` otherwise."""
    text = str(text)  # YAML reads `target_gpu: 4090` as an int: the preset, not 4090 bytes
    found = preset(text)
    if found:
        return found.bytes
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if unit in ("g", "m", "t", "k"):
        raise QLoraError(
            f"{key}: '{text}' is ambiguous; write {match.group(1)}{unit.upper()}B (10^n bytes, as sold) or "
            f"{match.group(1)}{unit.upper()}iB (2^n bytes), or a preset such as t4, 4090, a100-80gb"
        )
    if unit not in _UNITS or (
        unit == "" and ("." in match.group(1) or float(match.group(1)) < MIB)
    ):  # 4080 is no byte count
        names = sorted(n for n in [*GPU_PRESETS, *ALIASES] if n.isdigit() == text.strip().isdigit())  # 24 is no 't4'
        best = closest(text.strip().lower(), names)
        hint = f" (did you mean '{ALIASES.get(best, best)}'?)" if best else ""
        raise QLoraError(
            f"{key}: unknown GPU '{text}'{hint}; expected a preset ({', '.join(GPU_PRESETS)}) "
            "or a size with its unit: 24GB (10^9 bytes), 22.5GiB (2^30 bytes) or plain bytes"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def parse_gpu_list(values: list[str] | None, key: str = "--gpu") -> list[tuple[int, bool]]:
    """Repeated and/or comma-separated --gpu values -> (bytes, native bf16) each, in order. A size without a
    preset is taken to compute in bf16 (compute capability 8.0 and above); a T4 or V100 preset computes in fp16."""
    return [gpu_target(v, key) for value in values or () for v in value.split(",") if v.strip()]


def gpu_target(text: str | int, key: str = "target_gpu") -> tuple[int, bool]:
    """(bytes, whether the card computes bf16 natively) of a preset or a size."""
    found = preset(str(text))
    return parse_gpu_memory(text, key), found is None or found.capability >= (8, 0)


def markdown_table() -> str:
    """The README's preset table, generated from GPU_PRESETS so the two cannot disagree."""
    rows = [
        "| preset | card | bytes (`total_memory`) | GiB | sm | figure | source |",
        "|---|---|---:|---:|---|---|---|",
    ]
    for p in GPU_PRESETS.values():
        rows.append(
            f"| `{p.name}` | {p.card} | {p.bytes:,} | {p.gib:.2f} | {p.capability[0]}.{p.capability[1]} | {p.kind} | "
            f"{p.source} |"
        )
    return "\n".join(rows)
