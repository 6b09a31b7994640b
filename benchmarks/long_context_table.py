"""The README's long-context table: the planner's longest sequence, before and after the long-context keys.

`python benchmarks/long_context_table.py` prints a Markdown table (predictions only, a few seconds).
Every cell is `fit.max_seq_len` of `qlora profile` for QLoRA r 32 on all linear layers, batch 1,
paged AdamW 32-bit, gradient checkpointing, bf16, GPU sizes in 10^9 bytes (as cards are sold). The first three
columns run transformers' RMSNorm / SwiGLU / RoPE (`training.kernels: none`: the model the H200 measured within
3 %); the last adds Liger Kernel's (`auto`, the GPU default), modelled from its code, not yet measured.
"""

from __future__ import annotations

import argparse

from qlora.memory.estimate import settings_inventory
from qlora.memory.planner import fit_method, predict
from qlora.memory.settings import Settings

GPUS_GB = (12, 16, 24, 48, 80)
MODELS = ("llama-3.1-8b", "llama-3.1-70b")
BASE = Settings(rank=32, batch_size=1, seq_len=2048, optimizer="paged_adamw_32bit", checkpointing=True)
LONG_CONTEXT_KEYS = dict(loss="chunked", mlp_tiles="auto", offload_checkpoints=True, lora_dropout=0.0)
COLUMNS = {  # the settings each column changes, as recipe keys would; transformers' kernels but in the last column
    "before (standard loss)": dict(
        loss="standard", mlp_tiles=1, offload_checkpoints=False, lora_dropout=0.05, kernels="none"
    ),
    "chunked loss": dict(loss="chunked", mlp_tiles=1, offload_checkpoints=False, lora_dropout=0.05, kernels="none"),
    "chunked loss + long-context keys": dict(LONG_CONTEXT_KEYS, kernels="none"),
    "+ Liger kernels (unmeasured)": dict(LONG_CONTEXT_KEYS, kernels="auto"),
}


def longest(model: str, gpu_bytes: int, changes: dict) -> tuple[int, int]:
    """(longest sequence at batch 1, host RAM at that length) for `model` on a GPU of `gpu_bytes`."""
    settings = BASE.replace(**changes)
    inv = settings_inventory(model, settings)
    fit = fit_method(inv, "qlora", settings, gpu_bytes)
    if not fit.max_seq_len:
        return 0, 0
    host = predict(inv, "qlora", settings.replace(seq_len=fit.max_seq_len), gpu_bytes).host_bytes
    return fit.max_seq_len, sum(host.values())


def table(models=MODELS, gpus=GPUS_GB) -> str:
    lines = [
        "| Model | GPU | " + " | ".join(COLUMNS) + " | host RAM (last column) |",
        "|---|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for model in models:
        for gb in gpus:
            cells, host = [], 0
            for changes in COLUMNS.values():
                seq, host = longest(model, gb * 10**9, changes)
                cells.append(f"{seq:,}" if seq else "does not fit")
            lines.append(
                f"| {model} | {gb} GB | " + " | ".join(cells) + f" | {host / 2**30:.0f} GiB |"
                if host
                else f"| {model} | {gb} GB | " + " | ".join(cells) + " | — |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="catalog name (repeatable; default: Llama-3.1 8B and 70B)")
    args = parser.parse_args()
    print(table(tuple(args.model) if args.model else MODELS))


if __name__ == "__main__":
    main()
