"""More than one process: launcher detection, the device per process, and the recipe's `distributed`
section turned into what transformers' Trainer, accelerate and DeepSpeed need for QLoRA.

`torchrun` and `accelerate launch` both describe the run in the environment (RANK, LOCAL_RANK,
WORLD_SIZE); before the process group exists that is all there is to read (`launch_env`), so one recipe
runs in one process or in many unchanged. Once the group exists, accelerate's `PartialState` answers
who is who, and accelerate's operations (`broadcast_object_list`, `gather_object`, `reduce`) move
objects and decisions between the processes.
The strategy decides how memory is divided (see `qlora.memory.sharding` for the bytes):

    ddp    every process holds the whole model; the data and gradients are split and averaged
    zero3  DeepSpeed ZeRO-3: parameters, gradients and optimizer states split across processes
    fsdp   PyTorch FSDP (FSDP1-style, the documented FSDP-QLoRA path): the same split, GPUs only

What cannot work is refused before the model loads, in one line naming `distributed.*`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object, reduce

from qlora.config.environment import keep_deepspeed_off_stdout
from qlora.config.errors import QLoraError
from qlora.config.recipe import SHARDED_STRATEGIES, check_distributed

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Where this process sits in the run, as the launcher says (one process without one)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # started by torchrun / accelerate launch (even with one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_env(environ: dict[str, str] | None = None) -> Launch:
    """The launcher's view of this process: RANK, LOCAL_RANK, WORLD_SIZE (torchrun and accelerate set all three).

    Read by hand because it is needed before the process group exists (to decide whether to start it,
    and in `resolve`): accelerate's `PartialState` cannot answer without joining the group (its first
    instance initialises it), and torch.distributed knows nothing until then either.
    """
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return Launch()
    try:
        return Launch(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), True)
    except ValueError:
        raise QLoraError(
            f"the launcher's environment is not numeric: RANK={env.get('RANK')!r} "
            f"LOCAL_RANK={env.get('LOCAL_RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r}"
        ) from None


def joined() -> PartialState | None:
    """accelerate's state of this process once the process group exists (None before, and in one plain process).

    The first `PartialState` of a process takes its distributed type from its arguments, not from the
    group: without `cpu=True` a gloo group on a CPU reads as one process. Passing what the group is makes
    the answer right whoever asks first; later calls return that same state (Trainer's included).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = dist.get_backend()
    return PartialState(cpu=backend == "gloo", backend=backend)


def is_main_process() -> bool:
    """Whether this process is the one that writes (rank 0; the only one without a launcher)."""
    state = joined()
    return state.is_main_process if state is not None else launch_env().is_main


def any_process(flag: bool) -> bool:
    """`flag` OR-ed over all processes (just `flag` in one): a stop decided anywhere is made everywhere."""
    state = joined()
    if state is None:
        return flag
    return bool(reduce(torch.tensor([float(flag)], device=state.device), reduction="max").item())


@dataclass(frozen=True)
class Plan:
    """The resolved strategy of this run: what the recipe asked, checked against the machine."""

    launch: Launch
    strategy: str | None  # None: one process, nothing to divide
    offload: str = "none"
    cuda: bool = False
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def shards_weights(self) -> bool:
        """FSDP and ZeRO-3 split the (4-bit) weights: their storage dtype must be one the engines can flatten."""
        return self.strategy in SHARDED_STRATEGIES


def resolve(spec, quant_bits: int | None, launch: Launch | None = None, cuda: bool | None = None) -> Plan:
    """Check the recipe's `distributed` section against the launcher and the machine; build the Trainer kwargs."""
    launch = launch_env() if launch is None else launch
    cuda = torch.cuda.is_available() if cuda is None else cuda
    strategy = spec.strategy or ("ddp" if launch.distributed else None)
    if strategy == "fsdp" and not cuda:
        raise QLoraError(
            "distributed.strategy: 'fsdp' needs CUDA GPUs (on a CPU, accelerate silently falls back to DDP or "
            "fails at sync_module_states); use 'zero3' or 'ddp' here"
        )
    if strategy in SHARDED_STRATEGIES and not launch.launched:
        raise QLoraError(
            f"distributed.strategy: '{strategy}' divides the model across processes; start it with a launcher: "
            "torchrun --nproc_per_node N -m qlora.train RECIPE (or accelerate launch -m qlora.train RECIPE)"
        )
    check_distributed(
        dataclasses.replace(spec, strategy=strategy), quant_bits
    )  # the recipe's rules, for the launched strategy
    if strategy == "zero3":
        _require_deepspeed()
        keep_deepspeed_off_stdout()  # before the Trainer imports DeepSpeed
    if spec.gpus and launch.launched and launch.world_size != spec.gpus and launch.is_main:
        log.warning(
            f"warning: distributed.gpus: the recipe is sized for {spec.gpus} GPUs and {launch.world_size} processes "
            "were launched; the memory per GPU differs from its plan"
        )
    kwargs = trainer_kwargs(strategy, spec.offload, launch, cuda)
    return Plan(launch, strategy, spec.offload, cuda, kwargs)


def _require_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:
        raise QLoraError(
            "distributed.strategy: 'zero3' needs DeepSpeed, which is not installed: pip install 'qlora-kit[deepspeed]'"
        )


def trainer_kwargs(strategy: str | None, offload: str, launch: Launch, cuda: bool) -> dict[str, Any]:
    """`TrainingArguments` keywords for the strategy (empty for one plain process)."""
    kwargs: dict[str, Any] = {}
    if launch.launched and not cuda:
        # Without use_cpu, accelerate sees no distributed run on a CPU (one process each, world size 1,
        # DeepSpeed included) and every process trains alone.
        kwargs.update(use_cpu=True, ddp_backend="gloo")
    if strategy == "ddp":
        kwargs["ddp_find_unused_parameters"] = False  # the frozen base has no gradients: nothing to search for
    elif strategy == "zero3":
        kwargs["deepspeed"] = zero3_config(offload, cuda)
    elif strategy == "fsdp":
        kwargs.update(
            fsdp="full_shard auto_wrap" + (" offload" if offload == "cpu" else ""), fsdp_config=fsdp_config()
        )
    return kwargs


def zero3_config(offload: str, cuda: bool = True) -> dict[str, Any]:
    """A DeepSpeed ZeRO-3 config; 'auto' values are filled in by transformers from TrainingArguments."""
    zero: dict[str, Any] = {
        "stage": 3,
        # Overlapping reductions with compute needs CUDA streams; over gloo on a CPU there is nothing to overlap,
        # and its asynchronous reductions were seen to outlive the run's last collective (an abort at exit).
        "overlap_comm": cuda,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": True,  # the adapter is saved whole, not as shards
    }
    if offload == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,  # the recipe's bitsandbytes (paged) AdamW is the client optimizer
        "wall_clock_breakdown": False,
    }


