"""Mixture-of-experts weights in 4-bit NF4 under a trainable LoRA: quantized while loading, dequantized one
layer at a time in each step, LoRA applied to the routed tokens ("split LoRA").

transformers 5 stores a layer's experts as fused 3-D parameters (`gate_up_proj` (E, 2I, H), `down_proj`
(E, H, I); gpt-oss transposed, with biases), which bitsandbytes' `Linear4bit` replacement never touches.
bitsandbytes 0.50 quantizes such a parameter (`quantize_4bit`) and presents it dequantized through a torch
parametrization (`bitsandbytes.nn.parametrize`), but every read of the attribute dequantizes the whole stack
and autograd keeps that 16-bit copy for backward: every layer's experts would sit dequantized until the
step's backward. What no released library does yet is written here, small:

- `quantizing_experts`: a parameter-registration hook that quantizes each 3-D expert parameter the moment
  transformers' loader sets it (one tensor of 16-bit experts on the device at a time); `finish_quantized_experts`
  then registers bitsandbytes' own parametrization on it, so `experts.gate_up_proj` still reads as the
  16-bit tensor (for peft, merging and transformers' own experts code).
- `ExpertMatmul`: the frozen expert matmul that saves nothing but the packed codes and dequantizes the
  layer's stack again in backward: one layer's experts dequantized at a time, forward or backward.
- `experts_forward`: the experts implementation registered with transformers' `ExpertsInterface` as
  `qlora`: tokens sorted by expert, the base matmul above, and each expert's LoRA (A then B) applied to
  its own tokens, so no ΔW (E × out × in) is ever materialised (peft's ParamWrapper builds W + ΔW for the
  whole stack in every forward, and cannot apply dropout to the input; here dropout applies to the routed
  tokens before A, as in a linear LoRA).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

IMPLEMENTATION = "qlora"  # the name registered in transformers' ExpertsInterface
STACK_ORDER = ("gate_up_proj", "up_proj", "down_proj")  # as transformers' experts classes declare them


def is_experts_module(module: torch.nn.Module) -> bool:
    """A transformers 5 fused-experts module (decorated with `use_experts_implementation`)."""
    return hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "down_proj")


def expert_parameter_names(module: torch.nn.Module) -> list[str]:
    """The 3-D weight stacks of an experts module (its biases stay 16-bit: E × out values)."""
    return [name for name in STACK_ORDER if name in stacked_names(module)]


def stacked_names(module: torch.nn.Module) -> set[str]:
    names = {name for name, p in module.named_parameters(recurse=False) if p.ndim == 3}
    parametrizations = getattr(module, "parametrizations", {})
    return names | {name for name in parametrizations}


# ---------------------------------------------------------------- quantize while loading


@dataclass
class PendingQuant:
    """A parameter quantized during loading, its parametrization registered after loading."""

    quant_state: object


@contextmanager
def quantizing_experts(quant_type: str = "nf4", double_quant: bool = True, blocksize: int | None = None):
    """Within the block, every 3-D parameter set on an experts module (not on the meta device) is replaced
    by its packed 4-bit codes at once; call `finish_quantized_experts(model)` after loading."""
    import bitsandbytes.functional as bnbf

    def hook(module, name, param):
        if param is None or param.ndim != 3 or param.device.type == "meta" or not is_experts_module(module):
            return None
        if not param.dtype.is_floating_point:
            return None
        packed, state = bnbf.quantize_4bit(
            param.data, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        new = torch.nn.Parameter(packed, requires_grad=False)
        new._is_hf_initialized = True  # transformers must not re-initialise the codes as missing weights
        module.__dict__.setdefault("_qlora_pending", {})[name] = PendingQuant(state)
        return new

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def finish_quantized_experts(model: torch.nn.Module) -> int:
    """Register bitsandbytes' dequantizing parametrization on every parameter `quantizing_experts` packed;
    returns how many."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit_prequantized

    count = 0
    for module in model.modules():
        pending = module.__dict__.pop("_qlora_pending", None) or {}
        for name, item in sorted(pending.items(), key=lambda kv: STACK_ORDER.index(kv[0])):
            packed = module._parameters[name]
            replace_parameter_4bit_prequantized(
                module, name, item.quant_state.as_dict(packed=True), device=packed.device
            )
            count += 1
    return count


