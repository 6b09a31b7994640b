"""Activation memory of one training step, counted tensor by tensor from the decoder's code.

The count follows what autograd saves in the Llama-family decoder layer of transformers (Llama,
Mistral, Qwen2: RMSNorm, rotary attention, gated MLP) wrapped by peft LoRA, and what the loss
allocates; other families are approximated by it. Autograd saves an input only when the gradient
of another input needs it, so a frozen base linear keeps nothing while a trained one keeps its
input. The activation peak of a step is

    kept (alive from forward until backward frees it: each layer's input under checkpointing,
          everything every layer saves without it)
      + the largest of the step's moments:
        end of forward       standard loss: logits, their fp32 copy and log-softmax (+ autocast's 16-bit adapter
                             copies)
        start of backward    standard loss: the loss gradient (three vocabulary-sized fp32 tensors)
        loss chunk           chunked loss (qlora.ops.loss): one chunk's fp32 logits, the final hidden states and
                             their gradient, made in forward (+ autocast's adapter copies)
        backward of a layer  the last layer's saved tensors (recomputed first under checkpointing)
                             + the gradients in flight at its busiest point (with a tiled MLP: one
                             MLP tile's backward, or the post-attention norm's or attention's)

With offloaded checkpoints the kept layer inputs are in host RAM (`Activations.host`) and one of
them comes back for its layer's recompute.

The eval step is its own phase (`eval_activation_bytes`): a no-grad forward, whose peak is the loss
(chunked or standard) or one layer's forward temporaries.

With `training.kernels: auto` on CUDA (`Step.kernels`) the count follows Liger Kernel's code (0.8.5) instead:
its RMSNorm saves its input as it is and one fp32 rstd per token (no fp32 copy; its weight gradient comes from
them), its SwiGLU saves the gate's and up's outputs (SiLU is recomputed) and writes their gradients over them
in backward, its RoPE rotates q and k in place (what attention saves is unchanged), and the loss is its fused
linear cross-entropy where that holds less (`qlora.config.long_context.fused_loss_terms`).

Sequences are assumed unpadded (no attention mask), as with packing or equal-length batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from qlora.config.long_context import chunk_tokens, fused_loss_is_smaller, fused_loss_terms, torch_loss_chunk_bytes
from qlora.memory import moe
from qlora.memory.inventory import Inventory

FP32 = 4
CUDA_MASK = 1  # CUDA's fused dropout keeps a bool mask; the CPU one keeps the scaled noise tensor
# Which tensor feeds each linear of a Llama-family layer: linears with one source share one input.
LINEAR_SOURCE = {
    "q_proj": "attn_norm",
    "k_proj": "attn_norm",
    "v_proj": "attn_norm",
    "o_proj": "attn_out",
    "gate_proj": "mlp_norm",
    "up_proj": "mlp_norm",
    "down_proj": "mlp_act",
    "query_key_value": "attn_norm",  # GPT-NeoX
    "dense": "attn_out",
    "dense_h_to_4h": "mlp_norm",
    "dense_4h_to_h": "mlp_act",
}


@dataclass(frozen=True)
class Step:
    """The shape and precision of one training step, as the activation count needs them."""

    batch: int
    seq: int
    compute_bytes: int  # bytes per element of activations (the compute dtype)
    autocast: bool  # 16-bit autocast around forward (Trainer bf16/fp16 on GPU)
    device: str
    checkpointing: bool
    attention: str
    method: str
    rank: int
    lora_dropout: float
    lora_leaves: frozenset[str]  # leaf names of the linears LoRA wraps in each layer
    adapter_numel: int
    adapter_bytes: int  # bytes per adapter element (fp32)
    task: str = "causal_lm"
    num_labels: int = 2  # classification: the head's outputs
    mlp_tiles: int = 1  # the tiled MLP's tiles (qlora.ops.tiled_mlp); 1: untiled
    offload: bool = False  # checkpointed layer inputs in host RAM (qlora.config.long_context)
    checkpointed_layers: int | None = None  # with checkpointing: the first N layers only (None: all)
    generate_tokens: int = 0  # eval.metric exact_match: new tokens generated per prompt in the eval phase (0: none)
    loss: str = "standard"  # 'chunked': qlora.ops.loss (causal LM only)
    kernels: bool = False  # Liger Kernel's RMSNorm, SwiGLU, RoPE and fused loss (training.kernels: auto on CUDA)
    expert_leaves: frozenset[str] = frozenset()  # fused expert stacks with LoRA (mixture of experts)
    packed: bool = False  # data.packing: several documents per sequence (qlora.ops.attention attends each alone)

    @property
    def tiled(self) -> bool:
        return self.mlp_tiles > 1

    @property
    def tile_tokens(self) -> int:
        """Tokens of the largest (first) MLP tile."""
        return -(-self.tokens // self.mlp_tiles)

    @property
    def classifier(self) -> bool:
        return self.task == "classification"

    @property
    def chunked(self) -> bool:
        return self.loss == "chunked" and not self.classifier

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def lora_matmul_bytes(self) -> int:
        """peft casts inputs to the fp32 adapters; autocast then runs (and saves) the matmul in 16-bit."""
        return self.compute_bytes if self.autocast else self.adapter_bytes


@dataclass(frozen=True)
class Activations:
    kept: dict[str, int]
    moments: dict[str, int]
    parts: dict[str, dict[str, int]] = field(default_factory=dict)  # a moment's named terms, where it has them
    host: dict[str, int] = field(default_factory=dict)  # bytes in host RAM instead (offloaded checkpoints)

    def peak_terms(self) -> dict[str, int]:
        """The peak moment as named terms (its parts, or the moment itself)."""
        moment = self.peak_moment
        return dict(self.parts.get(moment) or {moment: self.moments[moment]})

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.get)

    @property
    def total(self) -> int:
        return sum(self.kept.values()) + max(self.moments.values())


def checkpointed(inv: Inventory, step: Step) -> int:
    """How many decoder layers are checkpointed: the first `step.checkpointed_layers` (all when None)."""
    if not step.checkpointing:
        return 0
    return inv.dims.layers if step.checkpointed_layers is None else min(step.checkpointed_layers, inv.dims.layers)


def activation_bytes(inv: Inventory, step: Step) -> Activations:
    """Bytes of activations at the step's activation peak, split into named terms.

    With the first N of L layers checkpointed (`training.gradient_checkpointing: N`), those keep their input
    and the others everything they save; backward meets the unchecked layers first (no recompute), and
    reaches the checkpointed ones once the others' saved tensors are freed.
    """
    d, T, S, c = inv.dims, step.tokens, step.seq, step.compute_bytes
    n, L = checkpointed(inv, step), inv.dims.layers
    ckpt, free = replace(step, checkpointing=True), replace(step, checkpointing=False)
    layer = sum(layer_saved(inv, ckpt).values())
    # what the first norm saves is the layer input itself when it is fp32, or with Liger's RMSNorm
    first_norm_input = T * d.hidden * c if (c == FP32 or step.kernels) else 0
    unchecked = (L - n) * (sum(layer_saved(inv, free).values()) + first_norm_input)
    kept, host = {}, {}
    if n and step.offload:
        host = offloaded(inv, step, n)
    elif n:
        kept["layer inputs kept by checkpointing"] = n * T * d.hidden * c
    if n < L:
        key = "everything the layers save" if n == 0 else f"everything the {L - n} unchecked layers save"
        kept[key] = unchecked - (_unsaved_in_first_layer(inv, step) if n == 0 else 0)
    if step.method == "lora-8bit" and n:
        # bitsandbytes' 8-bit matmul keeps its input as `ctx.A`, a plain attribute that checkpointing
        # cannot drop: the forward graph holds it until backward.
        # (a tiled MLP runs its forward without grad: its int8 matmuls hold nothing past the tile)
        held = _linear_inputs(inv, step, count_attention_output=True, skip=MLP_LEAVES if step.tiled else frozenset())
        kept["int8 layers' inputs (held by bitsandbytes)"] = n * held
    kept["token ids, labels, positions"] = batch_bytes(step) + S * 8
    kept["rotary tables"] = d.rope_tables * 2 * S * (d.rotary_dim or d.head_dim) * c
    if step.attention == "eager":  # one additive mask per layer type (Gemma 2/3: full and sliding)
        kept["causal mask"] = d.attention_kinds * step.batch * S * S * c
    head = _head_saved(inv, step)
    recomputed = layer if n else 0
    if n and step.offload:  # the layer's input, back from host RAM for its recompute
        recomputed += T * d.hidden * c
    cached = replace(
        step, adapter_numel=step.adapter_numel * n // L, checkpointing=n > 0
    )  # autocast's copies of checkpointed layers
    parts = {}
    if step.chunked:
        chunk = {"final norm (saved)": head, **chunked_loss_terms(inv, step, grads=True)}
        if _adapters_cast(step) and n:
            chunk["autocast's adapter copies"] = cached.adapter_numel * step.compute_bytes
        parts["loss chunk (chunked loss)"] = chunk
        moments = {"loss chunk (chunked loss)": sum(chunk.values())}
    else:
        moments = {
            "end of forward (logits, loss)": head + _forward_end(inv, cached),
            "start of backward (loss gradient)": head + _loss_backward(inv, step),
        }
    if step.attention == "eager":
        # attention's backward, the MLP's saved tensors freed: softmax's and the scores' gradients (two fp32 tokens x
        # tokens tensors per head) beside the incoming gradient
        scores = 2 * step.batch * d.heads * S * S * FP32 + T * d.hidden * c - _mlp_saved(step) * T * d.intermediate * c
        after = 2 if inv.sandwich_norms() else 1  # the norms after attention, backpropagated first too
        scores -= after * (T * d.hidden * FP32 + T * FP32)
        if step.method != "full":
            scores -= _lora_saved(inv, step, step.lora_leaves & MLP_LEAVES)
        else:  # the MLP's linear inputs and the normalized inputs its norms saved for their weights
            scores -= T * (d.hidden + d.intermediate) * c + after * T * d.hidden * c
        # (the layers' own saved tensors: in `kept` for unchecked layers, recomputed for checkpointed ones)
        moments["backward through one layer's eager attention"] = max(
            scores if n < L else 0, recomputed + scores - (unchecked if n < L else 0) if n else 0
        )
    if n < L:  # the last layers keep their activations: no recompute
        moments.update(layer_backward_moment(inv, free, 0))
    if n:
        for name, value in layer_backward_moment(inv, ckpt, recomputed).items():
            moments[name if n == L else name.replace("one layer", "a checkpointed layer")] = value - (
                unchecked if n < L else 0
            )
    return Activations(kept, moments, parts, host)


def layer_backward_moment(inv: Inventory, step: Step, recomputed: int) -> dict[str, int]:
    """The moment of one layer's backward, named after its busiest part when the MLP is tiled."""
    if not step.tiled:
        return {"backward through one layer": recomputed + _layer_backward(inv, step)}
    part, in_flight = tiled_layer_backward(inv, step)
    return {f"backward through one layer ({part})": recomputed + in_flight}