def fsdp_config() -> dict[str, Any]:
    """The FSDP-QLoRA settings peft documents: FSDP1, one unit per decoder layer, flat params of the
    frozen 4-bit weights kept apart from the trained LoRA ones, weights loaded on rank 0 only."""
    return {
        "version": 1,
        # transformers wraps each model's _no_split_modules (the decoder layer)
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "cpu_ram_efficient_loading": True,
        "sync_module_states": True,  # needed with cpu_ram_efficient_loading: ranks > 0 receive rank 0's weights
        "use_orig_params": False,
        "backward_prefetch": "BACKWARD_PRE",
        "forward_prefetch": False,
        "state_dict_type": "SHARDED_STATE_DICT",
    }


def prepare_loading(plan: Plan) -> None:
    """What must be set before `from_pretrained`: FSDP's rank-0-only loading is read from the environment."""
    if plan.strategy == "fsdp":
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"


def start(plan: Plan) -> None:
    """Join the process group early, so that the output folder can be prepared by one process while
    the others wait (accelerate's state sets this process's GPU and starts the group; transformers'
    Trainer, accelerate and DeepSpeed reuse a group that exists)."""
    if not plan.launch.distributed or dist.is_initialized():
        return
    PartialState(cpu=not plan.cuda, backend="nccl" if plan.cuda else "gloo")


