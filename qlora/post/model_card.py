"""The model card (README.md) of an exported adapter: Hub metadata up top, the run's facts below.

Everything in it comes from the run folder (recipe, metrics, adapter config), the base model's own
card and the profiler; nothing comes from the environment, so no token can end up in a card.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import huggingface_hub  # the Hub client looked up at call time (tests replace it)
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from qlora.config.errors import QLoraError
from qlora.config.recipe import ModelSpec, Recipe
from qlora.data.prepare import ALPACA_PROMPT_NO_INPUT
from qlora.memory.estimate import estimate_recipe
from qlora.model.load import is_local_path

log = logging.getLogger(__name__)

METHOD_TAGS = {"qlora": ["qlora", "4-bit", "bitsandbytes"], "lora-8bit": ["8-bit", "bitsandbytes"], "lora": []}
METHOD_TEXT = {
    "qlora": "QLoRA: LoRA adapters trained on a frozen 4-bit {quant} base{double}",
    "lora-8bit": "LoRA adapters trained on a frozen 8-bit base",
    "lora": "LoRA adapters trained on a frozen 16-bit base",
}
RECIPE_PATH_KEYS = (("model", "name_or_path"), ("model", "adapter"), ("data", "path"), ("data", "eval_path"))


# --- what the front matter says about the base ------------------------------------------------------


def base_model_id(spec: ModelSpec, override: str | None) -> str | None:
    """The base's Hub id: `--base-model`, else the recipe's model when it is a Hub name; None for a local folder."""
    if override:
        try:
            validate_repo_id(override)
        except HFValidationError:
            raise QLoraError(f"--base-model: '{override}' is not a Hub model id (expected ORG/NAME)") from None
        return override
    return None if is_local_path(spec.name_or_path) else spec.name_or_path


def card_base_model(spec: ModelSpec, hub_id: str | None, for_hub: bool) -> str:
    """What `base_model` says. The Hub rejects a card whose base_model is not a model id, so a push of
    an adapter trained on a local folder needs `--base-model`; a local export names the folder."""
    if hub_id:
        return hub_id
    name = Path(spec.name_or_path).name
    if for_hub:
        raise QLoraError(
            f"--base-model: the base is the local folder {spec.name_or_path}; pass the Hub id it is a copy of "
            "(e.g. --base-model meta-llama/Llama-3.1-8B) so the card's base_model is valid on the Hub"
        )
    log.warning(f"warning: the base is a local folder; the card names it '{name}' (pass --base-model ORG/NAME)")
    return name


def base_license(spec: ModelSpec, hub_id: str | None) -> str | None:
    """The base's license: from its local model card, else from its Hub page; None when unknown."""
    readme = Path(spec.name_or_path).expanduser() / "README.md"
    if is_local_path(spec.name_or_path) and readme.is_file():
        try:
            found = ModelCard.load(readme).data.license
        except ValueError:  # a README without valid front matter says nothing about the license
            found = None
        if found:
            return found
    if hub_id is None:
        return None
    try:
        info = huggingface_hub.HfApi().model_info(hub_id, revision=spec.revision, timeout=10)
    except Exception:  # offline, gated, renamed: each just means the license is unknown, as the card then says
        return None
    return info.card_data.license if info.card_data else None


def predicted_estimate(recipe: Recipe):
    """The profiler's `Estimate` of this recipe's GPU peak; None when the profiler cannot place the model
    (the card then says 'not available' rather than failing the export)."""
    try:
        return estimate_recipe(recipe)
    except QLoraError as exc:
        log.warning(f"warning: no predicted peak for the card: {exc}")
        return None


# --- the card ---------------------------------------------------------------------------------------


def format_bytes(n: int | None) -> str:
    if n is None:
        return "not available"
    unit, scale = ("GiB", 2**30) if n >= 2**30 else ("MiB", 2**20)
    return f"{n / scale:.2f} {unit} ({n:,} bytes)"