def labelled_tokens(step: Step) -> int:
    """Tokens whose next-token label is kept: all but each sequence's last (packed or unpadded batches)."""
    return step.batch * (step.seq - 1)


def chunked_loss_terms(inv: Inventory, step: Step, grads: bool) -> dict[str, int]:
    """What `qlora.ops.loss` holds at its busiest point, from its code: the final hidden states, the kept
    positions and their targets, the loss accumulator and one chunk. With `grads` (training) the chunk's
    busiest point is its hidden-state gradient matmul: fp32 probabilities (+ their 16-bit copy), the
    chunk's rows and their gradient; the hidden-state gradient (and for full FT the head's fp32 weight
    gradient) are made in forward. Without (eval) it is the logits and five per-token temporaries.
    With Liger's fused kernel (where qlora.ops.loss calls it) its own terms, named, training and eval alike."""
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    labelled = labelled_tokens(step)
    n = min(labelled, chunk_tokens(d.vocab))
    terms = {"final hidden states": T * d.hidden * c, "label positions and targets": 2 * labelled * 8}
    head = next((lin for lin in inv.linears if lin.role == "lm_head"), None)
    if step.kernels and fused_loss_is_smaller(
        labelled, T, d.vocab, d.hidden, c
    ):  # qlora.ops.loss calls Liger's kernel
        terms.update(
            {
                f"Liger fused loss: {name}": value
                for name, value in fused_loss_terms(labelled, d.vocab, d.hidden, c).items()
            }
        )
        if step.method == "full":  # zeros_like(weight) whenever the head trains, in eval too
            terms["Liger fused loss: head weight gradient"] = d.vocab * d.hidden * c + (
                d.vocab * c if head and head.bias else 0
            )
        return terms
    terms["loss accumulator"] = FP32
    if grads:
        terms["hidden-state gradient"] = T * d.hidden * c
        if step.method == "full":
            terms["head weight gradient (fp32)"] = d.vocab * d.hidden * FP32 + (
                d.vocab * FP32 if head and head.bias else 0
            )
        terms["loss chunk"] = torch_loss_chunk_bytes(labelled, d.vocab, d.hidden, c)
    else:
        widened = n * d.vocab * (c + FP32) if c != FP32 else 0  # the 16-bit logits and their fp32 copy
        terms["loss chunk"] = n * d.hidden * c + max(n * d.vocab * FP32 + 5 * n * FP32, widened)
    return terms


