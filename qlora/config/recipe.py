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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qlora.config.attention import ATTN_IMPLEMENTATIONS
from qlora.config.errors import QLoraError, did_you_mean
from qlora.config.gpus import parse_gpu_memory
from qlora.config.io import atomic_write_text
from qlora.config.long_context import check_keys as check_long_context_keys
from qlora.config.tracking import INTEGRATIONS, report_targets

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch", "adamw_8bit")
SCHEDULERS = ("constant", "cosine", "linear")
LOSSES = ("chunked", "standard")
KERNELS = ("auto", "none")
TARGET_PRESETS = ("all-linear", "attention", "qv", "mlp")
TASKS = ("causal_lm", "classification")
DATA_FORMATS = ("alpaca", "chat", "text", "classification", "preference")
# What training optimises: "sft" (transformers.Trainer, the next-token loss) or a preference objective
# trained by TRL's trainer of that name (qlora.training.preference). TRL 1.16 ships DPOTrainer and
# KTOTrainer as stable trainers; ORPO and CPO/SimPO live in trl.experimental, so they are not offered.
OBJECTIVES = ("sft", "dpo")
PREFERENCE_OBJECTIVES = ("dpo",)
# trl.DPOConfig.loss_type's values (TRL 1.16's DPOConfig help lists them).
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
)
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
QUANT_TYPES = ("nf4", "fp4")
QUANT_BITS = (4, 8, None)
METRICS = ("none", "exact_match", "accuracy", "map@3")  # map@3: ranked multiple choice (classification)
# The eval.metric values each task accepts. Classification reports accuracy and weighted F1 whatever the
# value (one forward pass); 'map@3' adds MAP@3 for ranked multiple choice (Kaggle science-exam style).
TASK_METRICS = {"causal_lm": ("none", "exact_match"), "classification": ("none", "accuracy", "map@3")}
DISTRIBUTED_STRATEGIES = ("ddp", "fsdp", "zero3")  # qlora.training.distributed turns them into Trainer settings
SHARDED_STRATEGIES = ("fsdp", "zero3")  # the strategies that split the weights across processes
DISTRIBUTED_OFFLOADS = ("none", "cpu")


