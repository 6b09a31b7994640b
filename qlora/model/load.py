"""Load the frozen base (4-bit NF4 + double quant, 8-bit, or 16-bit) and its tokenizer (qlora.model.lora
attaches the adapters, qlora.model.build puts the pieces together as a recipe says).

The profiler's measured mode builds its models through these same functions, so what it measures
is what `qlora train` holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import torch
from huggingface_hub import HfApi, constants, try_to_load_from_cache
from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)

from qlora.config.architecture import CLASSIFIER_HEADS
from qlora.config.attention import choose_attention, describe_choice, model_class, supported_attention
from qlora.config.environment import keep_deepspeed_off_stdout
from qlora.config.errors import QLoraError
from qlora.config.recipe import SHARDED_STRATEGIES, ModelSpec, QuantizationSpec, Recipe
from qlora.memory.inventory import EXPERT_KEYS
from qlora.ops.attention import install as install_sdpa
from qlora.ops.experts import finish_quantized_experts, quantizing_experts, register_experts_implementation

log = logging.getLogger(__name__)


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
    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise QLoraError(
            f"model.name_or_path: '{name}' is not a local folder nor in the Hub cache, and HF_HUB_OFFLINE is set"
        )
    try:
        HfApi().model_info(name, revision=revision, timeout=10)
    except GatedRepoError:
        raise QLoraError(
            f"model.name_or_path: '{name}' is gated on the Hub: accept its license there and log in (`hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise QLoraError(f"model.revision: '{revision}' not found for '{name}' on the Hub") from None
    except RepositoryNotFoundError:
        raise QLoraError(
            f"model.name_or_path: '{name}' is not a local folder nor a model on the Hub (misspelt, or private without "
            "a login?)"
        ) from None
    except Exception as exc:  # network errors come in many types (httpx, OSError); all mean "cannot reach it"
        raise QLoraError(
            f"model.name_or_path: '{name}' is not a local folder and the Hub cannot be reached "
            f"({type(exc).__name__}); use a local folder or go online"
        ) from None


def quantization_config(spec: QuantizationSpec, compute_dtype: torch.dtype, sharded: bool = False):
    """transformers' `BitsAndBytesConfig` for the recipe (None for a 16-bit base). `sharded` (FSDP,
    ZeRO-3): the packed 4-bit codes are stored in the compute dtype, so that the engines flatten and
    split them with the 16-bit tensors (uint8 storage is left unsharded or rejected)."""
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
    except OSError as exc:
        if is_local_path(spec.name_or_path):
            raise QLoraError(
                f"model.name_or_path: cannot load {spec.name_or_path}: {str(exc).splitlines()[0]}"
            ) from None
        raise QLoraError(
            f"model.name_or_path: '{spec.name_or_path}' is not a local folder and could not be fetched from the "
            "Hugging Face Hub (offline, gated or misspelt?)"
        ) from None


def load_model_config(spec: ModelSpec):
    """The base model's transformers config (a small file: what the build needs to know before loading weights)."""
    return _from_pretrained(AutoConfig, spec)


