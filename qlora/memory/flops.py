"""FLOPs of a training step, to say what recomputation costs and what a step's speed means (MFU).

Forward FLOPs per token: 2 per weight of every linear layer (a multiply and an add), and attention's two
sequence-long products (scores and the weighted sum: 2 x 2 x seq x heads x head_dim per token; the causal
half is not subtracted, as kernels that skip it are not assumed). Backward: the input gradients cost one
forward; full fine-tuning adds the weight gradients (a second one), LoRA's trained weights are too few to
count. Gradient checkpointing adds one forward of each checkpointed layer. So an 8B QLoRA step with every
layer checkpointed is about 3 x 16 = 48 GFLOP per token at short sequences.
"""

from __future__ import annotations

from qlora.memory.inventory import Inventory


def layer_forward_flops(inv: Inventory, seq: int) -> int:
    """Forward FLOPs per token of one decoder layer at sequence length `seq`."""
    d = inv.dims
    linear = sum(lin.in_features * lin.out_features for lin in inv.layer_linears().values())
    return 2 * linear + 4 * seq * d.heads * d.head_dim


def step_flops_per_token(inv: Inventory, seq: int, method: str, checkpointed: int) -> int:
    """FLOPs per token of one training step with `checkpointed` layers recomputed in backward."""
    layers = inv.dims.layers * layer_forward_flops(inv, seq)
    head = 2 * inv.dims.vocab * inv.dims.hidden
    backward = 2 if method == "full" else 1
    return (1 + backward) * (layers + head) + checkpointed * layer_forward_flops(inv, seq)


def recompute_saved_pct(inv: Inventory, seq: int, method: str, checkpointed: int) -> float:
    """The share of an every-layer-checkpointed step's FLOPs that checkpointing only `checkpointed` layers saves."""
    every = step_flops_per_token(inv, seq, method, inv.dims.layers)
    return round(100 * (every - step_flops_per_token(inv, seq, method, checkpointed)) / every, 2)