def shareable_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe with local paths cut to their names: this machine's folders mean nothing elsewhere
    and can reveal user names."""
    data = recipe.to_dict()
    for section, key in RECIPE_PATH_KEYS:
        value = data[section][key]
        if value and is_local_path(value):
            data[section][key] = Path(value).name
    data["output_dir"] = Path(recipe.output_dir).name
    return data


def results_section(metrics: dict[str, Any]) -> list[str]:
    keys = sorted(k.removesuffix("_after") for k in metrics if k.endswith("_after"))
    lines = ["## Results", ""]
    if keys:
        lines += ["| metric (held-out split) | before | after |", "|---|---:|---:|"]
        lines += [
            f"| {k.removeprefix('eval_')} | {metrics[k + '_before']:.4f} | {metrics[k + '_after']:.4f} |" for k in keys
        ]
    else:
        lines.append("No held-out split was evaluated.")
    m = metrics
    lines += [
        "",
        f"{m['train_steps']} steps in {m['train_runtime_s']} s on {m['device']} (compute dtype {m['compute_dtype']}), "
        f"{m['tokens_per_s']} tokens/s, final train loss {m['train_loss']:.4f}.",
        "",
    ]
    return lines


def data_section(recipe: Recipe, metrics: dict[str, Any]) -> list[str]:
    d, stats = recipe.data, metrics["data"]
    source = Path(d.path).name if is_local_path(d.path) else d.path
    return [
        "## Data",
        "",
        f"- source: `{source}` (format `{d.format}`, max_seq_len {d.max_seq_len}, packing "
        f"{'on' if d.packing else 'off'})",
        f"- examples: {stats['train_examples']} train, {stats.get('eval_examples', 0)} eval",
        f"- truncated to max_seq_len: {stats.get('train_truncated', 0)} train, {stats.get('eval_truncated', 0)} eval; "
        f"dropped (prompt too long): {stats.get('train_dropped', 0)} train, {stats.get('eval_dropped', 0)} eval",
        "",
    ]


def objective_section(recipe: Recipe, metrics: dict[str, Any]) -> list[str]:
    """A preference run: the objective, its settings, its reference and the pairs left out (nothing for SFT)."""
    if recipe.training.objective == "sft":
        return []
    p, stats = recipe.dpo, metrics["data"]
    losses = p.loss_type if isinstance(p.loss_type, str) else " + ".join(p.loss_type)
    continued = metrics.get("continued_adapter")
    start = f"the adapter of `{Path(continued).parent.name}`" if continued else "a new adapter"
    dropped = ", ".join(
        f"{stats.get(f'train_{reason}', 0)} {reason.replace('_', ' ')}"
        for reason in ("identical", "empty", "long_prompt")
    )
    return [
        "## Preference tuning",
        "",
        f"- objective: {recipe.training.objective.upper()} (TRL's trainer), loss {losses}, beta {p.beta}, "
        f"label smoothing {p.label_smoothing}",
        f"- policy: {start} trained further on the 4-bit base; reference: that adapter as training began, frozen "
        f"({'log-probs precomputed' if p.precompute_ref_log_probs else 'a second forward per step'})",
        "- reward accuracy: share of held-out pairs whose implicit reward (beta x log-ratio to the reference) is "
        "higher for the chosen answer; before training the policy is the reference, every reward is 0, a tie "
        "counts as a miss",
        f"- training pairs dropped: {dropped}",
        "",
    ]


def lora_section(recipe: Recipe, adapter_config: dict[str, Any], metrics: dict[str, Any]) -> list[str]:
    lo, q = recipe.lora, recipe.quantization
    trainable, total = metrics["trainable_params"], metrics["total_params"]
    quant = {
        4: f"4-bit {q.quant_type.upper()}, double quant {'on' if q.double_quant else 'off'}",
        8: "8-bit",
        None: "none (16-bit)",
    }
    return [
        "## LoRA",
        "",
        "| setting | value |",
        "|---|---|",
        f"| r | {lo.r} |",
        f"| alpha | {lo.alpha} |",
        f"| dropout | {lo.dropout} |",
        f"| targets (recipe) | {lo.targets} |",
        f"| target modules | {', '.join(sorted(adapter_config.get('target_modules') or []))} |",
        f"| trainable params | {trainable:,} of {total:,} ({100 * trainable / total:.3f} %) |",
        f"| base quantization | {quant[q.bits]} |",
        "",
    ]


def memory_section(recipe: Recipe, metrics: dict[str, Any]) -> list[str]:
    """Predicted and measured peaks, each labelled with what it counts, compared only like with like:
    the prediction's tensors (`allocated_bytes`) against measured allocated + paged optimizer states.
    The predicted total adds the CUDA context and allocator slack, which no tensor counter sees."""
    found = predicted_estimate(recipe)
    tensors = None if found is None else int(found.allocated)
    gpu = f", sized for a {recipe.target_gpu} GPU" if recipe.target_gpu else ""
    lines = [
        "## Memory",
        "",
        "| figure | peak |",
        "|---|---:|",
        "| predicted tensors: weights, adapters, gradients, optimizer states (paged included), activations, buffers "
        f"(`qlora profile --recipe`, `allocated_bytes`) | {format_bytes(tensors)} |",
        f"| predicted GPU total: tensors + CUDA context + allocator slack (`total_bytes`{gpu}) | "
        f"{format_bytes(None if found is None else int(found.total))} |",
    ]
    if metrics["device"] != "cuda":
        lines += [
            f"| measured: peak resident memory of the CPU process (Python, libraries, CPU tensors; not comparable "
            f"with the GPU prediction) | {format_bytes(metrics['peak_memory_bytes'])} |",
            "",
        ]
        return lines
    measured = metrics["peak_memory_bytes"]
    lines += [
        f"| measured: tensors in PyTorch's allocator (`torch.cuda.max_memory_allocated`) | "
        f"{format_bytes(metrics.get('peak_memory_allocated_bytes'))} |",
        f"| measured: paged optimizer states (bitsandbytes, outside PyTorch's allocator) | "
        f"{format_bytes(metrics.get('paged_optimizer_bytes'))} |",
        f"| measured: tensors + paged states, compare with predicted tensors{error_note(tensors, measured)} | "
        f"{format_bytes(measured)} |",
        f"| measured: reserved by PyTorch's caching allocator (`torch.cuda.max_memory_reserved`; no CUDA context) | "
        f"{format_bytes(metrics.get('peak_memory_reserved_bytes'))} |",
        "",
    ]
    return lines


def error_note(predicted: int | None, measured: int | None) -> str:
    """' (prediction +1.2 %)': how far the prediction is from the like-for-like measurement."""
    if not predicted or not measured:
        return ""
    return f" (prediction {100 * (predicted - measured) / measured:+.1f} %)"


def alpaca_section() -> list[str]:
    template = ALPACA_PROMPT_NO_INPUT.format(instruction="{instruction}")
    return [
        "Prompts use the Alpaca template the adapter was trained with (the answer follows `### Response:`):",
        "",
        "```text",
        template.rstrip(),
        "```",
        "",
    ]


def render_card(run, base_model: str, license_id: str | None, repo_id: str | None = None) -> str:
    """README.md for an exported adapter of `run` (a qlora.post.export.TrainedRun)."""
    recipe, metrics = run.recipe, run.metrics
    adapter_config = json.loads((run.adapter_dir / "adapter_config.json").read_text())
    causal = recipe.task == "causal_lm"
    data = ModelCardData(
        base_model=base_model,
        library_name="peft",
        license=license_id,
        pipeline_tag="text-generation" if causal else "text-classification",
        tags=["peft", "lora", *METHOD_TAGS[recipe.method]],
    )
    q = recipe.quantization
    method = METHOD_TEXT[recipe.method].format(
        quant=q.quant_type.upper(), double=" with double quantization" if q.double_quant else ""
    )
    where = repo_id or "path/to/this/folder"
    auto = "AutoPeftModelForCausalLM" if causal else "AutoPeftModelForSequenceClassification"
    body = [
        f"# {repo_id.split('/')[-1] if repo_id else base_model + ' adapter'}",
        "",
        f"A LoRA adapter for `{base_model}`, trained with qlora ({method}).",
        "",
        "## Use it",
        "",
        "```python",
        f"from peft import {auto}",
        "from transformers import AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        "```",
        "",
        *(alpaca_section() if recipe.data.format == "alpaca" else []),
        *results_section(metrics),
        *data_section(recipe, metrics),
        *objective_section(recipe, metrics),
        *lora_section(recipe, adapter_config, metrics),
        *memory_section(recipe, metrics),
        "## Training recipe",
        "",
        "```yaml",
        yaml.safe_dump(shareable_recipe(recipe), sort_keys=False).rstrip(),
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))
