"""Activation memory of one training step, counted tensor by tensor from the decoder's code.

The count follows what autograd saves in the Llama-family decoder layer of transformers (Llama,
Mistral, Qwen2: RMSNorm, rotary attention, gated MLP) wrapped by peft LoRA, and what the loss
allocates; other families are approximated by it. Autograd saves an input only when the gradient
of another input needs it, so a frozen base linear keeps nothing while a trained one keeps its
input. The activation peak of a step is

    kept (alive from forward until backward frees it: each layer's input under checkpointing,
          everything every layer saves without it)
      + the largest of the step's moments:
        end of forward       standard loss: logits, their fp32 copy and log-softmax (+ autocast's 16-bit adapter copies)
        start of backward    standard loss: the loss gradient (three vocabulary-sized fp32 tensors)
        loss chunk           chunked loss (qlora.loss): one chunk's fp32 logits, the final hidden states and
                             their gradient, made in forward (+ autocast's adapter copies)
        backward of a layer  the last layer's saved tensors (recomputed first under checkpointing)
                             + the gradients in flight at its busiest point

The eval step is its own phase (`eval_activation_bytes`): a no-grad forward, whose peak is the loss
(chunked or standard) or one layer's forward temporaries.

Sequences are assumed unpadded (no attention mask), as with packing or equal-length batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora.profile.inventory import Inventory

FP32 = 4
CUDA_MASK = 1  # CUDA's fused dropout keeps a bool mask; the CPU one keeps the scaled noise tensor
# Which tensor feeds each linear of a Llama-family layer: linears with one source share one input.
LINEAR_SOURCE = {
    "q_proj": "attn_norm", "k_proj": "attn_norm", "v_proj": "attn_norm", "o_proj": "attn_out",
    "gate_proj": "mlp_norm", "up_proj": "mlp_norm", "down_proj": "mlp_act",
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
    loss: str = "standard"  # 'chunked': qlora.loss (causal LM only)

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


def activation_bytes(inv: Inventory, step: Step) -> Activations:
    """Bytes of activations at the step's activation peak, split into named terms."""
    d, T, S, c = inv.dims, step.tokens, step.seq, step.compute_bytes
    layer = sum(layer_saved(inv, step).values())
    kept = {}
    if step.checkpointing:
        kept["layer inputs kept by checkpointing"] = d.layers * T * d.hidden * c
    else:
        first_norm_input = T * d.hidden * FP32 if c == FP32 else 0  # an fp32 layer input is what its first norm saves
        kept["everything the layers save"] = d.layers * (layer + first_norm_input) - _unsaved_in_first_layer(inv, step)
    if step.method == "lora-8bit" and step.checkpointing:
        # bitsandbytes' 8-bit matmul keeps its input as `ctx.A`, a plain attribute that checkpointing
        # cannot drop: the forward graph holds it until backward.
        kept["int8 layers' inputs (held by bitsandbytes)"] = d.layers * _linear_inputs(inv, step, count_attention_output=True)
    kept["token ids, labels, positions"] = batch_bytes(step) + S * 8
    kept["rotary tables"] = 2 * S * d.head_dim * c
    if step.attention == "eager":
        kept["causal mask"] = step.batch * S * S * c
    head = _head_saved(inv, step)
    recomputed = layer if step.checkpointing else 0
    parts = {}
    if step.chunked:
        chunk = {"final norm (saved)": head, **chunked_loss_terms(inv, step, grads=True)}
        if _adapters_cast(step) and step.checkpointing:
            chunk["autocast's adapter copies"] = step.adapter_numel * step.compute_bytes
        parts["loss chunk (chunked loss)"] = chunk
        moments = {"loss chunk (chunked loss)": sum(chunk.values())}
    else:
        moments = {
            "end of forward (logits, loss)": head + _forward_end(inv, step),
            "start of backward (loss gradient)": head + _loss_backward(inv, step),
        }
    moments["backward through one layer"] = recomputed + _layer_backward(inv, step)
    return Activations(kept, moments, parts)


def labelled_tokens(step: Step) -> int:
    """Tokens whose next-token label is kept: all but each sequence's last (packed or unpadded batches)."""
    return step.batch * (step.seq - 1)