def key(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Sequence[Any] | None = None,
    flag: str | None = None,
    **kwargs: Any,
) -> Any:
    """One recipe key: its default, one line of help and, where it has them, its allowed values.

    The one source for validation, the README's reference table, the JSON Schema and `qlora profile`'s
    flags (as peft's `LoraConfig` keeps each field's help in its metadata). A mutable default goes in
    `default_factory=`. `choices` constrain values of their own type (a list of module names is not checked
    against the presets). `flag`: the `qlora profile` option that sets this key.
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag}
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class ModelSpec:
    """The base model: a local folder or a Hub name."""

    name_or_path: str = key("", help="local model folder or Hub id")
    revision: str | None = key(None, help="Hub revision (branch, tag or commit)")
    trust_remote_code: bool = key(False, help="run the model repo's own Python code; off unless you ask")
    attn_implementation: str = key(
        "auto",
        help="attention kernel; auto: the first of sdpa, flex_attention (GPU), eager the family supports",
        choices=ATTN_IMPLEMENTATIONS,
        flag="--attn",
    )
    adapter: str | None = key(
        None,
        help="continue a trained adapter: its folder (adapter_config.json) or a run folder holding adapter/; "
        "lora.* then come from it; a preference objective's reference is base + this adapter, frozen",
    )
    adapter_optional: bool = key(
        False,
        help="true: a model.adapter that does not exist yet trains a new adapter from the base, with a note "
        "(the DPO demo, before the SFT demo has run)",
    )


@dataclass
class QuantizationSpec:
    """How the frozen base is stored: 4-bit (QLoRA), 8-bit, or none (16-bit LoRA)."""

    bits: int | None = key(
        4, help="`4` (QLoRA), `8` (LoRA on an 8-bit base) or `none` (16-bit LoRA)", choices=QUANT_BITS
    )
    quant_type: str = key("nf4", help="the 4-bit data type", choices=QUANT_TYPES)
    double_quant: bool = key(True, help="quantize the 4-bit block scales too (saves ~0.37 bit per weight)")
    compute_dtype: str = key(
        "auto",
        help="dtype of the matmuls; `auto`: bf16 on GPUs that have it, fp16 on older GPUs (T4), fp32 on CPU",
        choices=COMPUTE_DTYPES,
    )


@dataclass
class LoraSpec:
    """LoRA adapters; `targets` is a preset (all-linear, attention, qv, mlp) or module names."""

    r: int = key(64, help="adapter rank (> 0)", flag="--rank")
    alpha: int = key(16, help="scaling numerator: the update is scaled by alpha / r")
    dropout: float = key(0.05, help="dropout on the adapter input, in [0, 1)")
    targets: str | list[str] = key("all-linear", help="a preset or a list of module names", choices=TARGET_PRESETS)


@dataclass
class DataSpec:
    """Where the examples come from and how they become token sequences."""

    path: str = key("", help="JSON / JSONL / CSV / Parquet file, a folder of them, or a Hub dataset name")
    format: str = key(
        "alpaca",
        help="`chat`: `messages`, loss on assistant turns; `classification`: text + label",
        choices=DATA_FORMATS,
    )
    max_seq_len: int = key(
        512, help="longer examples are truncated or dropped, and the counts are reported", flag="--seq-len"
    )
    eval_size: int | float = key(0.1, help="held-out split: a fraction (< 1) or a count")
    eval_path: str | None = key(None, help="a separate evaluation file instead of a split")
    split: str = key("train", help="split of a Hub dataset")
    columns: dict[str, str] = key(help="map a role to your column, e.g. `{output: response}`", default_factory=dict)
    packing: bool = key(False, help="pack examples into full-length blocks (position ids restart per example)")
    group_by_length: bool = key(False, help="batch examples of similar length together")
    max_examples: int | None = key(None, help="use only the first N examples")


@dataclass
class TrainingSpec:
    """Optimisation; defaults are the QLoRA paper's (paged AdamW 32-bit, max grad norm 0.3)."""

    optimizer: str = key("paged_adamw_32bit", help="the optimizer", choices=OPTIMIZERS, flag="--optimizer")
    learning_rate: float = key(2e-4, help="peak learning rate")
    lr_scheduler: str = key("constant", help="learning-rate schedule", choices=SCHEDULERS)
    warmup_ratio: float = key(0.03, help="fraction of the steps spent warming up")
    weight_decay: float = key(0.0, help="AdamW weight decay")
    num_epochs: float = key(1.0, help="epochs (ignored when `max_steps` > 0)")
    max_steps: int = key(-1, help="optimizer steps; > 0 overrides `num_epochs`")
    batch_size: int = key(1, help="sequences per device step", flag="--batch-size")
    grad_accum: int = key(16, help="steps accumulated per optimizer step")
    max_grad_norm: float = key(0.3, help="gradient clipping (the QLoRA paper's value)")
    gradient_checkpointing: bool | int | str = key(
        True,
        help="recompute activations in the backward pass (non-reentrant; reentrant under FSDP / ZeRO-3): `true` "
        "every decoder layer, `false` none, `N` the first N layers (the rest keep their activations and are not "
        "recomputed), `auto` the fewest layers whose predicted peak fits `target_gpu` (or the GPU it runs on; "
        "every layer when neither is known): it says what it chose and the recompute saved ([Speed](#speed))",
    )
    mlp_tiles: int | str = key(
        "auto",
        help="run each layer's MLP over N tiles of tokens, recomputed tile by tile in backward; `auto`: "
        "ceil(tokens / max(hidden, 4096)) tiles, none up to 4,096 tokens ([Long context](#long-context))",
    )
    offload_checkpoints: bool | str = key(
        False,
        help="`true`: the layer inputs checkpointing keeps live in pinned host RAM; `auto`: only when the profiler "
        "says the run does not fit the GPU otherwise; no-op on a CPU",
    )
    eval_steps: int | None = key(None, help="also evaluate every N steps (default: only before and after)")
    save_steps: int = key(100, help="checkpoint every N steps")
    save_total_limit: int | None = key(
        3, help="complete checkpoints kept (older ones are deleted only after a newer one is complete)"
    )
    max_nonfinite_steps: int = key(
        0,
        help="optimizer steps with a NaN/inf loss that are skipped before training stops (exit 5); 0 stops at the "
        "first (the only value under `distributed.strategy: zero3`, where DeepSpeed steps inside backward)",
    )
    logging_steps: int = key(10, help="log every N steps")
    seed: int = key(42, help="seeds LoRA init, data order and dropout")
    loss: str = key(
        "chunked",
        help="causal LMs: `chunked` computes the loss over chunks of tokens and never holds batch × seq × vocab "
        "logits ([Long context](#long-context)); `standard` is transformers' loss. A classifier ignores it",
        choices=LOSSES,
        flag="--loss",
    )
    eval_batch_size: int | None = key(
        None,
        help="sequences per eval step (default: `training.batch_size`); the profiler counts the eval step as part "
        "of the peak",
        flag="--eval-batch-size",
    )
    kernels: str = key(
        "auto",
        help="on CUDA with Liger Kernel installed (`qlora-kit[kernels]`, which GPU installs bring): its fused "
        "RMSNorm, SwiGLU and RoPE, swapped in before the model is built, and its fused linear cross-entropy in the "
        "chunked loss where that holds less; the profiler models them (without Liger on a GPU, `auto` runs and is "
        "profiled as `none`); `none`: transformers' own and the torch chunked loss",
        choices=KERNELS,
    )
    compile: bool = key(
        False,
        help="`torch.compile` each decoder layer (one compiled graph, every layer its input); compiled and eager "
        "gradients agree on a CPU; not a default until a GPU measurement says it pays",
    )
    report_to: str | list[str] = key(
        "none",
        help="trackers the Trainer reports to: none, all, tensorboard, wandb, trackio, mlflow, ... or a list",
        choices=("none", "all", *INTEGRATIONS),
    )
    run_name: str | None = key(None, help="the run's name in the trackers (None: transformers' default)")

    objective: str = key(
        "sft",
        help="sft: next-token loss on the responses; dpo: TRL's DPOTrainer on data.format preference",
        choices=OBJECTIVES,
    )

    @property
    def eval_batch(self) -> int:
        """The eval step's batch: `eval_batch_size`, else the training batch."""
        return self.eval_batch_size or self.batch_size


