"""The profiler per GPU: one GPU's share of a training step under DDP, FSDP or ZeRO-3, and the host RAM
that CPU offload or loading needs.

How each engine divides memory (with N processes, one per GPU):

    ddp    every GPU holds the whole model, adapters, gradients and optimizer states, plus DDP's
           all-reduce buckets (a second copy of the gradients); only the data is split.
    fsdp   FSDP1 as FSDP-QLoRA runs it (`qlora.training.distributed.fsdp_config`): the parameters (the 4-bit codes
           stored in the compute dtype, the 16-bit norms, embeddings and head, the LoRA weights), their
           gradients and the optimizer states are split N ways. The 4-bit quantization state (absmax,
           double-quant state, code tables) is not a parameter: every GPU keeps all of it. Unsharded
           working copies: the root unit (embeddings, final norm, head; FSDP1 keeps it gathered through
           the step) and two decoder layers (the one computed and the one prefetched), plus the full
           gradient of one layer before its reduce-scatter. Loading goes through host RAM: each process
           quantizes the whole model on its CPU (transformers' rank-0-only loading skips quantized models).
    zero3  the same split; DeepSpeed gathers module by module (the largest of embeddings, head or a
           layer, and the prefetched next layer). The model is loaded onto each GPU whole before DeepSpeed
           partitions it (transformers' zero.Init skips quantized models): that moment is a peak of its own.
    offload cpu: the sharded parameters, gradients and optimizer states live in host RAM (the optimizer
           steps there); the GPU keeps the working copies, the quantization state and the activations.

Activations are per GPU and unchanged: each GPU runs its own micro-batch at the full sequence length.
Flat-parameter padding (< N elements per unit) is left out. Every number here is unmeasured until a
multi-GPU machine runs it; the single-GPU terms it divides are the ones `--measure` checks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from math import ceil

from qlora.config.errors import QLoraError
from qlora.config.precision import ADAPTER_DTYPE, trainable_dtype
from qlora.memory.overheads import MODEL_BUFFERS, overhead
from qlora.memory.settings import METHODS, compute_dtype

# Parts of `weight_bytes` that are the 4-bit quantization state, not parameters: every GPU keeps them whole.
REPLICATED = ("4-bit code table", "absmax (8-bit)", "absmax (fp32)", "double-quant state")


def check(method: str, strategy: str) -> None:
    """The one sharding rule that depends on the profiled method (the recipe checks the rest)."""
    if method == "lora-8bit" and strategy != "ddp":
        raise QLoraError(f"--strategy: {strategy} cannot shard bitsandbytes 8-bit weights; profile qlora or lora")


@dataclass(frozen=True)
class Layout:
    """Sizes the engines divide, from the inventory: one decoder layer unsharded, the root modules."""

    layers: int
    layer_weights: int  # one decoder layer's stored parameters (4-bit codes, norms, biases)
    layer_adapters: int  # its LoRA weights (fp32)
    layer_grads: int  # the gradient of one layer's trainable tensors, before reduce-scatter
    embeddings: int
    head: int


def layout(inv, method: str, settings, weights: dict[str, int]) -> Layout:
    bits = METHODS[method]
    linears = inv.layer_linears().values()
    stored = sum(
        ceil(lin.in_features * lin.out_features / 2)
        if bits == 4 and lin.quantized
        else lin.in_features * lin.out_features * lin.itemsize
        for lin in linears
    )
    stored += sum(lin.out_features * lin.itemsize for lin in linears if lin.bias)
    stored += sum(t.numel * t.itemsize for t in inv.params if t.name.startswith(inv.layer_prefix))
    targets = (
        []
        if method == "full"
        else [lin for lin in inv.lora_targets(settings.targets) if lin.name.startswith(inv.layer_prefix)]
    )
    adapters = sum(settings.rank * (lin.in_features + lin.out_features) for lin in targets) * ADAPTER_DTYPE.itemsize
    grads = (
        stored
        if method == "full"
        else adapters * trainable_dtype(method, compute_dtype(settings)).itemsize // ADAPTER_DTYPE.itemsize
    )
    embeddings = sum(t.numel * t.itemsize for t in inv.params if t.role == "embedding")
    head = sum(
        lin.in_features * lin.out_features * lin.itemsize
        for lin in inv.linears
        if lin.role in ("lm_head", "classifier")
    )
    return Layout(inv.dims.layers, stored, adapters, grads, embeddings, head)


def per_gpu(est, inv, settings):
    """`est` (the whole step on one GPU) as one of `settings.gpus` GPUs holds it under `settings.strategy`."""
    check(est.method, settings.strategy)
    if settings.gpus == 1:
        return est
    if settings.strategy == "ddp":
        return _ddp(est)
    return _sharded(est, inv, settings)


def _ddp(est):
    grads = est.bytes["gradients"]
    parts = {**est.bytes, "gradients": 2 * grads}
    details = {**est.details, "gradients": {"gradients": grads, "DDP all-reduce buckets": grads}}
    return _finish(est, parts, details, f"{est.peak_moment} (DDP: a whole replica on each GPU)", {})


def _sharded(est, inv, settings):
    n, offload, engine = settings.gpus, settings.offload, settings.strategy
    weights = est.details["weights"]
    replicated = sum(v for k, v in weights.items() if k in REPLICATED)
    sharded = sum(weights.values()) - replicated
    lay = layout(inv, est.method, settings, weights)
    layer = lay.layer_weights + lay.layer_adapters
    root = max(
        sharded - lay.layers * lay.layer_weights, 0
    )  # embeddings, final norm, head (and what is outside the layers)
    if engine == "fsdp":
        gather = {
            "root unit, gathered (embeddings, final norm, head)": root,
            "2 decoder layers, gathered (computed + prefetched)": 2 * layer,
        }
    else:
        gather = {
            "largest module, gathered (embeddings, head or a layer)": max(lay.embeddings, lay.head, layer),
            "next decoder layer, prefetched": layer,
        }
    on_gpu = 0 if offload == "cpu" else 1
    shard = lambda total: ceil(total / n) * on_gpu
    parts = {
        "weights": shard(sharded) + replicated + sum(gather.values()),
        "adapters": shard(est.bytes["adapters"]),
        "gradients": shard(est.bytes["gradients"]) + lay.layer_grads,
        "optimizer": shard(est.bytes["optimizer"]),
        "activations": est.bytes["activations"],
    }
    details = {
        **est.details,
        "weights": {
            f"sharded parameters (1/{n})" if on_gpu else "sharded parameters (in host RAM)": shard(sharded),
            "4-bit quantization state (every GPU)": replicated,
            **gather,
        },
        "gradients": {
            f"sharded gradients (1/{n})": shard(est.bytes["gradients"]),
            "one layer's gradient before reduce-scatter": lay.layer_grads,
        },
        "optimizer": {f"sharded optimizer states (1/{n})": shard(est.bytes["optimizer"])},
    }
    moment = f"{est.peak_moment} ({engine}, {n} GPUs{', CPU offload' if offload == 'cpu' else ''})"
    host = {}
    if offload == "cpu":  # all N shards, one host (a multi-node run divides this by the nodes)
        host = {
            "offloaded parameters": sharded,
            "offloaded LoRA weights": est.bytes["adapters"],
            "offloaded gradients": est.bytes["gradients"],
            "offloaded optimizer states": est.bytes["optimizer"],
        }
    if engine == "fsdp":
        loading = n * sum(weights.values())  # every process quantizes the whole model in host RAM
        if loading > sum(host.values()):
            host = {f"loading: the 4-bit model in each of {n} processes": loading}
    elif sum(weights.values()) > sum(parts.values()):  # ZeRO-3: the whole 4-bit model on each GPU before partitioning
        parts = {**{k: 0 for k in parts}, "weights": sum(weights.values())}
        details = {
            **est.details,
            "weights": {
                "loading: the whole 4-bit model on each GPU, before DeepSpeed partitions it": sum(weights.values())
            },
        }
        moment = f"loading (zero3, {n} GPUs: transformers loads a quantized model whole onto each GPU)"
    return _finish(est, parts, details, moment, host)


def _finish(est, parts, details, moment, host):
    buffers = est.details.get("overhead", {}).get(MODEL_BUFFERS, 0)
    extra = overhead(est.settings.device, sum(parts.values()), buffers)
    parts = {**parts, "overhead": sum(extra.values())}
    details = {**details, "overhead": extra}
    # host RAM of offloaded checkpoints (qlora.config.long_context) stays beside what sharding adds
    return dataclasses.replace(
        est, bytes=parts, details=details, peak_moment=moment, host_bytes={**est.host_bytes, **host}
    )