def batch_bytes(step: Step) -> int:
    """The micro-batch's token ids and labels (int64): alive from forward to the optimizer step, as
    the trainer's loop keeps its last batch. A classifier has one label per sequence."""
    return (step.tokens + (step.batch if step.classifier else step.tokens)) * 8


def layer_saved(inv: Inventory, step: Step) -> dict[str, int]:
    """What one decoder layer saves for backward, besides its input."""
    d, T, c, B, S = inv.dims, step.tokens, step.compute_bytes, step.batch, step.seq
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    # RMSNorm saves its input in fp32 and one rsqrt per token. The first norm's fp32 input is the layer
    # input itself (counted with the layer inputs) or an upcast copy; the second's is the residual sum.
    # Liger's saves the input as it is (the first's is the layer input) and an fp32 rstd.
    norms = (T * d.hidden * FP32 if c != FP32 else 0) + T * d.hidden * FP32 + 2 * T * FP32
    if step.kernels:
        norms = T * d.hidden * c + 2 * T * FP32
    elif step.method == "full":
        norms += 2 * T * d.hidden * c  # the normalized input, for the norm weight's gradient
    if step.attention == "eager":  # q and repeated k, v; softmax output in fp32 and its 16-bit copy
        attention = T * 3 * q * c + B * d.heads * S * S * (FP32 + (c if c != FP32 else 0))
        if d.scores_capped:  # Gemma 2: tanh saves its output, a second tokens x tokens tensor per head
            attention += B * d.heads * S * S * c
    else:  # sdpa (flash / memory-efficient) and flash_attention_2: q, k, v, output, logsumexp
        attention = T * (2 * q + 2 * kv) * c + B * d.heads * S * FP32
    if split_attention(inv, step):
        attention += split_attention_saved(inv, step)
    if inv.sandwich_norms():  # Gemma: the post-attention norm saves the attention output (fp32) and its rsqrt
        norms += T * d.hidden * FP32 + T * FP32
    if inv.post_norms() and c == FP32 and not step.kernels:
        # OLMo 2: the first norm normalizes attention's output, not the layer input it would share in fp32
        norms += T * d.hidden * FP32 - T * FP32
        if step.method == "full":  # q, k and v read the layer input itself (kept by checkpointing), no norm output
            norms -= T * d.hidden * c
    if d.parallel_layer_norm:  # LayerNorm keeps its input as it is (the layer input, twice), a mean and an rstd
        norms = 4 * T * FP32
    if {"qkv_proj", "query_key_value"} & set(inv.layer_linears()) and step.attention != "eager":
        # Phi-3's fused projection: v is a view of its output, so what attention saves keeps all of it (q and k
        # are rotated copies)
        attention += T * (q + kv) * c
    parts = {"norms": norms, "attention": attention, "mlp": _mlp_saved(step, inv) * T * d.intermediate * c}
    if inv.qk_norms():
        parts["query and key norms"] = qk_norm_saved(inv, step)
    if d.moe_layers:  # a MoE block (and the shared experts' MLP beside it) instead of the dense MLP
        parts["mlp"] = _mlp_saved(step, inv) * T * d.shared_intermediate * c
        parts.update(moe.saved(moe_shape(inv, step)))
    if step.tiled:
        del parts["mlp"]
        return {**parts, **tiled_mlp_saved(inv, step)}
    if step.method == "full" or (step.method == "lora-8bit" and not step.checkpointing):
        parts["linear inputs"] = _linear_inputs(inv, step)
    if step.method != "full":
        parts["lora"] = _lora_saved(inv, step, step.lora_leaves)
        if _adapters_cast(step):  # autocast's 16-bit copies of the layer's adapter weights, saved by its matmuls
            parts["adapter copies"] = step.adapter_numel // d.layers * c
    return parts


