"""Load the frozen base (4-bit NF4 + double quant, 8-bit, or 16-bit), attach LoRA, enable checkpointing.

The profiler's measured mode builds its models through these same functions, so what it measures
is what `qlora train` holds.
"""

from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora.distributed import keep_deepspeed_off_stdout
from qlora.errors import QLoraError, did_you_mean
from qlora.long_context import apply_long_context
from qlora.precision import base_weight_dtype, resolve_compute_dtype
from qlora.recipe import LoraSpec, ModelSpec, QuantizationSpec, Recipe

keep_deepspeed_off_stdout()  # before anything imports transformers' Trainer (and DeepSpeed with it)

# Leaf names of linear layers per preset, across the common decoder families (Llama, Mistral, Qwen2,
# Gemma, Phi-3, GPT-NeoX, Falcon, GPT-2).
ATTENTION_NAMES = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "query_key_value", "c_attn", "dense", "out_proj", "c_proj"}
QV_NAMES = {"q_proj", "v_proj", "query", "value"}
MLP_NAMES = {"gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2", "c_fc", "dense_h_to_4h", "dense_4h_to_h", "w1", "w2", "w3"}
PRESETS = {"attention": ATTENTION_NAMES, "qv": QV_NAMES, "mlp": MLP_NAMES}
CLASSIFIER_HEADS = ("score", "classifier")


@dataclass
class LoadedModel:
    """What training needs from loading: the peft model, its tokenizer and the dtype it computes in."""

    model: Any
    tokenizer: Any
    compute_dtype: torch.dtype


def is_local_path(name: str) -> bool:
    """A string the user meant as a path (it cannot be a Hub id 'org/name')."""
    return os.path.exists(name) or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def check_model_source(spec: ModelSpec) -> None:
    """Fail in a second, naming the key, when the base model cannot be found (before any download)."""
    name = spec.name_or_path
    if is_local_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise QLoraError(f"model.name_or_path: folder not found: {name}")
        if not (path / "config.json").exists():
            raise QLoraError(f"model.name_or_path: {name} has no config.json (not a transformers model folder)")
        return
    check_hub_model(name, spec.revision)


def check_hub_model(name: str, revision: str | None) -> None:
    """A Hub id must be in the local cache or answer on the Hub; one quick request, no retry loop.

    transformers would retry an unreachable Hub for about a minute and then fail with a traceback.
    """
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise QLoraError(f"model.name_or_path: '{name}' is not a local folder nor in the Hub cache, and HF_HUB_OFFLINE is set")
    try:
        HfApi().model_info(name, revision=revision, timeout=10)
    except GatedRepoError:
        raise QLoraError(f"model.name_or_path: '{name}' is gated on the Hub: accept its license there and log in (`hf auth login`)") from None
    except RevisionNotFoundError:
        raise QLoraError(f"model.revision: '{revision}' not found for '{name}' on the Hub") from None
    except RepositoryNotFoundError:
        raise QLoraError(f"model.name_or_path: '{name}' is not a local folder nor a model on the Hub (misspelt, or private without a login?)") from None
    except Exception as exc:  # network errors come in many types (httpx, OSError); all mean "cannot reach it"
        raise QLoraError(f"model.name_or_path: '{name}' is not a local folder and the Hub cannot be reached ({type(exc).__name__}); use a local folder or go online") from None


def quantization_config(spec: QuantizationSpec, compute_dtype: torch.dtype, sharded: bool = False):
    """transformers' `BitsAndBytesConfig` for the recipe (None for a 16-bit base). `sharded` (FSDP,
    ZeRO-3): the packed 4-bit codes are stored in the compute dtype, so that the engines flatten and
    split them with the 16-bit tensors (uint8 storage is left unsharded or rejected)."""
    from transformers import BitsAndBytesConfig

    if spec.bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quant_type,
            bnb_4bit_use_double_quant=spec.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=compute_dtype if sharded else torch.uint8,
        )
    if spec.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def _from_pretrained(loader, spec: ModelSpec, **kwargs):
    """Call a transformers `from_pretrained`, turning 'not found' into a one-line user error."""
    check_model_source(spec)
    try:
        return loader.from_pretrained(
            spec.name_or_path, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **kwargs
        )
    except (OSError, EnvironmentError) as exc:
        if is_local_path(spec.name_or_path):
            raise QLoraError(f"model.name_or_path: cannot load {spec.name_or_path}: {str(exc).splitlines()[0]}") from None
        raise QLoraError(
            f"model.name_or_path: '{spec.name_or_path}' is not a local folder and could not be fetched from the "
            "Hugging Face Hub (offline, gated or misspelt?)"
        ) from None


