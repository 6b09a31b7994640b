"""Activation bytes of a mixture-of-experts block, counted from the code that runs it: transformers' top-k
router and qlora's experts implementation (qlora.ops.experts: tokens sorted by expert, the frozen expert
matmul that saves no weight, split LoRA on the routed rows, one layer's stack dequantized at a time).

S = tokens × top-k routed rows. What the block saves for backward:
    router        softmax probabilities (fp32, tokens × experts), top-k indices and normalised weights
    dispatch      the sort order and the token index of every routed row (int64)
    experts       the gate/up output (S × 2I) and the activation (S × I), as a dense gated MLP on S rows
    expert LoRA   per adapted stack: the dropout mask and dropped rows (or the rows themselves), A's output
    combine       the expert output (S × H) and each row's routing weight, for the router's gradient
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4
INT64 = 8


@dataclass(frozen=True)
class MoeShape:
    """What the count needs of one MoE block and its step."""

    tokens: int
    hidden: int
    experts: int
    top_k: int
    intermediate: int  # one expert's
    compute: int  # bytes per activation element
    rank: int
    lora_bytes: int  # bytes per element of LoRA's matmuls (the adapter dtype, or autocast's)
    dropout: bool
    mask_bytes: int  # dropout's kept mask per element (CUDA: bool; CPU: the scaled noise)
    adapted: frozenset[str]  # expert stacks with LoRA: 'gate_up_proj', 'down_proj'
    quantized: bool  # 4-bit stacks (dequantized for each matmul)
    shared: bool = False  # a shared experts' MLP runs after the routed experts (GLM-4.5, DeepSeek-V3)

    @property
    def rows(self) -> int:
        return self.tokens * self.top_k

    def stack_numel(self, leaf: str) -> int:
        return self.experts * self.hidden * self.intermediate * (2 if leaf == "gate_up_proj" else 1)

    def width(self, leaf: str) -> int:
        """The input width of a stack's matmul."""
        return self.hidden if leaf == "gate_up_proj" else self.intermediate


def saved(m: MoeShape) -> dict[str, int]:
    """Bytes one MoE block saves for backward, by part."""
    S, c = m.rows, m.compute
    parts = {
        "router (probabilities, top-k)": m.tokens * m.experts * FP32
        + m.tokens * m.top_k * (INT64 + FP32)
        + m.tokens * FP32,
        "dispatch (sort order, token index)": 2 * S * INT64,
        "experts (gate/up output, activation)": 3 * S * m.intermediate * c,
        "combine (expert output, routing weights)": S * m.hidden * c + S * c,
    }
    lora = sum(lora_saved(m, leaf) for leaf in m.adapted)
    if lora:
        parts["expert LoRA (split, on the routed rows)"] = lora
    return parts


def lora_saved(m: MoeShape, leaf: str) -> int:
    """One adapted stack: A's output, and its input rows (dropped, with the mask; or as they are)."""
    S, width = m.rows, m.width(leaf)
    kept = S * m.rank * m.lora_bytes
    if m.dropout:
        return kept + S * width * (m.lora_bytes + m.mask_bytes)
    return kept + S * width * m.lora_bytes


def dequantized(m: MoeShape, leaf: str) -> int:
    """One stack dequantized for its matmul (and bitsandbytes' fp32 absmax of the double quant)."""
    numel = m.stack_numel(leaf)
    return numel * m.compute + (-(-numel // 64) * FP32 if m.quantized else 0)


def backward(m: MoeShape) -> dict[str, int]:
    """In flight at the busiest points of the block's backward, beside the incoming gradient and the layer's
    saved tensors (negative terms: saved tensors not yet recomputed).

    - recompute: checkpointing recomputes the layer when its last saving op's backward first unpacks a saved
      tensor: the combine's gather (the gradient already reshaped to the routed rows, S × H, waits), or with a
      shared experts' MLP, which runs last, that MLP (nothing routed waits yet). The busiest point of the
      recompute is down_proj's LoRA concatenating its rows' outputs beside the base output (three S × H) and the
      gated product (S × I), with the block's input and the router's logits alive, before the combine's own
      saved tensors exist again;
    - combine: its backward, everything saved: the gradient reshaped to the routed rows, scattered back to
      expert order (a zero tensor and the scattered copy)."""
    S, H, I, c = m.rows, m.hidden, m.intermediate, m.compute
    combine_saved = S * H * c + S * c
    waiting = 0 if m.shared else S * H * c
    outputs = (3 if "down_proj" in m.adapted else 1) * S * H * c
    recompute = waiting + outputs + S * I * c - combine_saved + m.tokens * H * c + m.tokens * m.experts * c
    return {"recompute": recompute, "combine": 3 * S * H * c}


def forward(m: MoeShape) -> int:
    """A no-grad forward at its busiest point: the routed rows, the gate/up output and the dequantized stack."""
    S, H, I, c = m.rows, m.hidden, m.intermediate, m.compute
    up = S * H * c + S * 2 * I * c * 2 + dequantized(m, "gate_up_proj")
    down = S * I * c + S * H * c * 2 + dequantized(m, "down_proj")
    return max(up, down) + m.tokens * m.experts * FP32