def moe_shape(inv: Inventory, step: Step) -> moe.MoeShape:
    """The MoE block of `inv` under `step`, as qlora.memory.moe counts it."""
    d = inv.dims
    return moe.MoeShape(
        tokens=step.tokens,
        hidden=d.hidden,
        experts=d.experts,
        top_k=d.top_k,
        intermediate=d.expert_intermediate,
        compute=step.compute_bytes,
        rank=step.rank,
        lora_bytes=step.lora_matmul_bytes,
        dropout=step.lora_dropout > 0,
        mask_bytes=CUDA_MASK if step.device == "cuda" else step.adapter_bytes,
        adapted=step.expert_leaves if step.method != "full" else frozenset(),
        quantized=step.method == "qlora",
        shared=d.shared_intermediate > 0,
    )


def split_attention(inv: Inventory, step: Step) -> bool:
    """Whether qlora.ops.attention splits a layer's attention (training's sdpa): packed documents, or a sliding
    window shorter than the sequence."""
    window = inv.dims.sliding_window
    return step.attention == "sdpa" and (step.packed or (window is not None and window < step.seq))


def split_attention_saved(inv: Inventory, step: Step) -> int:
    """What qlora.ops.attention saves beyond one sdpa call: the band mask of a sliding window (window x 2 window, in
    the compute dtype, shared by the blocks; on a GPU with grouped-query attention, the keys and values repeated
    to every query head); and, where o_proj saves its input as it is (full FT, LoRA without
    dropout or cast), that input, which is now the blocks' gathered output rather than sdpa's own."""
    d, c = inv.dims, step.compute_bytes
    window = d.sliding_window if d.sliding_window and d.sliding_window < step.seq else 0
    saved = window * 2 * window * c
    if window and step.device == "cuda" and d.kv_heads != d.heads:  # keys and values repeated for the masked blocks
        saved += 2 * step.tokens * (d.heads - d.kv_heads) * d.head_dim * c
    if step.method == "full" or "attn_out" in _saved_as_is(step):
        saved += step.tokens * d.heads * d.head_dim * c
    return saved