def load_tokenizer(spec: ModelSpec):
    """The base model's tokenizer, with a pad token (many causal LMs ship without one)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, spec)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_base_model(recipe: Recipe, compute_dtype: torch.dtype, label_names: list[str] | None = None,
                    announce: bool = False, pad_token_id: int | None = None, device: str | None = None):
    """The frozen base: causal LM, or sequence classifier with `len(label_names)` classes (`announce`:
    say which head weights start untrained, as training does; `pad_token_id`: the tokenizer's, for a
    checkpoint whose config has none, since the classifier pools the last non-pad token; `device`:
    'cpu' or 'cuda', default the GPU when there is one)."""
    from transformers import AutoModelForCausalLM

    from qlora.distributed import loading_device_map

    sharded = recipe.distributed.strategy in ("fsdp", "zero3")
    kwargs: dict[str, Any] = {
        "dtype": base_weight_dtype(compute_dtype),
        "attn_implementation": recipe.model.attn_implementation,
        "quantization_config": quantization_config(recipe.quantization, compute_dtype, sharded),
    }
    if device == "cpu":
        kwargs["device_map"] = {"": "cpu"}
    elif torch.cuda.is_available():
        kwargs["device_map"] = loading_device_map(recipe.distributed.strategy)
    if recipe.task == "classification":
        labels = label_names or []
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
        model = load_classifier(recipe.model, announce, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
    else:
        model = _from_pretrained(AutoModelForCausalLM, recipe.model, **kwargs)
    keep_training_layout(model)
    return model


def load_classifier(spec: ModelSpec, announce: bool = False, **kwargs):
    """A sequence classifier on a causal LM's weights, with one line instead of transformers' load table.

    A new head and an unused lm_head are the expected outcome here, so transformers' MISSING /
    UNEXPECTED table only alarms; what is worth saying is which weights start untrained, and any
    missing weight outside the head is a real problem the user should see.
    """
    import logging

    from transformers import AutoModelForSequenceClassification

    # A filter, not a level: transformers runs extra checks that warn elsewhere when this logger's level is set.
    report_logger = logging.getLogger("transformers.modeling_utils")

    def drop_report(record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)

    report_logger.addFilter(drop_report)
    try:
        model, info = _from_pretrained(AutoModelForSequenceClassification, spec, output_loading_info=True, **kwargs)
    finally:
        report_logger.removeFilter(drop_report)
    missing = sorted(info["missing_keys"])
    head = [key for key in missing if key.split(".", 1)[0] in CLASSIFIER_HEADS]
    if head and announce:
        print(f"model: new classifier head {', '.join(head)} ({model.config.num_labels} labels), trained in full", file=sys.stderr)
    if len(head) < len(missing):
        others = [key for key in missing if key not in head]
        print(f"warning: {spec.name_or_path} lacks {len(others)} base weight{'s' if len(others) > 1 else ''}, randomly initialised: "
              f"{', '.join(others[:5])}{' …' if len(others) > 5 else ''}", file=sys.stderr)
    return model


def linear_leaf_names(model) -> set[str]:
    """Leaf names of every linear layer (plain, 4-bit or 8-bit), e.g. {'q_proj', 'down_proj', 'lm_head'}."""
    import bitsandbytes as bnb

    kinds = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds)}


def output_head_names(model) -> set[str]:
    """Leaf names of the output head(s): the LM head or a classifier, which LoRA must not wrap."""
    heads = {name for name in CLASSIFIER_HEADS if hasattr(model, name)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads.update(name.rsplit(".", 1)[-1] for name, module in model.named_modules() if output is not None and module is output)
    return heads


def lora_target_modules(model, targets: str | list[str]) -> str | list[str]:
    """Resolve `lora.targets` (a preset or names) against the model's own linear layers."""
    present = linear_leaf_names(model)
    if targets == "all-linear":
        # peft's own 'all-linear' writes every full module path into adapter_config.json (hundreds for
        # a 70B); the leaf names say the same, stay readable and portable to other tools.
        return sorted(present - output_head_names(model))
    if isinstance(targets, str):
        chosen = sorted(present & PRESETS[targets])
        if not chosen:
            raise QLoraError(
                f"lora.targets: preset '{targets}' matches no linear layer of this model "
                f"(its linear layers: {', '.join(sorted(present))}); list module names instead"
            )
        return chosen
    for name in targets:
        if name not in present:
            raise QLoraError(f"lora.targets: this model has no linear layer named '{name}'{did_you_mean(name, present)}")
    return list(targets)


