"""Recipes: the one typed schema for YAML files and `--set key=value` overrides.

Every key is a dataclass field, so a misspelt key is an error that names the closest valid key
(never a silent fallback to a default), a value of the wrong type is an error that names the key
and the expected type, and out-of-range values are caught before any model is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlora.config.attention import ATTN_IMPLEMENTATIONS
from qlora.config.errors import QLoraError, did_you_mean
from qlora.config.gpus import parse_gpu_memory
from qlora.config.io import atomic_write_text
from qlora.config.long_context import check_keys as check_long_context_keys

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit")
SCHEDULERS = ("constant", "cosine", "linear")
LOSSES = ("chunked", "standard")
KERNELS = ("auto", "none")
TARGET_PRESETS = ("all-linear", "attention", "qv", "mlp")
TASKS = ("causal_lm", "classification")
DATA_FORMATS = ("alpaca", "chat", "text", "classification")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANT_TYPES = ("nf4", "fp4")
METRICS = ("none", "exact_match", "accuracy", "map@3")  # map@3: ranked multiple choice (classification)
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "zero3")  # qlora.training.distributed turns them into Trainer settings
SHARDED_STRATEGIES = ("fsdp", "zero3")  # the strategies that split the weights across processes
DISTRIBUTED_OFFLOADS = ("none", "cpu")


def key(default: Any = dataclasses.MISSING, *, help: str, choices: Sequence[Any] | None = None, **kwargs: Any) -> Any:
    """One recipe key: its default, one line of help and, where it has them, its allowed values.

    The one source for validation, the README's reference table and the JSON Schema (as peft's `LoraConfig`
    keeps each field's help in its metadata). A mutable default goes in `default_factory=`.
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None}
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelSpec:
    """The base model: a local folder or a Hub name."""

    name_or_path: str = ""
    revision: str | None = None
    trust_remote_code: bool = False  # off unless the recipe asks: remote code runs on your machine
    attn_implementation: str = key(
        "auto",
        help="attention kernel; auto: the first of sdpa, flex_attention (GPU), eager the family supports",
        choices=ATTN_IMPLEMENTATIONS,
    )


@dataclass
class QuantizationSpec:
    """How the frozen base is stored: 4-bit (QLoRA), 8-bit, or none (16-bit LoRA)."""

    bits: int | None = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: bf16 on GPUs that have it, fp16 on older GPUs (T4), fp32 on CPU


@dataclass
class LoraSpec:
    """LoRA adapters; `targets` is a preset (all-linear, attention, qv, mlp) or module names."""

    r: int = 64
    alpha: int = 16
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"


@dataclass
class DataSpec:
    """Where the examples come from and how they become token sequences."""

    path: str = ""
    format: str = "alpaca"
    max_seq_len: int = 512
    eval_size: int | float = 0.1  # < 1: fraction held out; >= 1: number of examples held out
    eval_path: str | None = None  # a separate eval file instead of a held-out split
    split: str = "train"  # for Hub datasets
    columns: dict[str, str] = field(default_factory=dict)  # role -> column, e.g. {output: response}
    packing: bool = False
    group_by_length: bool = False
    max_examples: int | None = None


@dataclass
class TrainingSpec:
    """Optimisation; defaults are the QLoRA paper's (paged AdamW 32-bit, max grad norm 0.3)."""

    optimizer: str = "paged_adamw_32bit"
    learning_rate: float = 2e-4
    lr_scheduler: str = "constant"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    num_epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides num_epochs
    batch_size: int = 1
    grad_accum: int = 16
    max_grad_norm: float = 0.3
    gradient_checkpointing: bool | int | str = (
        True  # true | false | N (the first N decoder layers) | auto (the fewest that fit)
    )
    mlp_tiles: int | str = (
        "auto"  # qlora.config.long_context: sequence-tiled MLP (auto: ceil(tokens / max(hidden, 4096)) tiles)
    )
    offload_checkpoints: bool | str = (
        False  # qlora.config.long_context: checkpointed layer inputs in host RAM (true | auto)
    )
    eval_steps: int | None = None  # None: evaluate only before and after training
    save_steps: int = 100
    save_total_limit: int | None = 3
    max_nonfinite_steps: int = 0  # non-finite (NaN/inf) steps skipped before training stops (exit 5)
    logging_steps: int = 10
    seed: int = 42
    loss: str = "chunked"  # causal LMs: 'chunked' never holds batch x seq x vocab logits (qlora.ops.loss); 'standard'
    eval_batch_size: int | None = None  # None: the training batch_size
    kernels: str = (
        "auto"  # auto: Liger Kernel's RMSNorm, SwiGLU and RoPE on CUDA where installed (qlora.ops.kernels); none
    )
    compile: bool = False  # torch.compile of each decoder layer (one compiled graph, reused by every layer)


