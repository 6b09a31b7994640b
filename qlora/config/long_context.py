"""Long context on one GPU: the recipe keys `training.mlp_tiles` and `training.offload_checkpoints`.

- `training.mlp_tiles: auto | 1 | N`: each decoder layer's MLP runs over N tiles of tokens and is
  recomputed tile by tile in backward (`qlora.ops.tiled_mlp`). `auto` picks, per call,
  `ceil(tokens / max(hidden, 4096))` tiles (Arctic Long Sequence Training's ceil(tokens / hidden),
  with a floor): a tile has at most `hidden` tokens on a model with hidden >= 4096, so its
  `tokens x intermediate` tensors are no larger than one MLP weight, the size of the dequantized
  weight a 4-bit layer's backward makes anyway. Up to 4,096 tokens (or `hidden`) nothing is tiled:
  there the MLP's terms are a few hundred MiB at most on an 8B model, and the extra forward a tiled
  MLP costs (three instead of two under checkpointing) would buy nothing; small models (the demo,
  tests) are never slowed by tiles they do not need.
- `training.offload_checkpoints: false | true | auto`: under gradient checkpointing the input kept
  for each layer's recompute lives in host RAM. `auto` offloads only when the profiler predicts
  that the run does not fit the GPU otherwise.

The rules here are shared by training (qlora.model.build installs qlora.ops) and the profiler (qlora.memory),
which must agree on them to the byte: how many tiles a call uses, how many tokens a loss chunk holds.
"""

from __future__ import annotations

import math

from qlora.config.errors import QLoraError

OFFLOAD_CHOICES = (False, True, "auto")
AUTO_TILE_TOKENS = 4096  # `mlp_tiles: auto`: the fewest tokens per tile (hidden when larger)
# fp32 logits per chunk of the chunked loss: 256 MiB, i.e. 512 tokens at a 128k vocabulary. Smaller chunks
# save little (the chunk is already below one layer's backward at 8B) and run slower matmuls.
CHUNK_BYTES = 2**28
# DeepSpeed ZeRO-3's partitioned linear layers reject the gradients a tile's recompute returns in backward
# (its LinearFunctionForZeroStage3 expects the partitioned, empty shape): `auto` runs untiled there.
UNTILED_STRATEGY = "zero3"


def check_keys(mlp_tiles, offload, gradient_checkpointing, strategy: str | None = None) -> None:
    """Recipe validation of the long-context keys: one-line errors naming the key."""
    if not (
        isinstance(gradient_checkpointing, bool)
        or gradient_checkpointing == "auto"
        or (isinstance(gradient_checkpointing, int) and gradient_checkpointing >= 0)
    ):
        raise QLoraError(
            f"training.gradient_checkpointing: expected true, false, auto or a number of layers >= 0, "
            f"got {gradient_checkpointing!r}"
        )
    if not (
        mlp_tiles == "auto" or (isinstance(mlp_tiles, int) and not isinstance(mlp_tiles, bool) and mlp_tiles >= 1)
    ):
        raise QLoraError(f"training.mlp_tiles: expected auto or an integer >= 1, got {mlp_tiles!r}")
    if offload not in OFFLOAD_CHOICES or (offload in (0, 1) and not isinstance(offload, bool)):
        raise QLoraError(f"training.offload_checkpoints: expected false, true or auto, got {offload!r}")
    if strategy == UNTILED_STRATEGY and mlp_tiles not in ("auto", 1):
        raise QLoraError(
            f"training.mlp_tiles: {mlp_tiles} tiles cannot run under distributed.strategy zero3 (DeepSpeed's "
            "partitioned linear layers refuse the per-tile gradients); set training.mlp_tiles=1 or auto"
        )
    if offload is True and not gradient_checkpointing:
        raise QLoraError(
            "training.offload_checkpoints: true needs training.gradient_checkpointing=true "
            "(it moves the layer inputs that checkpointing keeps)"
        )


def mlp_tiles_for(setting, tokens: int, hidden: int, strategy: str | None = None) -> int:
    """How many tiles the MLP uses for a call with `tokens` tokens (1: untiled; always under ZeRO-3)."""
    if strategy == UNTILED_STRATEGY:
        return 1
    if setting == "auto":
        return max(1, math.ceil(tokens / max(hidden, AUTO_TILE_TOKENS)))
    return max(1, min(int(setting), tokens))


def chunk_tokens(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Tokens per chunk of the chunked loss: as many fp32 logit rows as fit `budget`, rounded down to 64s."""
    rows = budget // (4 * vocab)
    return rows // 64 * 64 if rows >= 64 else max(1, rows)


def checkpointed_layers(setting, layers: int) -> int:
    """How many decoder layers `training.gradient_checkpointing` checkpoints: the first N (the rest keep their
    activations). `auto` counts as all of them until training (or the planner) resolves it against a GPU."""
    if setting is True or setting == "auto":
        return layers
    return 0 if setting is False else min(int(setting), layers)


def fused_loss_chunk_tokens(labelled: int, vocab: int, hidden: int) -> int:
    """Tokens per chunk of Liger Kernel's fused linear cross-entropy (0.8.5, ops/fused_linear_cross_entropy.py):
    the next power of two of labelled / ceil(vocab / hidden), at most `labelled`. It grows with the sequence."""
    per = -(-labelled // -(-vocab // hidden))
    return min(1 << max(per - 1, 0).bit_length(), labelled)


def fused_loss_terms(labelled: int, vocab: int, hidden: int, compute_bytes: int) -> dict[str, int]:
    """What Liger Kernel's fused linear cross-entropy (0.8.5, `fused_linear_cross_entropy_forward`) holds at its
    busiest point, from its code, as qlora.ops.loss calls it (on the labelled rows, a 16-bit head): their copy,
    their gradient (`grad_input`, filled chunk by chunk with `mm(out=)`), the per-token fp32 loss and the target
    mask, and one chunk's logits in the compute dtype (`logits_storage`: the kernel writes their gradient in place).
    A trained head adds its gradient (`zeros_like(weight)`), counted by the caller."""
    c, chunk = compute_bytes, fused_loss_chunk_tokens(labelled, vocab, hidden)
    return {
        "labelled rows (the kernel's input)": labelled * hidden * c,
        "their gradient (made in forward)": labelled * hidden * c,
        "per-token loss (fp32) and target mask": labelled * 5,
        f"one chunk's logits ({chunk} tokens)": chunk * vocab * c,
    }


def torch_loss_chunk_bytes(labelled: int, vocab: int, hidden: int, compute_bytes: int) -> int:
    """One chunk of qlora.ops.loss's torch path at its busiest point (training): fp32 probabilities (+ their
    16-bit copy for the gradient matmul), the chunk's rows and their gradient."""
    c, chunk = compute_bytes, min(labelled, chunk_tokens(vocab))
    return chunk * vocab * (4 + (c if c != 4 else 0)) + 2 * chunk * hidden * c


def fused_loss_is_smaller(labelled: int, tokens: int, vocab: int, hidden: int, compute_bytes: int) -> bool:
    """Whether Liger's fused loss holds no more than the torch chunked loss for this call (both from their code;
    the torch path also makes the hidden-state gradient, tokens x hidden, in forward). Short sequences: Liger's
    is smaller (and faster); at tens of thousands of tokens its chunk grows past a GiB, so the torch path runs."""
    torch_path = tokens * hidden * compute_bytes + torch_loss_chunk_bytes(labelled, vocab, hidden, compute_bytes)
    return sum(fused_loss_terms(labelled, vocab, hidden, compute_bytes).values()) <= torch_path