def attach_lora(model, spec: LoraSpec, task: str = "causal_lm"):
    """Wrap the frozen base with LoRA adapters; only adapter (and a new classifier head) train."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=lora_target_modules(model, spec.targets),
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        modules_to_save=[n for n in CLASSIFIER_HEADS if hasattr(model, n)] if task == "classification" else None,
    )
    # autocast_adapter_dtype keeps LoRA weights in fp32 even on a 16-bit base (precision.ADAPTER_DTYPE).
    with quiet_peft_deprecations():
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=True)
    upcast_trainable(peft_model)
    return peft_model


@contextmanager
def quiet_peft_deprecations():
    """peft still reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model; the
    FutureWarning is theirs to fix and says nothing to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def upcast_trainable(model) -> None:
    """Every trained tensor in fp32 (precision.ADAPTER_DTYPE), the classifier head's copy included.

    peft's `autocast_adapter_dtype` covers the LoRA layers only: a `modules_to_save` head is copied
    in the base's 16-bit dtype, where small updates round away, and under fp16 mixed precision
    the gradient scaler refuses fp16 gradients ("Attempting to unscale FP16 gradients").
    """
    from qlora.precision import ADAPTER_DTYPE

    for param in model.parameters():
        if param.requires_grad and param.dtype != ADAPTER_DTYPE:
            param.data = param.data.to(ADAPTER_DTYPE)


def enable_gradient_checkpointing(model, reentrant: bool = False) -> None:
    """Non-reentrant checkpointing: recompute each layer in backward instead of keeping its activations.

    `reentrant` for ZeRO-3 and FSDP: ZeRO-3's partitioned weights are gathered by module hooks, which
    the non-reentrant recompute does not re-run (it finds empty weights and stops with a CheckpointError);
    FSDP-QLoRA is documented (peft) with reentrant checkpointing.
    """
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    model.config.use_cache = False


def keep_training_layout(model) -> None:
    """Stop bnb from repacking 4-bit weights into its CPU inference layout during evaluation.

    On CPUs with AVX512-BF16, bnb's `Linear4bit` rewrites its weight on the first no-grad eval forward
    into a layout whose bf16 kernel makes inference 2-4x faster but every later training step about 5x
    slower, and rounds differently (logits move by ~1e-3): the eval before training would slow the whole
    run, a resumed run (which skips that eval) would not reproduce the uninterrupted one, and a reloaded
    adapter would not give the logits it was trained to give. Every load keeps the one precise layout.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def build_model(recipe: Recipe, label_names: list[str] | None = None, device: str | None = None, tokenizer=None) -> LoadedModel:
    """Tokenizer + quantized base + LoRA (+ checkpointing), all as the recipe says (out of GPU memory while
    loading: the qlora.oom message and exit 3)."""
    from qlora.oom import OutOfMemoryExit, fit_advice

    compute_dtype = resolve_compute_dtype(recipe.quantization.compute_dtype, device)
    tokenizer = tokenizer or load_tokenizer(recipe.model)
    with OutOfMemoryExit("model loading", lambda: fit_advice(recipe), kept="no training step ran"):
        base = load_base_model(recipe, compute_dtype, label_names, announce=True, pad_token_id=tokenizer.pad_token_id)
    if recipe.training.gradient_checkpointing:
        enable_gradient_checkpointing(base, reentrant=recipe.distributed.strategy in ("fsdp", "zero3"))
    model = attach_lora(base, recipe.lora, recipe.task)
    install_recipe_loss(model.get_base_model(), recipe)
    apply_long_context(model, recipe)  # training.mlp_tiles, training.offload_checkpoints
    return LoadedModel(model=model, tokenizer=tokenizer, compute_dtype=compute_dtype)


def install_recipe_loss(model, recipe: Recipe) -> str:
    """`training.loss` on a causal LM (qlora.loss); a classifier keeps its own small loss."""
    from qlora.loss import install_loss

    return install_loss(model, recipe.training.loss) if recipe.task == "causal_lm" else "standard"


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters, counting a 4-bit weight as its unpacked element count."""
    trainable, total = model.get_nb_trainable_parameters()
    return int(trainable), int(total)