@dataclass
class EvalSpec:
    """The task metric measured on the held-out split before and after training."""

    metric: str = "none"
    max_examples: int = 64
    max_new_tokens: int = 32


@dataclass
class DistributedSpec:
    """More than one process (torchrun / accelerate launch): how the model is divided across them.

    strategy None: 'ddp' when launched with more than one process, else one plain process.
    """

    strategy: str | None = None
    offload: str = "none"  # 'cpu': sharded parameters and optimizer states in host RAM (fsdp, zero3)
    gpus: int | None = None  # like target_gpu: how many GPUs the recipe is sized for (the profiler plans one's share)


@dataclass
class Recipe:
    """A whole training run. `source` (the YAML file it came from) is not a key."""

    model: ModelSpec = field(default_factory=ModelSpec)
    quantization: QuantizationSpec = field(default_factory=QuantizationSpec)
    lora: LoraSpec = field(default_factory=LoraSpec)
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    task: str = "causal_lm"
    output_dir: str = ""
    target_gpu: str | int | None = (
        None  # a preset (t4, 4090: YAML reads those as ints) or a size; see qlora.config.gpus
    )
    source: Path | None = field(default=None, repr=False, compare=False, metadata={"key": False})

    @property
    def method(self) -> str:
        """The profiler's name for what this recipe trains: qlora, lora-8bit or lora."""
        return {4: "qlora", 8: "lora-8bit", None: "lora"}[self.quantization.bits]

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what `recipe.yaml` in the output folder holds)."""
        return {f.name: _plain(getattr(self, f.name)) for f in _keys(Recipe)}

    def save(self, path: str | Path) -> None:
        """Write the resolved recipe as YAML (atomically: a reader never sees half a file)."""
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in _keys(type(value))}
    return value


def _keys(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("key", True)]


def all_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key a recipe accepts, e.g. 'lora.r', 'training.max_steps'."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in _keys(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys.extend(all_keys(tp, f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


# --- building a recipe from YAML data -------------------------------------------------------------


def from_dict(data: Any, cls: type = Recipe, prefix: str = "") -> Any:
    """Build the dataclass `cls` from nested dicts, checking every key and type."""
    where = prefix.rstrip(".") or "recipe"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QLoraError(f"{where}: expected a mapping of keys, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in _keys(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise QLoraError(f"unknown recipe key '{dotted}'{did_you_mean(dotted, all_keys())}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(value, tp, f"{dotted}.")
        else:
            kwargs[key] = coerce(dotted, value, tp)
    return cls(**kwargs)


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; convert only where lossless (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(key, value, option)
            except QLoraError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else _type_error(key, value, tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise _type_error(key, value, tp)
        return [coerce(key, v, item_tp) for v in value]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise _type_error(key, value, tp)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value):  # YAML 1.1 reads '2e-4' as a string
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise _type_error(key, value, tp)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping of strings"
    return _TYPE_NAMES.get(tp, str(tp))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_error(key: str, value: Any, tp: Any) -> QLoraError:
    return QLoraError(f"{key}: expected {_type_name(tp)}, got {_describe(value)}")


# --- overrides ------------------------------------------------------------------------------------


def split_assignment(item: str, flag: str, form: str, valid: set[str]) -> tuple[str, str]:
    """`'lora.r=8'` -> `('lora.r', '8')` for a command-line `flag`, checking the key is a recipe key."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise QLoraError(f"{flag} expects {form}, got '{item}'")
    if key not in valid:
        raise QLoraError(f"unknown recipe key '{key}' in {flag}{did_you_mean(key, valid)}")
    return key, raw


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Apply `dotted.key=value` strings to raw recipe data; values are parsed as YAML scalars."""
    valid = set(all_keys())
    for item in overrides:
        key, raw = split_assignment(item, "--set", "key=value", valid)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                raise QLoraError(f"{key}: '{part}' in the recipe is not a section of keys")
            node = node[part]
        node[leaf] = value
    return data


# --- validation -----------------------------------------------------------------------------------


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise QLoraError(message)


def _check_choice(key: str, value: str, choices: Sequence[str]) -> None:
    _check(value in choices, f"{key}: unknown value '{value}'{did_you_mean(value, choices)}")


def check_distributed(spec: DistributedSpec, quant_bits: int | None) -> None:
    """The `distributed` section's rules, checked when a recipe loads and again by training against the launch."""
    if spec.strategy is not None:
        _check_choice("distributed.strategy", spec.strategy, DISTRIBUTED_STRATEGIES)
    _check_choice("distributed.offload", spec.offload, DISTRIBUTED_OFFLOADS)
    _check(spec.gpus is None or spec.gpus >= 1, f"distributed.gpus: must be >= 1, got {spec.gpus}")
    _check(
        spec.offload != "cpu" or spec.strategy in SHARDED_STRATEGIES,
        "distributed.offload: 'cpu' moves sharded parameters and optimizer states to host RAM; "
        "it needs distributed.strategy fsdp or zero3",
    )
    _check(
        not (spec.strategy in SHARDED_STRATEGIES and quant_bits == 8),
        f"distributed.strategy: '{spec.strategy}' cannot shard bitsandbytes 8-bit weights; use quantization.bits 4 (QLoRA) or none",
    )