def quantized_state(module: torch.nn.Module, name: str):
    """(packed codes, QuantState) of a 4-bit expert stack, or None for a plain parameter."""
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization

    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is None or name not in parametrizations:
        return None
    chain = parametrizations[name]
    state = next((p.quant_state for p in chain if isinstance(p, Bnb4bitParametrization)), None)
    return None if state is None else (chain.original, state)


@contextmanager
def experts_as_placeholders(model: torch.nn.Module):
    """Within the block, each 4-bit expert stack is a plain parameter of its 16-bit shape and dtype that holds
    no memory (one value, expanded); the packed codes come back after.

    peft wraps the parameters of one module in an order that depends on the path it takes: a plain
    parameter in registration order (gate_up_proj inside down_proj), a parametrized one in sorted name order
    (the reverse). The saved adapter names the nesting (`experts.base_layer.lora_A`), so an adapter trained on
    4-bit experts would not load onto a 16-bit base in plain peft. Wrapping plain placeholders keeps one order.
    """
    from bitsandbytes.nn.parametrize import Bnb4bitParametrization
    from torch.nn.utils import parametrize

    saved = []
    for module in model.modules():
        # the order transformers' experts classes declare their stacks in (placeholders are registered in it)
        names = sorted(getattr(module, "parametrizations", {}) or {}, key=STACK_ORDER.index)
        for name in names:
            quantized = quantized_state(module, name)
            if quantized is None:
                continue
            packed, state = quantized
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
            empty = torch.zeros((), dtype=state.dtype, device=packed.device).expand(*state.shape)
            setattr(module, name, torch.nn.Parameter(empty, requires_grad=False))
            saved.append((module, name, packed, state))
    try:
        yield
    finally:
        for module, name, packed, state in saved:
            setattr(module, name, packed)
            parametrize.register_parametrization(module, name, Bnb4bitParametrization(state), unsafe=True)


def packed_expert_codes(model: torch.nn.Module):
    """The packed 4-bit codes of every expert stack (uint8, two values per byte)."""
    for module in model.modules():
        for name in getattr(module, "parametrizations", {}) or {}:
            quantized = quantized_state(module, name)
            if quantized is not None:
                yield quantized[0]


def quant_state_tensors(model: torch.nn.Module):
    """The tensors of every 4-bit expert stack's quantization state (absmax, code table, double-quant
    statistics), which live on the parametrization, not among the model's parameters or buffers."""
    for module in model.modules():
        for name in getattr(module, "parametrizations", {}) or {}:
            quantized = quantized_state(module, name)
            if quantized is None:
                continue
            state = quantized[1]
            nested = state.state2
            for tensor in (state.absmax, state.code, state.offset, *((nested.absmax, nested.code) if nested else ())):
                if tensor is not None:
                    yield tensor


def dequantize_experts(model: torch.nn.Module, dtype: torch.dtype | None = None, to: str | None = None) -> int:
    """Turn every 4-bit expert stack back into a plain parameter (in `dtype`, moved `to` a device one stack at a
    time): the merge works on 16-bit weights. Re-registered in declaration order, as peft's plain path expects
    (see `experts_as_placeholders`). Returns how many."""
    from torch.nn.utils import parametrize

    count = 0
    for module in model.modules():
        for name in sorted(getattr(module, "parametrizations", {}) or {}, key=STACK_ORDER.index):
            if quantized_state(module, name) is not None:
                dense = getattr(module, name).detach().to(device=to, dtype=dtype)
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)
                setattr(module, name, torch.nn.Parameter(dense, requires_grad=False))
                count += 1
    return count


# ---------------------------------------------------------------- the frozen matmul


def weight_reader(module: torch.nn.Module, name: str) -> Callable[[], torch.Tensor]:
    """A function returning the (E, ., .) stack in its compute dtype: dequantized afresh for a 4-bit stack,
    the parameter itself otherwise."""
    import bitsandbytes.functional as bnbf

    quantized = quantized_state(module, name)
    if quantized is None:
        param = getattr(module, name)
        return lambda: param
    packed, state = quantized
    return lambda: bnbf.dequantize_4bit(packed, state)