@dataclass
class DpoSpec:
    """Preference tuning with TRL's DPOTrainer (training.objective: dpo); names as trl.DPOConfig has them."""

    beta: float = key(0.1, help="how far the policy may move from the reference (higher: less); IPO's tau")
    label_smoothing: float = key(
        0.0, help="probability a preference label is flipped (loss_type robust, in [0, 0.5)); EXO's epsilon"
    )
    loss_type: str | list[str] = key(
        "sigmoid",
        help="trl.DPOConfig.loss_type, or a list of them added up ([sigmoid, sft]: RPO); sigmoid: the DPO paper's",
        choices=DPO_LOSS_TYPES,
    )
    loss_weights: list[float] | None = key(
        None, help="one weight per loss_type in a list (trl.DPOConfig.loss_weights); None: 1 each"
    )
    precompute_ref_log_probs: bool = key(
        False,
        help="the reference's log-probs computed once before training (no reference forward in each step)",
    )
    max_prompt_len: int | None = key(
        None,
        help="prompts longer than this many tokens are dropped (and counted); None: only prompts that leave no "
        "response token within data.max_seq_len",
    )


@dataclass
class EvalSpec:
    """The task metric measured on the held-out split before and after training."""

    metric: str = key(
        "none",
        help="`exact_match` (generation, causal LM), `accuracy` (classification; also weighted F1), `map@3` "
        "(ranked multiple choice, classification)",
        choices=METRICS,
    )
    max_examples: int = key(64, help="held-out examples used for the metric")
    max_new_tokens: int = key(32, help="generation length for `exact_match`")