def finish() -> None:
    """Leave the process group once every process is done: left to interpreter exit, gloo's threads can
    be torn down mid-collective and abort a process ('terminate called without an active exception')."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on the main process only and hand its result, or whatever it raised, to every process.

    A failure on the main process alone would leave the others waiting at the next collective. So every
    process raises it: the main process its own exception, the others a copy (`relayed`); then all leave
    the group together, since no collective follows a failure.
    """
    state = joined()
    if state is None:
        return fn()
    box: list[Any] = [None]
    failure: BaseException | None = None
    if state.is_main_process:
        try:
            value = fn()
            pickle.dumps(value)  # a result that cannot be sent fails here, where the others still hear of it
            box[0] = ("ok", value)
        except BaseException as exc:  # SystemExit (SIGTERM) and KeyboardInterrupt too: the others must not wait
            failure, box[0] = exc, ("error", relayable(exc))
    broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "ok":
        return value
    finish()
    if failure is not None:
        raise failure
    raise relayed(value)


def relayable(exc: BaseException) -> tuple[str, Any]:
    """What another process needs to raise `exc` again: the exception itself when it survives pickling
    unchanged (OSError keeps its errno and file name, SystemExit its code), else its type when the type
    can be rebuilt from the message, else the type's name and the message."""
    message = str(exc)
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc) and str(copy) == message:
            return "exception", exc
    except Exception:
        pass
    try:
        kind = type(exc)
        if pickle.loads(pickle.dumps(kind)) is kind and isinstance(kind(message), kind):
            return "type", (kind, message)
    except Exception:
        pass
    return "named", (f"{type(exc).__module__}.{type(exc).__qualname__}", message)


def relayed(payload: tuple[str, Any]) -> BaseException:
    """The exception to raise on a process that was told about the main process's failure (see `relayable`)."""
    how, value = payload
    if how == "exception":
        return value
    if how == "type":
        kind, message = value
        try:
            return kind(message)
        except Exception:
            return RuntimeError(f"{kind.__module__}.{kind.__qualname__} on the main process: {message}")
    name, message = value
    return RuntimeError(f"{name} on the main process: {message}")


def gather(value: T) -> list[T]:
    """`value` from every process, in rank order (just `[value]` in one process)."""
    if joined() is None:
        return [value]
    return gather_object([value])


def local_parameter_bytes(model) -> int:
    """Bytes of parameters this process holds: its ZeRO-3 partition (`ds_tensor`), its FSDP flat shard,
    or the whole parameter when nothing is sharded."""
    total = 0
    for param in model.parameters():
        local = getattr(param, "ds_tensor", None)
        local = param if local is None else local
        total += local.numel() * local.element_size()
    return int(total)


def process_metrics(plan: Plan, peak: int, per_device_batch: int, grad_accum: int, model) -> dict[str, Any]:
    """Peak memory and parameter bytes per process and in total, and the global batch (per-device ×
    accumulation × processes). Tokens need no gathering: Trainer's `num_input_tokens_seen` counts every process's.
    """
    peaks = gather(int(peak))
    params = gather(local_parameter_bytes(model))
    world = len(peaks)  # one figure per process
    return {
        "strategy": plan.strategy or "single",
        "offload": plan.offload,
        "world_size": world,
        "global_batch_size": per_device_batch * grad_accum * world,
        "peak_memory_bytes_per_process": peaks,
        "peak_memory_bytes_total": sum(peaks),
        "parameter_bytes_per_process": params,
    }


def summary_line(metrics: dict[str, Any]) -> str:
    """The run summary's global batch and, for several processes, the strategy and each one's peak."""
    line = (
        f"global batch {metrics['global_batch_size']} "
        f"(per-device batch × grad_accum × {metrics['world_size']} process(es))"
    )
    if metrics["world_size"] > 1:
        peaks = ", ".join(f"{p / 2**30:.2f}" for p in metrics["peak_memory_bytes_per_process"])
        line += (
            f" | {metrics['strategy']} | peak memory per process {peaks} GiB, "
            f"total {metrics['peak_memory_bytes_total'] / 2**30:.2f} GiB"
        )
    return line
