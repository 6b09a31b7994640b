"""The preference step (`training.objective: dpo`) as TRL 1.16's DPOTrainer runs it, counted from its code.

TRL concatenates each batch's chosen and rejected sequences into one batch of 2 x batch_size, so the
decoder's activations are those of the doubled batch (`qlora.memory.activations` counts them). The loss
differs: TRL scores tokens with its own fused head (`trl.trainer.utils.add_fused_lm_head` and
`trl.kernels.chunked_logprob.ChunkedLogProbFunction`), which never holds the batch x sequence x vocabulary
logits but projects tiles of at most 4,096 tokens x 32,768 vocabulary entries. On CUDA a Triton kernel folds
each tile in place; elsewhere (the CPU `--measure` checks) torch ops fold it, with fp32 temporaries of the
tile's size: three and a bool mask at the forward's busiest point, seven and a mask in backward. Per step:

    policy forward        the layers (saved as for SFT, doubled batch) + the head's forward tile
    reference forward     no grad, the adapter switched to TRL's frozen 'ref' copy, while the policy's saved
                          activations and per-token outputs are alive (skipped with precomputed log-probs)
    backward              the head's backward (the hidden-state gradient in fp32, the tile) then the layers

The reference's weights are the base's; its adapter copy is the trained adapter's size again (frozen: no
gradient, no optimizer state).
"""

from __future__ import annotations

from qlora.memory.activations import FP32, Activations, Step, _head_saved
from qlora.memory.inventory import Inventory

TOKEN_TILE = 4096  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE
VOCAB_CHUNK = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE
# Per-token fp32 vectors of the head's forward: running max, sum of exp, its x-weighted and squared sums, the
# logit sum, the max before the target and the target logit.
FORWARD_VECTORS = 7
MASKS = 2  # attention_mask and completion_mask (int64), beside the token ids and the labels made from them


def scored_tokens(step: Step) -> int:
    """Positions the head scores: every position but each sequence's last (CUDA scores only the completion's,
    which the profiler does not know: all, an upper bound)."""
    return step.batch * (step.seq - 1)


def head_terms(inv: Inventory, step: Step, moment: str) -> dict[str, int]:
    """What TRL's fused head holds at its busiest point of `moment` ('forward' or 'backward'), by name."""
    d, c = inv.dims, step.compute_bytes
    n = scored_tokens(step)
    rows = min(n, TOKEN_TILE)
    tile = rows * min(
        d.vocab, VOCAB_CHUNK
    )  # a tile's values; its buffer is a whole chunk wide whatever the vocabulary
    terms = {
        "scored hidden states (a copy)": n * d.hidden * c,
        "targets and per-token statistics": n * 8 + FORWARD_VECTORS * n * FP32,
        "projection buffer (tokens x 32,768)": rows * VOCAB_CHUNK * c,
    }
    torch_fold = step.device != "cuda"  # Triton folds the tile in place on CUDA
    if moment == "backward":
        terms["hidden-state gradient (fp32)"] = n * d.hidden * FP32
        if torch_fold:
            terms["torch fold: 7 fp32 tiles and a bool mask"] = 7 * tile * FP32 + tile
    elif torch_fold:
        terms["torch fold: 3 fp32 tiles and a bool mask"] = 3 * tile * FP32 + tile
    return terms


def preference_moments(inv: Inventory, step: Step, reference: bool) -> dict[str, dict[str, int]]:
    """The head's moments of a training step (`step.batch`: chosen + rejected), named terms each."""
    saved = _head_saved(inv, step)
    moments = {
        "TRL log-prob head, policy forward": {"final norm (saved)": saved, **head_terms(inv, step, "forward")},
        "TRL log-prob head, backward": {"final norm (saved)": saved, **head_terms(inv, step, "backward")},
    }
    if reference:
        moments["reference forward (adapter 'ref', no grad)"] = {
            "final norm (saved)": saved,
            "policy's log-probs and per-token outputs": 4 * scored_tokens(step) * FP32,
            **{f"reference {k}": v for k, v in head_terms(inv, step, "forward").items()},
            "policy's scored hidden states (saved)": scored_tokens(step) * inv.dims.hidden * step.compute_bytes,
        }
    return moments


def eval_moments(inv: Inventory, step: Step) -> dict[str, dict[str, int]]:
    """The eval step's head: the policy's no-grad forward, then the reference's beside its per-token outputs."""
    forward = head_terms(inv, step, "forward")
    return {
        "eval: TRL log-prob head (policy, then reference)": {
            **forward,
            "policy's log-probs and per-token outputs": 4 * scored_tokens(step) * FP32,
        }
    }


LOSS_MOMENTS = ("loss chunk (chunked loss)", "end of forward (logits, loss)", "start of backward (loss gradient)")


def with_preference_head(acts: Activations, inv: Inventory, step: Step, reference: bool) -> Activations:
    """`acts` of the doubled batch with the SFT loss's moments replaced by TRL's head (and the masks TRL's
    collator adds kept beside the token ids)."""
    parts = {k: v for k, v in acts.parts.items() if k not in LOSS_MOMENTS}
    moments = {k: v for k, v in acts.moments.items() if k not in LOSS_MOMENTS}
    for name, terms in preference_moments(inv, step, reference).items():
        parts[name], moments[name] = terms, sum(terms.values())
    kept = {**acts.kept, "attention and completion masks": MASKS * step.tokens * 8}
    return Activations(kept, moments, parts, acts.host)


def eval_with_preference_head(acts: Activations, inv: Inventory, step: Step) -> Activations:
    """The eval step's activations with TRL's head instead of the SFT loss."""
    parts = {k: v for k, v in acts.parts.items() if "loss" not in k and "logits" not in k}
    parts.update(eval_moments(inv, step))
    moments = {name: sum(terms.values()) for name, terms in parts.items()}
    kept = {**acts.kept, "eval batch: attention and completion masks": MASKS * step.tokens * 8}
    return Activations(kept, moments, parts)
