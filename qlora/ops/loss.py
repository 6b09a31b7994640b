"""The causal-LM loss without vocabulary-sized logits (recipe key `training.loss: chunked | standard`).

transformers computes `lm_head(hidden)` for every position, upcasts it to fp32 and takes the cross
entropy: three `tokens × vocab` fp32 tensors at the start of backward (2.9 GiB for Llama-3.1's 128k
vocabulary at 2,048 tokens, more than a 4-bit 8B's layers). Here the loss is computed from the final
hidden states and the output embedding over chunks of the tokens whose label is not ignored: each
chunk's logits are made, upcast to fp32, turned into the loss and, right away, into the gradient
w.r.t. the hidden states (and the head, when it trains), then freed. Backward only scales the stored
gradients. This is Liger Kernel's fused linear cross-entropy idea; it is written here in plain torch
because Liger and Apple's Cut Cross-Entropy need CUDA and Triton, and the CPU (tests, `--measure`)
must run the same code the profiler models. On CUDA, Liger's kernel is used when it is installed
(`pip install qlora-kit[kernels]`).

Heads that transform the logits are reproduced inside each chunk (`qlora.config.architecture.head_transform`):
Granite's and Cohere's scaling, Gemma 2's final soft-capping (whose derivative, 1 - tanh², is one more fp32
chunk while the chunk's gradient is made), so no family falls back to vocabulary-sized logits.

The reduction is transformers' `ForCausalLMLoss`: labels shifted by one, `ignore_index` -100, the sum
divided by `num_items_in_batch` when the Trainer passes it (gradient accumulation), else the mean.
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from qlora.config.architecture import IGNORE_INDEX, PLAIN_HEAD, HeadTransform, head_transform
from qlora.config.long_context import chunk_tokens, fused_loss_is_smaller

LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")


def shifted_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, shift_labels: torch.Tensor | None = None):
    """(positions, targets): the flat positions whose next-token label is not ignored, and those labels."""
    if shift_labels is None:
        shift_labels = labels.new_full(labels.shape, ignore_index)
        shift_labels[..., :-1] = labels[..., 1:]
    flat = shift_labels.reshape(-1)
    positions = (flat != ignore_index).nonzero().squeeze(1)
    return positions, flat.index_select(0, positions)


def _chunk(h, weight, bias, targets, want_grads: bool, scale: float = 1.0, softcap: float | None = None):
    """Summed CE of one chunk, and the gradient w.r.t. its raw logits `h @ W.T + b` (unscaled by the denominator):
    fp32 probabilities minus one-hot, times the head transform's derivative (`scale`, then soft-capping to
    `softcap * tanh(logits / softcap)`, as Granite, Cohere and Gemma 2 do in their forward)."""
    logits = (torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()).float()
    slope = None  # soft-capping's derivative, 1 - tanh², kept for the gradient (one more fp32 chunk)
    if softcap:
        logits.mul_(scale / softcap).tanh_()
        slope = torch.mul(logits, logits).neg_().add_(1) if want_grads else None
        logits.mul_(softcap)
    elif scale != 1.0:
        logits.mul_(scale)
    target_logit = logits.gather(1, targets.unsqueeze(1))
    peak = logits.amax(1, keepdim=True)
    logits.sub_(peak).exp_()
    sums = logits.sum(1, keepdim=True)
    loss = (sums.log() + peak - target_logit).sum()
    del target_logit, peak
    if not want_grads:
        return loss, None
    logits.div_(sums)
    del sums
    logits.scatter_add_(1, targets.unsqueeze(1), logits.new_full((targets.numel(), 1), -1.0))
    if slope is not None:
        logits.mul_(slope)
        del slope
    if scale != 1.0:
        logits.mul_(scale)
    return loss, logits


def chunked_cross_entropy_forward(
    hidden,
    weight,
    bias,
    positions,
    targets,
    denominator,
    chunk: int,
    grad_hidden: bool = False,
    grad_weight: bool = False,
    grad_bias: bool = False,
    scale: float = 1.0,
    softcap: float | None = None,
):
    """Loss (sum / denominator) and the requested gradients, one chunk of logits at a time.

    The gradients are left unscaled (not divided by `denominator`): backward scales them by
    grad_output / denominator at once, so that under fp16 the gradient scaler's factor reaches them
    before they could underflow, as in transformers' own loss."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    g_hidden = torch.zeros_like(flat) if grad_hidden else None
    g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None
    g_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if grad_bias else None
    want = grad_hidden or grad_weight or grad_bias
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, positions.numel(), chunk):
        rows = positions[start : start + chunk]
        h = flat.index_select(0, rows)
        loss, probs = _chunk(h, weight, bias, targets[start : start + chunk], want, scale, softcap)
        total += loss
        del loss
        if g_hidden is not None:
            g_hidden.index_copy_(0, rows, probs.to(flat.dtype) @ weight.to(flat.dtype))
        if g_weight is not None:
            g_weight.addmm_(probs.t(), h.float())
        if g_bias is not None:
            g_bias += probs.sum(0)
        del h, probs
    grads = (
        g_hidden.view(hidden.shape) if g_hidden is not None else None,
        g_weight.to(weight.dtype) if g_weight is not None else None,
        g_bias.to(bias.dtype) if g_bias is not None else None,
    )
    return total / denominator, grads


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """CE(hidden @ W.T + b) with the gradients made in forward, chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, positions, targets, denominator, chunk, scale=1.0, softcap=None):
        need = ctx.needs_input_grad
        ctx.denominator = denominator
        loss, ctx.grads = chunked_cross_entropy_forward(
            hidden,
            weight,
            bias,
            positions,
            targets,
            denominator,
            chunk,
            grad_hidden=need[0],
            grad_weight=need[1],
            grad_bias=bias is not None and need[2],
            scale=scale,
            softcap=softcap,
        )
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError(
                "the chunked loss frees its gradients after one backward (retain_graph is not supported)"
            )
        grads, ctx.grads = ctx.grads, None
        factor = grad_output / ctx.denominator
        scaled = [g.mul_(factor.to(g.dtype)) if g is not None else None for g in grads]  # in place: no new tensor
        return (*scaled, None, None, None, None, None, None)


def chunked_causal_lm_loss(
    hidden,
    weight,
    bias,
    labels,
    num_items_in_batch=None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels=None,
    chunk: int | None = None,
    fused: bool = True,
    transform: HeadTransform = PLAIN_HEAD,
):
    """transformers' ForCausalLMLoss(transform(hidden @ W.T + b), labels), without the full logits (`fused`: Liger's
    kernel on CUDA where it is installed, holds less and applies `transform`)."""
    positions, targets = shifted_targets(
        labels.to(hidden.device), ignore_index, shift_labels.to(hidden.device) if shift_labels is not None else None
    )
    denominator = num_items_in_batch if num_items_in_batch is not None else positions.numel()
    if torch.is_tensor(denominator):
        denominator = denominator.to(hidden.device)
    if (
        fused
        and hidden.is_cuda
        and _liger() is not None
        and liger_applies(transform, bias)
        and fused_loss_is_smaller(
            positions.numel(), hidden[..., 0].numel(), weight.shape[0], weight.shape[1], hidden.element_size()
        )
    ):
        return _liger_loss(hidden, weight, bias, positions, targets, denominator, transform)
    chunk = chunk or chunk_tokens(weight.shape[0])
    if torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    ):
        return ChunkedLinearCrossEntropy.apply(
            hidden, weight, bias, positions, targets, denominator, chunk, transform.scale, transform.softcap
        )
    return chunked_cross_entropy_forward(
        hidden, weight, bias, positions, targets, denominator, chunk, scale=transform.scale, softcap=transform.softcap
    )[0]


def fused_kernel_installed() -> bool:
    """Whether Liger Kernel's fused linear cross-entropy is there for CUDA tensors
    (`pip install 'qlora-kit[kernels]'`)."""
    return _liger() is not None


@functools.cache
def _liger():
    """Liger's fused linear cross-entropy when installed (looked up once, not at every forward)."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss


def liger_applies(transform: HeadTransform, bias) -> bool:
    """Whether Liger's kernel reproduces the head's transform: soft-capping where its loss takes `softcap`; a scale
    by scaling the rows instead of the logits ((s h) W^T = s (h W^T)), which a bias would break."""
    if transform.softcap and "softcap" not in inspect.signature(_liger().__init__).parameters:
        return False
    return transform.scale == 1.0 or bias is None


def _liger_loss(hidden, weight, bias, positions, targets, denominator, transform: HeadTransform = PLAIN_HEAD):
    """Liger's Triton kernel on the kept tokens (summed, then divided as transformers does)."""
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
    if transform.scale != 1.0:
        rows.mul_(transform.scale)  # in place on index_select's output: its backward needs no saved tensor
    options = {"softcap": transform.softcap} if transform.softcap else {}
    loss = _liger()(ignore_index=IGNORE_INDEX, reduction="sum", **options)(weight, rows, targets, bias)
    return (loss[0] if isinstance(loss, tuple) else loss) / denominator


def install_chunked_loss(model, fused: bool = True) -> None:
    """Make `model` (the module its callers call: a peft model or a transformers causal LM) return the
    chunked loss and no logits whenever it is called with labels; without labels (generation) it runs as is.

    Done with module hooks, the API torch gives for this, not by replacing the instance's forward: every
    caller (Trainer, the DDP / DeepSpeed / FSDP wrappers, evaluation) calls the module, so the hooks run
    for all of them. The pre-hook takes the labels away and asks the causal LM for the logits of no position
    (`logits_to_keep` = an empty index); a hook on the decoder keeps its last hidden states; the forward
    hook computes the loss from them and the output head's weight. The hooks hold no reference to a model
    (each receives its module), so `del model` frees it. `fused`: Liger's kernel where it applies (see
    `chunked_causal_lm_loss`); False: the torch path everywhere.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    call = _ChunkedCall(fused, head_transform(causal_lm.config))
    model.register_forward_pre_hook(call.before, with_kwargs=True)
    model.register_forward_hook(call.after)
    causal_lm.base_model.register_forward_hook(call.keep_hidden)


class _ChunkedCall:
    """What one call with labels carries from the pre-hook to the forward hook (empty between calls)."""

    def __init__(self, fused: bool, transform: HeadTransform = PLAIN_HEAD):
        self.fused = fused
        self.transform = transform
        self.labels = self.hidden = None
        self.loss_kwargs: dict = {}

    def before(self, module, args, kwargs):
        if kwargs.get("labels") is None or args:
            return None
        self.labels = kwargs.pop("labels")
        self.loss_kwargs = {key: kwargs.pop(key) for key in LOSS_KWARGS if key in kwargs}
        kwargs.pop("return_dict", None)
        kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=self.labels.device)  # no logits at all
        return args, kwargs

    def keep_hidden(self, module, args, output):
        if self.labels is not None:
            self.hidden = output[0]

    def after(self, module, args, output):
        if self.labels is None:
            return None
        labels, hidden, loss_kwargs = self.labels, self.hidden, self.loss_kwargs
        self.labels = self.hidden = None
        self.loss_kwargs = {}
        causal_lm = module.get_base_model() if hasattr(module, "get_base_model") else module
        head = causal_lm.get_output_embeddings()
        loss = chunked_causal_lm_loss(
            hidden, head.weight, head.bias, labels, **loss_kwargs, fused=self.fused, transform=self.transform
        )
        return CausalLMOutputWithPast(
            loss=loss, logits=None, hidden_states=output.hidden_states, attentions=output.attentions
        )