@dataclass
class DistributedSpec:
    """More than one process (torchrun / accelerate launch): how the model is divided across them.

    strategy None: 'ddp' when launched with more than one process, else one plain process.
    """

    strategy: str | None = key(
        None,
        help="how several processes divide the model (`null`: `ddp` when launched with more than one process)",
        choices=DISTRIBUTED_STRATEGIES,
        flag="--strategy",
    )
    offload: str = key(
        "none",
        help="`cpu`: sharded parameters and optimizer states in host RAM (fsdp, zero3)",
        choices=DISTRIBUTED_OFFLOADS,
        flag="--offload",
    )
    gpus: int | None = key(
        None,
        help="like `target_gpu`: how many GPUs the recipe is sized for (the profiler plans one's share)",
        flag="--gpus",
    )


@dataclass
class Recipe:
    """A whole training run. `source` (the YAML file it came from) is not a key."""

    model: ModelSpec = key(help="the base model", default_factory=ModelSpec)
    quantization: QuantizationSpec = key(help="how the frozen base is stored", default_factory=QuantizationSpec)
    lora: LoraSpec = key(help="the LoRA adapters", default_factory=LoraSpec)
    data: DataSpec = key(help="the examples", default_factory=DataSpec)
    training: TrainingSpec = key(help="optimisation", default_factory=TrainingSpec)
    eval: EvalSpec = key(help="the task metric", default_factory=EvalSpec)
    distributed: DistributedSpec = key(help="more than one process", default_factory=DistributedSpec)
    dpo: DpoSpec = key(default_factory=DpoSpec, help="preference tuning (training.objective: dpo)")
    task: str = key(
        "causal_lm",
        help="`classification`: `AutoModelForSequenceClassification`, new head trained in full",
        choices=TASKS,
        flag="--task",
    )
    output_dir: str = key("", help="where the run writes")
    target_gpu: str | int | None = key(
        None,
        help='the GPU the recipe is sized for: a preset (`t4`, `"3090"`, `a100-80gb`, … see '
        "[GPU presets](#gpu-presets-and-units)) or a size with its unit (`24GB` = 24·10⁹ bytes, `24GiB`); the "
        "profiler and OOM advice use it",
    )
    source: Path | None = field(default=None, repr=False, compare=False, metadata={"key": False})

    @property
    def method(self) -> str:
        """The profiler's name for what this recipe trains: qlora, lora-8bit or lora."""
        return {4: "qlora", 8: "lora-8bit", None: "lora"}[self.quantization.bits]

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (what `recipe.yaml` in the output folder holds)."""
        return {f.name: _plain(getattr(self, f.name)) for f in key_fields(Recipe)}

    def save(self, path: str | Path) -> None:
        """Write the resolved recipe as YAML (atomically: a reader never sees half a file)."""
        atomic_write_text(Path(path), yaml.safe_dump(self.to_dict(), sort_keys=False))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in key_fields(type(value))}
    return value


def key_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("key", True)]


def key_leaves(cls: type = Recipe, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, annotation) of every recipe key, in declaration order."""
    hints = typing.get_type_hints(cls)
    for f in key_fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from key_leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name]


def key_field(dotted: str) -> dataclasses.Field:
    """The field that declares the recipe key `dotted` (its default, help, choices and flag)."""
    for name, f, _ in key_leaves():
        if name == dotted:
            return f
    raise KeyError(dotted)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def value_at(recipe: Recipe, dotted: str) -> Any:
    """The value of the recipe key `dotted` in `recipe`."""
    value = recipe
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def flag_keys() -> dict[str, str]:
    """`qlora profile`'s option (argparse dest, e.g. 'seq_len') -> the recipe key it sets."""
    return {f.metadata["flag"].lstrip("-").replace("-", "_"): k for k, f, _ in key_leaves() if f.metadata["flag"]}


def all_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every dotted key a recipe accepts, e.g. 'lora.r', 'training.max_steps'."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in key_fields(cls):
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
    known = {f.name: f for f in key_fields(cls)}
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
    elif tp is str and isinstance(value, str):
        return value
    raise _type_error(key, value, tp)


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(t) for t in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping of strings"
    return _TYPE_NAMES.get(tp, str(tp))


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _type_error(key: str, value: Any, tp: Any) -> QLoraError:
    return QLoraError(f"{key}: expected {type_name(tp)}, got {_describe(value)}")


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