def grouped_matmul(x: torch.Tensor, weight: torch.Tensor, counts: list[int], transposed: bool) -> torch.Tensor:
    """Rows of `x` sorted by expert (`counts` each) times their expert's matrix: W_e (in, out) when
    `transposed`, else W_e^T for W_e (out, in)."""
    pieces = []
    for expert, rows in enumerate(x.split(counts)):
        if rows.shape[0]:
            w = weight[expert]
            pieces.append(rows @ (w if transposed else w.t()))
    out_dim = weight.shape[-1] if transposed else weight.shape[-2]
    return torch.cat(pieces) if pieces else x.new_zeros(0, out_dim)


class ExpertMatmul(torch.autograd.Function):
    """x @ W_e for the frozen (4-bit or 16-bit) expert stack; saves no weight: backward reads it again."""

    @staticmethod
    def forward(ctx, x, read_weight, counts, transposed):
        weight = read_weight()
        out = grouped_matmul(x, weight.to(x.dtype), counts, transposed)
        ctx.read_weight, ctx.counts, ctx.transposed = read_weight, counts, transposed
        return out

    @staticmethod
    def backward(ctx, grad):
        weight = ctx.read_weight()
        return grouped_matmul(grad, weight.to(grad.dtype), ctx.counts, not ctx.transposed), None, None, None


# ---------------------------------------------------------------- split LoRA


@dataclass
class ExpertLora:
    """One adapter on one expert stack, in peft's ParamWrapper layout: `a` (E·r, in), `b` (out, r·E)."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float


def split_lora(x: torch.Tensor, lora: ExpertLora, counts: list[int], dropout: float, training: bool) -> torch.Tensor:
    """scaling · B_e A_e x for each routed row x of expert e, A then B on the rows (never ΔW = B_e A_e).

    The per-expert factors are `unbind` views: their backward stacks all experts' gradients in one tensor
    (a `select` per expert would allocate a zero gradient the size of the whole factor for each expert)."""
    experts = len(counts)
    a = lora.a.view(experts, -1, lora.a.shape[-1]).unbind(0)  # E × (r, in)
    b = lora.b.view(lora.b.shape[0], -1, experts).permute(2, 0, 1).unbind(0)  # E × (out, r)
    if dropout and training:
        x = torch.nn.functional.dropout(x, dropout, training=True)
    if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls run (and save) 16-bit anyway
        x = x.to(lora.a.dtype)
    # scaled on A's rank-sized output: no second copy of the (rows, out) result
    pieces = [(rows @ a[e].t() * lora.scaling) @ b[e].t() for e, rows in enumerate(x.split(counts)) if rows.shape[0]]
    return torch.cat(pieces) if pieces else x.new_zeros(0, lora.b.shape[0])


def expert_linear(module, name: str, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """One expert projection for the sorted rows: the frozen stack plus every active LoRA on it."""
    out = ExpertMatmul.apply(x, weight_reader(module, name), counts, module.is_transposed)
    adapters = module.__dict__.get("expert_lora", {}).get(name)
    for lora in adapters() if adapters else []:
        out = out + split_lora(x, lora, counts, module.__dict__.get("expert_lora_dropout", 0.0), module.training)
    return out


def experts_forward(module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
    """transformers' experts call (hidden (T, H), top-k expert ids and weights (T, k)) -> (T, H)."""
    tokens, top_k = top_k_index.shape
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    counts = torch.bincount(expert_ids, minlength=module.num_experts).tolist()
    sorted_ids = expert_ids[order]
    first = "gate_up_proj" if module.has_gate else "up_proj"
    h = expert_linear(module, first, hidden_states[order // top_k], counts)  # the routed rows, dropped after use
    if module.has_bias:
        h = h + getattr(module, f"{first}_bias")[sorted_ids]
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = expert_linear(module, "down_proj", h, counts)
    del h
    if module.has_bias:
        y = y + module.down_proj_bias[sorted_ids]
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    # back to token order by a gather, whose backward needs only the indices (index_copy's keeps y itself)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return y[inverse].view(tokens, top_k, -1).sum(dim=1).to(hidden_states.dtype)


def register_experts_implementation() -> str:
    """Make `experts_implementation="qlora"` known to transformers (idempotent); returns the name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)
    return IMPLEMENTATION