def qk_norm_saved(inv: Inventory, step: Step) -> int:
    """What the query and key RMSNorms save (Qwen3, OLMo 2, Gemma 3): their fp32 input (the projection's output, or
    its fp32 copy) and one rsqrt per normalized vector; for full FT also the normalized input, for the weight's
    gradient."""
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    q_width, k_width = inv.qk_norms()
    saved = T * (q + kv) * FP32 + T * (q // q_width + kv // k_width) * FP32
    return saved + (T * (q + kv) * c if step.method == "full" else 0)


def _mlp_saved(step: Step, inv: Inventory | None = None) -> int:
    """Intermediate-sized tensors the gated MLP saves: gate, SiLU and up outputs; Liger's SwiGLU recomputes SiLU.
    A plain MLP (GPT-NeoX): the activation's input."""
    if inv is not None and not gated(inv):
        return 1
    return 2 if step.kernels else 3


def gated(inv: Inventory) -> bool:
    """Whether the MLP is gated (Llama's gate and up projections, Phi-3's fused gate_up_proj)."""
    return bool({"gate_proj", "gate_up_proj", "w1"} & set(inv.layer_linears())) or not inv.dims.parallel_layer_norm


def _down(inv: Inventory) -> str:
    """The MLP's output projection's leaf name."""
    return "dense_4h_to_h" if "dense_4h_to_h" in inv.layer_linears() else "down_proj"


def _adapters_cast(step: Step) -> bool:
    return step.autocast and step.adapter_bytes != step.compute_bytes


def _linear_inputs(inv: Inventory, step: Step, count_attention_output: bool = False, skip=frozenset()) -> int:
    """The layer's distinct linear inputs (q, k, v share one) but those of the `skip` leaves. With sdpa, o_proj's
    input is the attention output (the kernels return it in (batch, seq, heads, dim) layout), which attention saves
    anyway."""
    sources = {
        LINEAR_SOURCE.get(leaf, leaf): lin.in_features for leaf, lin in inv.layer_linears().items() if leaf not in skip
    }
    if step.attention != "eager" and not count_attention_output:
        sources.pop("attn_out", None)
    return step.tokens * sum(sources.values()) * step.compute_bytes


def _lora_saved(inv: Inventory, step: Step, leaves) -> int:
    """Wrapped linears: dropout's mask and output (lora_A's input), lora_A's output (lora_B's input).

    Without dropout lora_A saves its input itself: a per-wrapper copy when it was cast to the
    adapter dtype, else the plain input, shared by the wrappers fed by one tensor.
    """
    T, mm = step.tokens, step.lora_matmul_bytes
    linears = inv.layer_linears()
    saved, shared = 0, {}
    for leaf in leaves:
        width = linears[leaf].in_features
        saved += T * step.rank * mm
        if step.lora_dropout > 0:
            mask = CUDA_MASK if step.device == "cuda" else step.adapter_bytes
            saved += T * width * (mm + mask)
        elif step.adapter_bytes != step.compute_bytes:
            saved += T * width * mm
        else:
            shared[LINEAR_SOURCE.get(leaf, leaf)] = T * width * mm
    if step.attention != "eager":
        shared.pop("attn_out", None)  # the attention output, saved by attention already
    return saved + sum(shared.values())


def _saved_as_is(step: Step) -> set[str]:
    """Sources whose plain tensor lora_A saves (no dropout, no cast): already counted as saved."""
    if step.method == "full" or step.lora_dropout > 0 or step.adapter_bytes != step.compute_bytes:
        return set()
    return {LINEAR_SOURCE.get(leaf, leaf) for leaf in step.lora_leaves}


def _unsaved_in_first_layer(inv: Inventory, step: Step) -> int:
    """LoRA without checkpointing: nothing asks for the embeddings' gradient (the trainer calls
    `enable_input_require_grads` only with checkpointing), so the first layer's first norm saves
    nothing, its wrappers keep no dropout mask and its 8-bit matmuls no input."""
    if step.method == "full":
        return 0
    T, H = step.tokens, inv.dims.hidden
    fed = [leaf for leaf in step.lora_leaves if LINEAR_SOURCE.get(leaf) == "attn_norm"]
    mask = (CUDA_MASK if step.device == "cuda" else step.adapter_bytes) if step.lora_dropout > 0 else 0
    unsaved = T * H * (step.compute_bytes if step.kernels else FP32) + T * FP32 + len(fed) * T * H * mask
    if step.method == "lora-8bit":
        unsaved += T * H * step.compute_bytes
    return unsaved


def _head_saved(inv: Inventory, step: Step) -> int:
    """Until the loss gradient reaches the layers: the final norm's fp32 input and rsqrt, and for full
    FT what the norm weight and the trained head need; a classifier's head trains under every method,
    so it keeps its input (and, under autocast, its 16-bit weight copy)."""
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    saved = T * d.hidden * (c if step.kernels else FP32) + T * FP32
    layer_norm = d.parallel_layer_norm  # GPT-NeoX's LayerNorm: its input, a mean and an rstd; no normalized copy
    if layer_norm:
        saved = T * d.hidden * c + 2 * T * FP32
    if (
        step.method == "full"
    ):  # the norm's normalized input (not Liger's); the standard loss's head also saves its input
        return saved + ((0 if step.kernels or layer_norm else 1) + (0 if step.chunked else 1)) * T * d.hidden * c
    if step.classifier:
        saved += T * d.hidden * c + (step.num_labels * d.hidden * c if _adapters_cast(step) else 0)
    return saved


def _forward_end(inv: Inventory, step: Step) -> int:
    """Logits, their fp32 copy for the loss, log-softmax's output; plus autocast's cached 16-bit adapters."""
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    if step.classifier:  # every position's label scores, then the last token's, pooled, and its log-softmax
        logits = T * step.num_labels * c + step.batch * step.num_labels * (c + (FP32 if c != FP32 else 0) + FP32)
    else:
        logits = T * d.vocab * (c + (FP32 if c != FP32 else 0) + FP32)
    # Under checkpointing autocast's cache still holds every layer's adapter copies until forward ends
    # (without it they are saved, counted with the layers).
    cache = step.adapter_numel * c if (_adapters_cast(step) and step.checkpointing) else 0
    return logits + cache


def _loss_backward(inv: Inventory, step: Step) -> int:
    """Log-softmax's output, its incoming gradient and its input gradient; for full FT then the head's
    weight gradient, made before it is added to the accumulated one."""
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    if step.classifier:  # the pooled scores' gradient scattered back to every position, then the head's input gradient
        return T * step.num_labels * c + T * d.hidden * c + step.num_labels * d.hidden * FP32
    loss = 3 * T * d.vocab * FP32
    if step.method != "full":
        return loss
    head = T * d.vocab * (FP32 + (c if c != FP32 else 0)) + d.vocab * d.hidden * c + T * d.hidden * c
    return max(loss, head)


def _layer_backward(inv: Inventory, step: Step) -> int:
    """Gradients (and recompute leftovers) in flight at the busiest point of a layer's backward.

    The incoming gradient is there throughout. Then the largest of:
    - end of the recompute (checkpointing, LoRA on down_proj): non-reentrant checkpointing stops when
      lora_B's input is recomputed; the MLP's input, the residual, the gated product (and its fp32
      casts for the adapter), down_proj's base output are still alive, and the incoming gradient
      already scaled for the LoRA branch;
    - down_proj's backward: its input gradient and a weight-sized temporary (the dequantized 4/8-bit
      weight, or for full FT the weight gradient before it is added to the accumulated one);
    - with LoRA on down_proj, once its branch is backpropagated (the rank-sized tensor freed): the branch's
      input gradient beside the base's (measured on a CPU; with torch's SwiGLU the next point is larger);
    - the gated product's backward: three intermediate-sized gradients, after down_proj's saved
      tensors are freed.
    """
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    if d.moe_layers:
        return T * d.hidden * c + max(moe.backward(moe_shape(inv, step)).values())
    H, I = d.hidden, d.intermediate
    down_lora = _down(inv) in step.lora_leaves
    recompute_end = 0
    if step.checkpointing and down_lora:
        saved = _saved_as_is(step)
        recompute_end = T * H * step.lora_matmul_bytes + T * H * c  # scaled incoming gradient, base output
        recompute_end += (T * H * c if "mlp_norm" not in saved else 0) + (T * I * c if "mlp_act" not in saved else 0)
        if step.method == "lora-8bit":  # the recomputed q/k/v input, held by bitsandbytes through the residual's graph
            recompute_end += T * H * c
        if c != FP32:  # the 16-bit residual (the norm saved its fp32 copy)
            recompute_end += T * H * c
        if step.adapter_bytes != c:  # down's input cast to fp32 by peft, and (autocast) dropout's unsaved fp32 output
            recompute_end += T * I * step.adapter_bytes * (2 if step.lora_dropout > 0 and step.autocast else 1)
    # down_proj's LoRA branch backpropagated (its rank-sized tensor freed): its input gradient beside the base's
    branch = 2 * T * I * c - T * step.rank * step.lora_matmul_bytes if down_lora and step.method != "full" else 0
    down, product = _mlp_backward(inv, step)
    if d.residual_scaled:
        # Granite multiplies the MLP's output before the residual sum: that product's gradient is a second
        # hidden-sized tensor until down_proj's backward is done; at the recompute's end one more hidden-sized
        # tensor is alive (measured on a CPU: the recomputed attention branch, scaled)
        down, branch = down + T * H * c, branch + T * H * c if branch else 0
        recompute_end += 2 * T * H * c if recompute_end else 0
    # GPT-NeoX's parallel branches: the other branch's input gradient waits to be added to the residual's
    incoming = T * H * c * (2 if d.parallel_layer_norm else 1)
    return incoming + max(recompute_end, branch, down, product)


def _mlp_backward(inv: Inventory, step: Step) -> tuple[int, int]:
    """In flight in the MLP's backward, besides the incoming gradient: down_proj's backward (its
    input gradient and a weight-sized temporary), then the gated product's (three intermediate-sized
    gradients, after down_proj's saved tensors are freed)."""
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    weight = d.hidden * d.intermediate
    temporary = {"full": weight * c, "qlora": weight * c + -(-weight // 64) * FP32, "lora-8bit": weight * c}
    down_backward = T * d.intermediate * c + temporary.get(step.method, 0)
    down = _down(inv)
    down_lora = down in step.lora_leaves
    down_saved = (
        _lora_saved(inv, step, [down]) if down_lora else (T * d.intermediate * c if step.method == "full" else 0)
    )
    # torch: three intermediate-sized gradients; Liger's SwiGLU writes the gate's and up's over their saved outputs;
    # a plain MLP: the activation's input gradient beside its output's
    count = (1 if step.kernels else 3) if gated(inv) else 2
    return down_backward, count * T * d.intermediate * c - down_saved


# --- the tiled MLP (training.mlp_tiles, qlora.ops.tiled_mlp) ---------------------------------------------

MLP_LEAVES = frozenset({"gate_proj", "up_proj", "down_proj"})
TILED_MLP_INPUT = "MLP input (tiled MLP)"
ONE_MLP_TILE = "one MLP tile"


def tiled_mlp_saved(inv: Inventory, step: Step) -> dict[str, int]:
    """What a layer with a tiled MLP saves besides attention and norms: the MLP keeps its input only
    (its tiles run without grad in forward); the linear inputs, LoRA tensors and autocast's adapter
    copies left are the attention's."""
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    attention = replace(step, lora_leaves=step.lora_leaves - MLP_LEAVES)
    parts = {TILED_MLP_INPUT: T * d.hidden * c}
    if step.method == "full" or (step.method == "lora-8bit" and not step.checkpointing):
        parts["linear inputs"] = _linear_inputs(inv, step, skip=MLP_LEAVES)
    if step.method != "full":
        parts["lora"] = _lora_saved(inv, attention, attention.lora_leaves)
        if _adapters_cast(step):
            parts["adapter copies"] = _adapter_numel(inv, attention) * c
    return parts


def tiled_layer_backward(inv: Inventory, step: Step) -> tuple[str, int]:
    """The busiest point of a layer's backward with a tiled MLP, besides what the layer saved.

    Returns the busiest part's name and bytes. Either the backward of one MLP tile, with the incoming gradient and
    the MLP's input gradient being filled tile by tile (both tokens x hidden); or, once the MLP is small enough,
    attention's backward, when the post-attention norm and the MLP have freed what they saved (see
    `attention_backward`).
    """
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    candidates = {
        ONE_MLP_TILE: 2 * T * d.hidden * c + one_mlp_tile(inv, step) + tile_parameter_gradients(inv, step),
        "post-attention norm, MLP tiled": norm_backward(inv, step),
        "attention, MLP tiled": attention_backward(inv, step),
    }
    part = max(candidates, key=candidates.get)
    return part, candidates[part]


def norm_backward(inv: Inventory, step: Step) -> int:
    """In flight in the post-attention RMSNorm's backward, the MLP's input (saved by the tiled MLP)
    and the norm's rsqrt freed: the incoming gradient waiting for the norm's to be added, and four
    fp32 hidden-sized gradients (the normalized product's, the mean's expanded one, pow's temporaries)."""
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    if step.kernels:  # Liger's backward turns the output's gradient into the input's in place: only the incoming one
        return T * d.hidden * c - T * FP32
    return T * d.hidden * c + 4 * T * d.hidden * FP32 - T * d.hidden * c - T * FP32


def attention_backward(inv: Inventory, step: Step) -> int:
    """In flight in attention's backward (the MLP's and the post-attention norm's saved tensors, its
    fp32 input and rsqrt, already freed: hence the negative terms).

    - o_proj's base backward: the residual's gradient (hidden-sized; the incoming gradient is added
      into it in place) and three gradients of o_proj's input (LoRA's branch, the base's, their
      sum); LoRA's branch, backpropagated first, has freed what o_proj's adapter saved; measured
      exactly on a CPU;
    - the fused attention backward: the residual's and the attention output's gradients, dq, dk,
      dv (measured on a CPU's flash kernel); on a GPU also FlashAttention's fp32 dq accumulator,
      per-row softmax sums and, with grouped-query attention, dk and dv expanded to every query
      head (from the CUDA kernels' allocations, not measurable on a CPU).
    """
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    o_lora = step.method != "full" and "o_proj" in step.lora_leaves
    freed = (
        T * d.hidden * (c if step.kernels else FP32) + T * FP32 + T * d.hidden * c
    )  # post-attention norm's input and rsqrt, the MLP's input
    if o_lora:
        freed += _lora_saved(inv, step, ["o_proj"])
    o_proj = T * d.hidden * c + (3 if o_lora else 1) * T * q * c
    fused = 0
    if (
        step.attention != "eager"
    ):  # the output's gradient, dq, dk, dv; on a GPU also FlashAttention's fp32 dq and row sums
        fused = T * d.hidden * c + T * (2 * q + 2 * kv) * c
        if step.device == "cuda":
            fused += T * q * FP32 + step.batch * d.heads * step.seq * FP32
            if d.kv_heads != d.heads:  # FlashAttention-2's backward makes dk, dv for every query head, then sums them
                fused += 2 * T * q * c
    return max(o_proj, fused) - freed


def one_mlp_tile(inv: Inventory, step: Step) -> int:
    """One tile's forward-with-grad and backward, at `step.tile_tokens` tokens: what its forward
    saved (gate, up and their activation; LoRA's tensors; for full FT the weights' inputs) and the
    largest of
    - the end of its forward: down_proj's base output and LoRA branch output, and the gated product
      unless down_proj's lora_A saved it as it is;
    - down_proj's base backward, its output still held: LoRA's branch, created last in forward, is
      backpropagated first, so down_proj's LoRA tensors are freed by then and the branch's input
      gradient waits to be added to the base's, beside the dequantized weight;
    - the gated product's backward (three intermediate-sized gradients).
    The tile is a view of the MLP's input: what saves it as it is adds nothing.
    """
    d, c = inv.dims, step.compute_bytes
    tile = replace(step, batch=1, seq=step.tile_tokens, mlp_tiles=1)
    t, H, I = tile.tokens, d.hidden, d.intermediate
    mlp = replace(tile, lora_leaves=step.lora_leaves & MLP_LEAVES)
    up = replace(mlp, lora_leaves=mlp.lora_leaves - {"down_proj"})
    as_is = _saved_as_is(mlp)
    saved = _mlp_saved(step) * t * I * c
    down, product = _mlp_backward(inv, mlp)
    if step.method == "qlora":  # the absmax dequantized for the weight is freed before the matmul
        down -= -(-H * I // 64) * FP32
    if step.method == "full":
        saved += t * I * c  # down_proj's input, for its weight gradient (gate and up's is the tile)
        forward = t * H * c
    else:
        saved += _lora_saved(inv, up, up.lora_leaves) - (t * H * tile.lora_matmul_bytes if "mlp_norm" in as_is else 0)
        saved += _adapter_numel(inv, mlp) * c if _adapters_cast(step) else 0
        product_kept = (
            "mlp_act" in as_is or step.method == "lora-8bit"
        )  # saved by lora_A, or held by bnb's int8 down_proj
        saved += t * I * c if step.method == "lora-8bit" and "mlp_act" not in as_is else 0
        forward = 3 * t * H * c + (0 if product_kept else t * I * c)
        if "down_proj" in mlp.lora_leaves:
            down += t * I * c  # the LoRA branch's input gradient
            down += t * I * c if step.method == "lora-8bit" and "mlp_act" in as_is else 0  # lora_A's, held by bnb too
            product += _lora_saved(inv, mlp, ["down_proj"])  # _mlp_backward counted them freed
            forward += _lora_saved(inv, mlp, ["down_proj"])
    return saved + max(forward, t * H * c + max(down, product))


def tile_parameter_gradients(inv: Inventory, step: Step) -> int:
    """The tiled MLP's parameter gradients during a tile's backward (qlora.ops.tiled_mlp): the sums over the
    tiles so far (every trained MLP tensor) and the tile's own down_proj adapter gradients, found first."""
    if step.method == "full":
        linears = inv.layer_linears()
        return (
            2
            * sum(linears[leaf].in_features * linears[leaf].out_features for leaf in MLP_LEAVES & set(linears))
            * step.compute_bytes
        )
    mlp = replace(step, lora_leaves=step.lora_leaves & MLP_LEAVES)
    down = replace(step, lora_leaves=step.lora_leaves & {"down_proj"})
    return (_adapter_numel(inv, mlp) + _adapter_numel(inv, down)) * step.adapter_bytes


def _adapter_numel(inv: Inventory, step: Step) -> int:
    """Elements of one layer's adapters on `step.lora_leaves`."""
    linears = inv.layer_linears()
    return sum(step.rank * (linears[leaf].in_features + linears[leaf].out_features) for leaf in step.lora_leaves)


# --- offloaded checkpoints (training.offload_checkpoints, qlora.config.long_context) ------------------------

OFFLOADED = "offloaded to host RAM (checkpointed layer inputs)"


def offloaded(inv: Inventory, step: Step, layers: int) -> dict[str, int]:
    """Host RAM of an offloaded run: every checkpointed layer's kept input, in pinned memory. PyTorch's pinned
    (host) caching allocator rounds each block up to a power of two, and keeps it for the next step."""
    size = step.tokens * inv.dims.hidden * step.compute_bytes
    block = 1 << (size - 1).bit_length()
    parts = {OFFLOADED: layers * size, "pinned-memory rounding (power-of-two blocks)": layers * (block - size)}
    return {k: v for k, v in parts.items() if v}


def eval_activation_bytes(inv: Inventory, step: Step, train_batch: int) -> Activations:
    """Activations of the eval step (a no-grad forward at `step.batch`): what the whole forward keeps
    (the batch, the rotary tables) plus the larger of the loss and one layer's forward temporaries.
    `train_batch`: bytes of the last training micro-batch, which the trainer's loop holds through an
    eval between steps."""
    d, T, S, c = inv.dims, step.tokens, step.seq, step.compute_bytes
    kept = {"the last training micro-batch": train_batch, "eval batch: token ids and labels": batch_bytes(step)}
    parts = {}
    if step.chunked:
        parts["eval loss chunk (chunked loss)"] = chunked_loss_terms(inv, step, grads=False)
    elif step.classifier:
        parts["eval label scores"] = {"final hidden states": T * d.hidden * c, "label scores": _forward_end(inv, step)}
    else:
        parts["eval logits and loss"] = {
            "final hidden states": T * d.hidden * c,
            "logits (+ fp32 copy) and log-softmax": T * d.vocab * (c + (FP32 if c != FP32 else 0) + FP32),
            "shifted labels": step.batch * (2 * S + 1) * 8,
            "loss": 2 * FP32,
        }
    layer = {
        "positions and rotary tables": S * 8 + 2 * S * d.head_dim * c,
        "one layer's forward": _layer_forward(inv, step),
    }
    if step.attention == "eager":
        layer["causal mask"] = d.attention_kinds * step.batch * S * S * c
    parts["eval forward through one layer"] = layer
    if step.generate_tokens and not step.classifier:  # eval.metric exact_match: greedy generation at the eval batch
        parts["exact-match generation (KV cache)"] = generation_terms(inv, step)
    moments = {name: sum(terms.values()) for name, terms in parts.items()}
    return Activations(kept, moments, parts)


def generation_terms(inv: Inventory, step: Step) -> dict[str, int]:
    """`eval.metric: exact_match`'s greedy generation (transformers' `generate`, DynamicCache) at its end: every
    layer's keys and values for the prompt (at most `seq` tokens) and the new tokens, one layer's cache being
    extended (its old and new copy), the last position's fp32 logits, and the prompt's forward through one
    layer at its start (the larger of the two moments)."""
    d, c, b = inv.dims, step.compute_bytes, step.batch
    per_token = 2 * d.kv_heads * d.head_dim * c  # keys and values of one token in one layer
    tokens = step.seq + step.generate_tokens
    end = {
        "KV cache (every layer)": d.layers * b * tokens * per_token,
        "one layer's cache being extended": b * tokens * per_token,
        "last position's logits (fp32)": b * d.vocab * FP32,
    }
    prefill = {
        "KV cache (every layer, the prompt)": d.layers * b * step.seq * per_token,
        "the prompt's forward through one layer": _layer_forward(inv, step),
    }
    return end if sum(end.values()) >= sum(prefill.values()) else prefill


def _layer_forward(inv: Inventory, step: Step) -> int:
    """A layer's no-grad forward at its busiest point (eager attention's scores, else the MLP), from the decoder's
    code: the embeddings (kept by the decoder's loop), the layer input, the attention residual and the normed input
    (three in the first layer, where the input is the embeddings); then the larger of the up projection's
    output (the activated gate, the base output, with LoRA its scaled output and their sum) and a
    4/8-bit weight dequantized for its matmul beside the gate and the output."""
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    weight = d.hidden * d.intermediate
    temporary = {"qlora": weight * c + -(-weight // 64) * FP32, "lora-8bit": weight * c}.get(step.method, 0)
    # A tiled MLP (qlora.ops.tiled_mlp) runs its tiles under no_grad in eval too: one tile's intermediates
    # beside the output it fills tile by tile.
    t = step.tile_tokens if step.tiled else T
    up = (4 if "up_proj" in step.lora_leaves else 3) * t * d.intermediate * c
    mlp = (4 if d.layers > 1 else 3) * T * d.hidden * c + max(up, 2 * t * d.intermediate * c + temporary)
    if d.moe_layers:
        mlp = (4 if d.layers > 1 else 3) * T * d.hidden * c + moe.forward(moe_shape(inv, step))
    if step.tiled:
        mlp += T * d.hidden * c
    if step.attention != "eager":
        return mlp
    mlp += (
        step.batch * d.heads * step.seq**2 * c
    )  # eager attention's probabilities, returned by the layer's attention, outlive it
    # eager attention at its softmax: the embeddings, the layer input and the normed input; q, k, v (and k, v
    # repeated for grouped-query attention); the scaled, masked scores and their softmax (fp32, then cast back)
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    scores = step.batch * d.heads * step.seq**2 * (2 * c if c == FP32 else 2 * c + FP32)
    attention = 3 * T * d.hidden * c + T * (q + 2 * kv) * c + (2 * T * q * c if kv < q else 0) + scores
    return max(mlp, attention)