def _spell(value: Any) -> str:
    return "none" if value is None else str(value)


def check_choices(spec: Any, prefix: str = "") -> None:
    """Every key of `spec` (a recipe or one of its sections) against the `choices` in its metadata.

    Choices constrain the values of their own type: a list of module names in `lora.targets` is not a preset,
    and `distributed.strategy: null` is not a strategy.
    """
    for f in key_fields(type(spec)):
        value, dotted = getattr(spec, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{dotted}.")
            continue
        choices = f.metadata.get("choices")
        if not choices or value is None or not any(type(c) is type(value) for c in choices) or value in choices:
            continue
        if isinstance(value, str):
            raise QLoraError(f"{dotted}: unknown value '{value}'{did_you_mean(value, choices)}")
        *first, last = (_spell(c) for c in choices)
        raise QLoraError(f"{dotted}: must be {', '.join(first)} or {last}, got {_spell(value)}")


def check_metric(recipe: Recipe) -> None:
    """eval.metric must be one the recipe's task can measure (checked at load, before any model)."""
    valid = TASK_METRICS[recipe.task]
    _check(
        recipe.eval.metric in valid,
        f"eval.metric: '{recipe.eval.metric}' does not apply to task '{recipe.task}' (use {', '.join(valid)})",
    )


def check_packing(recipe: Recipe) -> None:
    """Packing is for causal LM, and packed blocks are all about max_seq_len long (nothing to group)."""
    spec = recipe.data
    _check(
        not (spec.packing and recipe.task == "classification"),
        "data.packing: only for causal LM formats (alpaca, chat, text), not classification",
    )
    _check(
        not (spec.packing and spec.group_by_length),
        "data.packing and data.group_by_length: choose one (packed blocks all have about the same length)",
    )


def check_distributed(spec: DistributedSpec, quant_bits: int | None) -> None:
    """The `distributed` section's rules, checked when a recipe loads and again by training against the launch."""
    check_choices(spec, "distributed.")
    _check(spec.gpus is None or spec.gpus >= 1, f"distributed.gpus: must be >= 1, got {spec.gpus}")
    _check(
        spec.offload != "cpu" or spec.strategy in SHARDED_STRATEGIES,
        "distributed.offload: 'cpu' moves sharded parameters and optimizer states to host RAM; "
        "it needs distributed.strategy fsdp or zero3",
    )
    _check(
        not (spec.strategy in SHARDED_STRATEGIES and quant_bits == 8),
        f"distributed.strategy: '{spec.strategy}' cannot shard bitsandbytes 8-bit weights; use quantization.bits 4 "
        "(QLoRA) or none",
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
    check_choices(recipe)
    for key, value in (
        ("model.name_or_path", m.name_or_path),
        ("data.path", d.path),
        ("data.eval_path", d.eval_path),
        ("output_dir", recipe.output_dir),
    ):
        _check_path(key, value)
    _check(lo.r > 0, f"lora.r: must be > 0, got {lo.r}")
    _check(lo.alpha > 0, f"lora.alpha: must be > 0, got {lo.alpha}")
    _check(0 <= lo.dropout < 1, f"lora.dropout: must be in [0, 1), got {lo.dropout}")
    if not isinstance(lo.targets, str):
        _check(bool(lo.targets) and all(lo.targets), "lora.targets: the list of module names is empty")
    _check(d.max_seq_len > 0, f"data.max_seq_len: must be > 0, got {d.max_seq_len}")
    _check(d.eval_size >= 0, f"data.eval_size: must be >= 0, got {d.eval_size}")
    _check(d.max_examples is None or d.max_examples > 0, f"data.max_examples: must be > 0, got {d.max_examples}")
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
    report_targets(t.report_to)  # each tracker known and installed (one line naming what to install)
    _check(t.run_name is None or bool(t.run_name.strip()), "training.run_name: empty; leave it out for the default")
    _check(
        t.eval_batch_size is None or t.eval_batch_size >= 1,
        f"training.eval_batch_size: must be >= 1, got {t.eval_batch_size}",
    )
    _check(e.max_examples > 0, f"eval.max_examples: must be > 0, got {e.max_examples}")
    _check(e.max_new_tokens > 0, f"eval.max_new_tokens: must be > 0, got {e.max_new_tokens}")
    check_distributed(recipe.distributed, q.bits)
    if recipe.task == "classification":
        _check(
            d.format == "classification",
            f"data.format: task 'classification' needs format 'classification', got '{d.format}'",
        )
    check_metric(recipe)
    check_packing(recipe)
    check_preference(recipe, for_training)
    if recipe.target_gpu is not None:
        parse_gpu_memory(recipe.target_gpu, "target_gpu")
    return recipe


def check_preference(recipe: Recipe, for_training: bool = True) -> None:
    """training.objective, data.format preference, the dpo section and model.adapter agree (a recipe the
    profiler builds from flags has no data: its format is not checked)."""
    t, d, p = recipe.training, recipe.data, recipe.dpo
    losses = [p.loss_type] if isinstance(p.loss_type, str) else p.loss_type
    _check(bool(losses), "dpo.loss_type: the list is empty")
    for loss in losses:  # a list is not checked by its choices (check_choices): each of its items here
        _check(loss in DPO_LOSS_TYPES, f"dpo.loss_type: unknown value '{loss}'{did_you_mean(loss, DPO_LOSS_TYPES)}")
    _check(
        p.loss_weights is None or len(p.loss_weights) == len(losses),
        f"dpo.loss_weights: one weight per loss_type ({len(losses)}), got {p.loss_weights}",
    )
    _check_path("model.adapter", recipe.model.adapter)
    preference = t.objective in PREFERENCE_OBJECTIVES
    _check(
        not preference or d.format == "preference" or not for_training,
        f"data.format: training.objective '{t.objective}' trains on prompt/chosen/rejected pairs: use format "
        f"'preference', got '{d.format}'",
    )
    _check(
        preference or d.format != "preference",
        "training.objective: data.format 'preference' needs a preference objective (dpo), got 'sft'",
    )
    if not preference:
        return
    _check(recipe.task == "causal_lm", f"task: training.objective '{t.objective}' needs task causal_lm")
    _check(not d.packing, "data.packing: preference pairs are not packed (TRL pads chosen and rejected together)")
    _check(p.beta > 0, f"dpo.beta: must be > 0, got {p.beta}")
    _check(0 <= p.label_smoothing < 0.5, f"dpo.label_smoothing: must be in [0, 0.5), got {p.label_smoothing}")
    _check(
        "exo_pair" not in losses or p.label_smoothing > 0,
        "dpo.label_smoothing: loss_type exo_pair needs a value > 0 (the EXO paper uses 1e-3)",
    )
    _check(
        p.max_prompt_len is None or 0 < p.max_prompt_len < d.max_seq_len,
        f"dpo.max_prompt_len: must be > 0 and below data.max_seq_len ({d.max_seq_len}), got {p.max_prompt_len}",
    )
    _check(
        recipe.distributed.strategy not in SHARDED_STRATEGIES,
        f"distributed.strategy: '{recipe.distributed.strategy}' is not supported with a preference objective "
        "(the reference adapter is not sharded); use ddp",
    )


# --- loading --------------------------------------------------------------------------------------


def _resolve_input_paths(recipe: Recipe, base: Path) -> None:
    """Relative input paths in a recipe file are relative to that file, when they exist there.

    A relative string that does not exist next to the recipe is left alone: it may be a Hub name
    ('meta-llama/Llama-2-7b-hf') or a path relative to the working directory.
    """
    for spec, attr in (
        (recipe.model, "name_or_path"),
        (recipe.model, "adapter"),
        (recipe.data, "path"),
        (recipe.data, "eval_path"),
    ):
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
    bits = quant.get("bits") if isinstance(quant, dict) else None
    if (isinstance(bits, str) and bits.lower() in ("none", "null", "16")) or bits == 16:
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