def load_tokenizer(spec: ModelSpec):
    """The base model's tokenizer, with a pad token (many causal LMs ship without one)."""
    tokenizer = _from_pretrained(AutoTokenizer, spec)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_base_model(
    recipe: Recipe,
    compute_dtype: torch.dtype,
    label_names: list[str] | None = None,
    announce: bool = False,
    pad_token_id: int | None = None,
    device: str | None = None,
    lora: bool = True,
):
    """The frozen base: causal LM, or sequence classifier with `len(label_names)` classes (`announce`:
    say which head weights start untrained, as training does; `pad_token_id`: the tokenizer's, for a
    checkpoint whose config has none, since the classifier pools the last non-pad token; `device`:
    'cpu' or 'cuda', default the GPU when there is one; `lora`: False for full fine-tuning, whose experts
    train and so keep transformers' own experts code)."""
    keep_deepspeed_off_stdout()  # before transformers or accelerate first ask DeepSpeed for its accelerator
    sharded = recipe.distributed.strategy in SHARDED_STRATEGIES
    kwargs: dict[str, Any] = {
        "dtype": compute_dtype,  # frozen unquantized weights stay in the compute dtype (qlora.config.precision)
        "attn_implementation": loading_attention(resolve_attention(recipe, device, announce)),
        "quantization_config": quantization_config(recipe.quantization, compute_dtype, sharded),
    }
    if device == "cpu":
        kwargs["device_map"] = {"": "cpu"}
    elif torch.cuda.is_available():
        kwargs["device_map"] = loading_device_map(recipe.distributed.strategy)
    moe_kwargs, loading = moe_loading_kwargs(recipe, lora)
    kwargs.update(moe_kwargs)
    if recipe.task == "classification":
        labels = label_names or []
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)},
        )
        with loading:
            model = load_classifier(recipe.model, announce, **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = pad_token_id
    else:
        with loading:
            model = _from_pretrained(AutoModelForCausalLM, recipe.model, **kwargs)
    finish_quantized_experts(model)
    keep_training_layout(model)
    return model


def is_moe(config) -> bool:
    """Whether a transformers config has routed experts (Mixtral, Qwen3-MoE, gpt-oss, GLM-4.5-MoE, ...)."""
    return any(getattr(config.get_text_config(), key, None) for key in EXPERT_KEYS)


def check_moe_source(recipe: Recipe, config) -> None:
    """One-line errors for what qlora's 4-bit experts do not cover (before any weight is loaded).

    A checkpoint that ships quantized experts (gpt-oss's MXFP4) keeps its own quantizer in transformers, which
    ignores the recipe's bitsandbytes config: the experts would be MXFP4 or 16-bit depending on the kernels
    installed, never qlora's NF4. Sharded strategies flatten parameters, which 4-bit expert stacks are not yet
    prepared for."""
    moe = is_moe(config)
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if moe and method and str(method) != "bitsandbytes" and recipe.quantization.bits is not None:
        raise QLoraError(
            f"model.name_or_path: {recipe.model.name_or_path} ships {method}-quantized weights; use its 16-bit "
            "checkpoint (e.g. unsloth/gpt-oss-20b-BF16), which qlora quantizes to NF4 while loading"
        )
    if moe and recipe.quantization.bits == 4 and recipe.distributed.strategy in SHARDED_STRATEGIES:
        raise QLoraError(
            f"distributed.strategy: '{recipe.distributed.strategy}' does not shard 4-bit expert stacks yet; "
            "use ddp (or one GPU) for a mixture-of-experts QLoRA"
        )


def moe_loading_kwargs(recipe: Recipe, lora: bool) -> tuple[dict[str, Any], Any]:
    """(from_pretrained kwargs, context to load in) for a mixture-of-experts model under LoRA: qlora's experts code
    (qlora.ops.experts: split LoRA, one layer dequantized at a time; a dense model has no experts module to
    use it) and, for a 4-bit recipe, fused experts quantized to NF4 as the loader sets them (bitsandbytes'
    `Linear4bit` replacement covers only the linear layers). Nothing for full fine-tuning."""
    config = load_model_config(recipe.model)
    if not lora or not is_moe(config):
        return {}, contextlib.nullcontext()
    check_moe_source(recipe, config)
    kwargs = {"experts_implementation": register_experts_implementation()}
    q = recipe.quantization
    if q.bits != 4:
        return kwargs, contextlib.nullcontext()
    return kwargs, quantizing_experts(q.quant_type, q.double_quant)


def resolve_attention(recipe: Recipe, device: str | None = None, announce: bool = False) -> str:
    """`model.attn_implementation` for this family on `device` (qlora.config.attention, the profiler's rule too);
    `announce`: print the one line saying what `auto` chose and why."""
    config = load_model_config(recipe.model)
    cls = model_class(config, recipe.task)
    where = device or ("cuda" if torch.cuda.is_available() else "cpu")
    name, why = choose_attention(
        cls.__name__ if cls else config.model_type,
        supported_attention(cls) if cls else None,
        recipe.model.attn_implementation,
        where,
    )
    if announce and recipe.model.attn_implementation == "auto":
        log.info(describe_choice(name, why))
    return name


def loading_attention(name: str) -> str:
    """What `from_pretrained` gets for the chosen implementation: sdpa is qlora's mask-free sdpa (qlora.ops.attention:
    no tokens x tokens mask for packed sequences and sliding windows), transformers' sdpa otherwise."""
    return install_sdpa() if name == "sdpa" else name


def loading_device_map(strategy: str | None) -> dict[str, int | str]:
    """`from_pretrained`'s device map on CUDA: the whole model on this process's own GPU (the launcher's
    LOCAL_RANK), not on GPU 0 for every process.

    FSDP loads on the CPU instead: transformers' rank-0-only loading skips quantized models, so each
    process would first put the whole 4-bit model on its GPU (a 70B's 37 GB on a 24 GB card); FSDP
    moves each process's shard to its GPU as it wraps. ZeRO-3 partitions from the GPU (DeepSpeed moves
    the module there before splitting it), so that GPU must hold the 4-bit model once while loading.
    """
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)  # collectives and kernels of this process go to its GPU
    return {"": "cpu"} if strategy == "fsdp" else {"": local}


def load_classifier(spec: ModelSpec, announce: bool = False, **kwargs):
    """A sequence classifier on a causal LM's weights, with one line instead of transformers' load table.

    A new head and an unused lm_head are the expected outcome here, so transformers' MISSING /
    UNEXPECTED table only alarms; what is worth saying is which weights start untrained, and any
    missing weight outside the head is a real problem the user should see.
    """
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
        log.info(f"model: new classifier head {', '.join(head)} ({model.config.num_labels} labels), trained in full")
    if len(head) < len(missing):
        others = [key for key in missing if key not in head]
        log.warning(
            f"warning: {spec.name_or_path} lacks {len(others)} base weight{'s' if len(others) > 1 else ''}, randomly "
            "initialised: "
            f"{', '.join(others[:5])}{' …' if len(others) > 5 else ''}"
        )
    return model


def keep_training_layout(model) -> None:
    """Stop bnb from repacking 4-bit weights into its CPU inference layout during evaluation.

    On CPUs with AVX512-BF16, bnb's `Linear4bit` rewrites its weight on the first no-grad eval forward
    into a layout whose bf16 kernel makes inference 2-4x faster but every later training step about 5x
    slower, and rounds differently (logits move by ~1e-3): the eval before training would slow the whole
    run, a resumed run (which skips that eval) would not reproduce the uninterrupted one, and a reloaded
    adapter would not give the logits it was trained to give. Every load keeps the one precise layout.
    """
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