def validate(recipe: Recipe, for_training: bool = True) -> Recipe:
    """Range and choice checks that types alone cannot express. `for_training=False` (a recipe the profiler
    builds from `qlora profile` flags): no data or output folder is needed."""
    m, q, lo, d, t, e = recipe.model, recipe.quantization, recipe.lora, recipe.data, recipe.training, recipe.eval
    _check(bool(m.name_or_path), "model.name_or_path: required (a local model folder or a Hub name)")
    _check(
        bool(d.path) or not for_training,
        "data.path: required (a JSON/JSONL/CSV/Parquet file, a folder, or a Hub dataset)",
    )
    _check(
        bool(recipe.output_dir) or not for_training, "output_dir: required (where the adapter and metrics are written)"
    )
    _check(q.bits in (4, 8, None), f"quantization.bits: must be 4, 8 or none, got {q.bits}")
    for key, value in (
        ("model.name_or_path", m.name_or_path),
        ("data.path", d.path),
        ("data.eval_path", d.eval_path),
        ("output_dir", recipe.output_dir),
    ):
        _check_path(key, value)
    _check_choice("quantization.quant_type", q.quant_type, QUANT_TYPES)
    _check_choice("quantization.compute_dtype", q.compute_dtype, COMPUTE_DTYPES)
    _check_choice("model.attn_implementation", m.attn_implementation, ATTN_IMPLEMENTATIONS)
    _check(lo.r > 0, f"lora.r: must be > 0, got {lo.r}")
    _check(lo.alpha > 0, f"lora.alpha: must be > 0, got {lo.alpha}")
    _check(0 <= lo.dropout < 1, f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    if isinstance(lo.targets, str):
        _check_choice("lora.targets", lo.targets, TARGET_PRESETS)
    else:
        _check(bool(lo.targets) and all(lo.targets), "lora.targets: the list of module names is empty")
    _check_choice("data.format", d.format, DATA_FORMATS)
    _check(d.max_seq_len > 0, f"data.max_seq_len: must be > 0, got {d.max_seq_len}")
    _check(d.eval_size >= 0, f"data.eval_size: must be >= 0, got {d.eval_size}")
    _check(d.max_examples is None or d.max_examples > 0, f"data.max_examples: must be > 0, got {d.max_examples}")
    _check_choice("training.optimizer", t.optimizer, OPTIMIZERS)
    _check_choice("training.lr_scheduler", t.lr_scheduler, SCHEDULERS)
    _check(t.learning_rate > 0, f"training.learning_rate: must be > 0, got {t.learning_rate}")
    _check(0 <= t.warmup_ratio <= 1, f"training.warmup_ratio: must be in [0, 1], got {t.warmup_ratio}")
    _check(t.batch_size >= 1, f"training.batch_size: must be >= 1, got {t.batch_size}")
    _check(t.grad_accum >= 1, f"training.grad_accum: must be >= 1, got {t.grad_accum}")
    _check(t.max_grad_norm >= 0, f"training.max_grad_norm: must be >= 0, got {t.max_grad_norm}")
    _check(
        t.max_steps == -1 or t.max_steps > 0, f"training.max_steps: must be > 0 (or -1 for epochs), got {t.max_steps}"
    )
    _check(t.num_epochs > 0, f"training.num_epochs: must be > 0, got {t.num_epochs}")
    _check(t.save_steps > 0, f"training.save_steps: must be > 0, got {t.save_steps}")
    _check(t.max_nonfinite_steps >= 0, f"training.max_nonfinite_steps: must be >= 0, got {t.max_nonfinite_steps}")
    _check(
        not (t.max_nonfinite_steps and recipe.distributed.strategy == "zero3"),
        "training.max_nonfinite_steps: DeepSpeed ZeRO-3 applies each optimizer step inside backward, before a "
        "non-finite step could be skipped; use 0 (stop at the first, keeping the last good checkpoint)",
    )
    _check(t.logging_steps > 0, f"training.logging_steps: must be > 0, got {t.logging_steps}")
    _check(t.eval_steps is None or t.eval_steps > 0, f"training.eval_steps: must be > 0, got {t.eval_steps}")
    check_long_context_keys(t.mlp_tiles, t.offload_checkpoints, t.gradient_checkpointing, recipe.distributed.strategy)
    _check_choice("training.loss", t.loss, LOSSES)
    _check_choice("training.kernels", t.kernels, KERNELS)
    _check(
        t.eval_batch_size is None or t.eval_batch_size >= 1,
        f"training.eval_batch_size: must be >= 1, got {t.eval_batch_size}",
    )
    _check_choice("eval.metric", e.metric, METRICS)
    _check(e.max_examples > 0, f"eval.max_examples: must be > 0, got {e.max_examples}")
    _check(e.max_new_tokens > 0, f"eval.max_new_tokens: must be > 0, got {e.max_new_tokens}")
    _check_choice("task", recipe.task, TASKS)
    check_distributed(recipe.distributed, q.bits)
    if recipe.task == "classification":
        _check(
            d.format == "classification",
            f"data.format: task 'classification' needs format 'classification', got '{d.format}'",
        )
    if recipe.target_gpu is not None:
        parse_gpu_memory(recipe.target_gpu, "target_gpu")
    return recipe


# --- loading --------------------------------------------------------------------------------------


def _resolve_input_paths(recipe: Recipe, base: Path) -> None:
    """Relative input paths in a recipe file are relative to that file, when they exist there.

    A relative string that does not exist next to the recipe is left alone: it may be a Hub name
    ('meta-llama/Llama-2-7b-hf') or a path relative to the working directory.
    """
    for spec, attr in ((recipe.model, "name_or_path"), (recipe.data, "path"), (recipe.data, "eval_path")):
        value = getattr(spec, attr)
        if value and not Path(value).is_absolute() and _exists(base / value):
            setattr(spec, attr, str((base / value).resolve()))


def _exists(path: Path) -> bool:
    """`Path.exists`, False for names no file system accepts (a NUL byte, a name over 255 bytes)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def _check_path(key: str, value: str | None) -> None:
    """A path or Hub name must be one the file system can look up (validate() reports it, not a traceback)."""
    if not value:
        return
    _check("\x00" not in value, f"{key}: contains a NUL character")
    _check(
        all(len(part.encode("utf-8", "surrogatepass")) <= 255 for part in Path(value).parts),
        f"{key}: a name in '{value[:60]}...' is longer than 255 bytes",
    )


def _normalise_bits(data: dict) -> None:
    """`quantization.bits: none` (a string in YAML) means no quantization."""
    quant = data.get("quantization")
    if (
        (
            isinstance(quant, dict)
            and isinstance(quant.get("bits"), str)
            and quant["bits"].lower() in ("none", "null", "16")
        )
        or isinstance(quant, dict)
        and quant.get("bits") == 16
    ):
        quant["bits"] = None


def read_recipe_file(path: str | Path) -> dict:
    """The raw YAML mapping of a recipe file, with a clear error for every way reading can fail."""
    path = Path(path)
    if not path.exists():
        raise QLoraError(f"recipe file not found: {path}")
    if path.is_dir():
        raise QLoraError(f"recipe path is a folder, expected a YAML file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise QLoraError(f"malformed YAML in {path}{where}: {problem}") from None
    except UnicodeDecodeError:
        raise QLoraError(f"recipe file is not UTF-8 text: {path}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise QLoraError(f"recipe {path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, override, type-check and validate a recipe file."""
    path = Path(path)
    data = read_recipe_file(path)
    data = apply_overrides(data, overrides)
    _normalise_bits(data)
    recipe = from_dict(data)
    recipe.source = path.resolve()
    _resolve_input_paths(recipe, path.resolve().parent)
    return validate(recipe)


def recipe_from_mapping(data: dict, overrides: Sequence[str] = (), for_training: bool = True) -> Recipe:
    """Build a recipe from in-memory data (tests, sweeps, `qlora profile` flags), with the same checks as a file."""
    data = apply_overrides(copy.deepcopy(data), overrides)
    _normalise_bits(data)
    return validate(from_dict(data), for_training)