def chunked_loss_terms(inv: Inventory, step: Step, grads: bool) -> dict[str, int]:
    """What `qlora.loss` holds at its busiest point, from its code: the final hidden states, the kept
    positions and their targets, the loss accumulator and one chunk. With `grads` (training) the chunk's
    busiest point is its hidden-state gradient matmul: fp32 probabilities (+ their 16-bit copy), the
    chunk's rows and their gradient; the hidden-state gradient (and for full FT the head's fp32 weight
    gradient) are made in forward. Without (eval) it is the logits and five per-token temporaries."""
    from qlora.loss import chunk_tokens

    d, T, c = inv.dims, step.tokens, step.compute_bytes
    labelled = labelled_tokens(step)
    n = min(labelled, chunk_tokens(d.vocab))
    terms = {"final hidden states": T * d.hidden * c, "label positions and targets": 2 * labelled * 8, "loss accumulator": FP32}
    if grads:
        terms["hidden-state gradient"] = T * d.hidden * c
        if step.method == "full":
            head = next((lin for lin in inv.linears if lin.role == "lm_head"), None)
            terms["head weight gradient (fp32)"] = d.vocab * d.hidden * FP32 + (d.vocab * FP32 if head and head.bias else 0)
        terms["loss chunk"] = n * d.vocab * (FP32 + (c if c != FP32 else 0)) + 2 * n * d.hidden * c
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
    norms = (T * d.hidden * FP32 if c != FP32 else 0) + T * d.hidden * FP32 + 2 * T * FP32
    if step.method == "full":
        norms += 2 * T * d.hidden * c  # the normalized input, for the norm weight's gradient
    if step.attention == "eager":  # q and repeated k, v; softmax output in fp32 and its 16-bit copy
        attention = T * 3 * q * c + B * d.heads * S * S * (FP32 + (c if c != FP32 else 0))
    else:  # sdpa (flash / memory-efficient) and flash_attention_2: q, k, v, output, logsumexp
        attention = T * (2 * q + 2 * kv) * c + B * d.heads * S * FP32
    parts = {"norms": norms, "attention": attention, "mlp": 3 * T * d.intermediate * c}
    if step.method == "full" or (step.method == "lora-8bit" and not step.checkpointing):
        parts["linear inputs"] = _linear_inputs(inv, step)
    if step.method != "full":
        parts["lora"] = _lora_saved(inv, step, step.lora_leaves)
        if _adapters_cast(step):  # autocast's 16-bit copies of the layer's adapter weights, saved by its matmuls
            parts["adapter copies"] = step.adapter_numel // d.layers * c
    return parts


def _adapters_cast(step: Step) -> bool:
    return step.autocast and step.adapter_bytes != step.compute_bytes


def _linear_inputs(inv: Inventory, step: Step, count_attention_output: bool = False) -> int:
    """The layer's distinct linear inputs (q, k, v share one). With sdpa, o_proj's input is the attention
    output (the kernels return it in (batch, seq, heads, dim) layout), which attention saves anyway."""
    sources = {LINEAR_SOURCE.get(leaf, leaf): lin.in_features for leaf, lin in inv.layer_linears().items()}
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
    unsaved = T * H * FP32 + T * FP32 + len(fed) * T * H * mask
    if step.method == "lora-8bit":
        unsaved += T * H * step.compute_bytes
    return unsaved


def _head_saved(inv: Inventory, step: Step) -> int:
    """Until the loss gradient reaches the layers: the final norm's fp32 input and rsqrt, and for full
    FT what the norm weight and the trained head need; a classifier's head trains under every method,
    so it keeps its input (and, under autocast, its 16-bit weight copy)."""
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    saved = T * d.hidden * FP32 + T * FP32
    if step.method == "full":  # the norm's normalized input; the standard loss's head also saves its input
        return saved + (1 if step.chunked else 2) * T * d.hidden * c
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
    - the gated product's backward: three intermediate-sized gradients, after down_proj's saved
      tensors are freed.
    """
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    H, I, weight = d.hidden, d.intermediate, d.hidden * d.intermediate
    down_lora = "down_proj" in step.lora_leaves
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
    temporary = {"full": weight * c, "qlora": weight * c + -(-weight // 64) * FP32, "lora-8bit": weight * c}
    down_backward = T * I * c + temporary.get(step.method, 0)
    down_saved = _lora_saved(inv, step, ["down_proj"]) if down_lora else (T * I * c if step.method == "full" else 0)
    product_backward = 3 * T * I * c - down_saved
    return T * H * c + max(recompute_end, down_backward, product_backward)


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
    layer = {"positions and rotary tables": S * 8 + 2 * S * d.head_dim * c, "one layer's forward": _layer_forward(inv, step)}
    if step.attention == "eager":
        layer["causal mask"] = step.batch * S * S * c
    parts["eval forward through one layer"] = layer
    moments = {name: sum(terms.values()) for name, terms in parts.items()}
    return Activations(kept, moments, parts)


def _layer_forward(inv: Inventory, step: Step) -> int:
    """A layer's no-grad forward at its busiest point (eager attention's scores, else the MLP), from the decoder's code: the embeddings
    (kept by the decoder's loop), the layer input, the attention residual and the normed input (three
    in the first layer, where the input is the embeddings); then the larger of the up projection's
    output (the activated gate, the base output, with LoRA its scaled output and their sum) and a
    4/8-bit weight dequantized for its matmul beside the gate and the output."""
    d, T, c = inv.dims, step.tokens, step.compute_bytes
    weight = d.hidden * d.intermediate
    temporary = {"qlora": weight * c + -(-weight // 64) * FP32, "lora-8bit": weight * c}.get(step.method, 0)
    up = (4 if "up_proj" in step.lora_leaves else 3) * T * d.intermediate * c
    mlp = (4 if d.layers > 1 else 3) * T * d.hidden * c + max(up, 2 * T * d.intermediate * c + temporary)
    if step.attention != "eager":
        return mlp
    mlp += step.batch * d.heads * step.seq**2 * c  # eager attention's probabilities, returned by the layer's attention, outlive it
    # eager attention at its softmax: the embeddings, the layer input and the normed input; q, k, v (and k, v
    # repeated for grouped-query attention); the scaled, masked scores and their softmax (fp32, then cast back)
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    scores = step.batch * d.heads * step.seq**2 * (2 * c if c == FP32 else 2 * c + FP32)
    attention = 3 * T * d.hidden * c + T * (q + 2 * kv) * c + (2 * T * q * c if kv < q else 0) + scores
    return max(mlp, attention)
