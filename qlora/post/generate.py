"""`qlora generate OUT --prompt "..."`: a quick look at what a run learned, on the 4-bit base + adapter
(a classifier answers with its most likely label).

The base is loaded exactly as the trainer loaded it (same recipe, same BitsAndBytesConfig, same
compute dtype), and prompts get the template the adapter was trained with, so the answers are the
ones the run's metrics describe.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from qlora.config.errors import QLoraError
from qlora.config.precision import resolve_compute_dtype
from qlora.config.recipe import DataSpec
from qlora.data.prepare import format_alpaca
from qlora.model.load import load_base_model
from qlora.model.lora import load_adapter
from qlora.model.release import release
from qlora.post.export import TrainedRun
from qlora.training.metrics import generate_answers


def load_run_base(run: TrainedRun, compute_dtype, tokenizer, device: str | None = None):
    """The base as training loaded it: the same quantization, and for a classifier its labels and pad id."""
    return load_base_model(
        run.recipe, compute_dtype, run.label_names, pad_token_id=tokenizer.pad_token_id, device=device
    )


def load_adapted_model(run: TrainedRun, device: str | None = None, compute_dtype: torch.dtype | None = None):
    """(peft model on the 4-bit base as trained, the run's tokenizer), in eval mode; `compute_dtype`: the
    recipe's, resolved for `device`, unless given."""
    tokenizer = AutoTokenizer.from_pretrained(str(run.adapter_dir))
    compute_dtype = compute_dtype or resolve_compute_dtype(run.recipe.quantization.compute_dtype, device)
    base = load_run_base(run, compute_dtype, tokenizer, device)
    model = load_adapter(base, str(run.adapter_dir))
    return model.eval(), tokenizer


def format_prompt(run: TrainedRun, tokenizer, instruction: str, context: str = "", raw: bool = False) -> str:
    """The full text the model sees for `instruction` (+ `context`): the run's training format, BOS included.

    Alpaca goes through the data module's own formatter and chat through the tokenizer's template (which
    writes its own BOS), so prompts here match the prompts training and its metrics used.
    """
    fmt = run.recipe.data.format
    if fmt == "chat" and not raw:
        content = f"{instruction.strip()}\n\n{context.strip()}".strip()
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if fmt == "alpaca" and not raw:
        text = format_alpaca({"instruction": instruction, "input": context, "output": ""}, DataSpec()).prompt
    else:
        text = f"{instruction}\n\n{context}" if context else instruction
    return (tokenizer.bos_token or "") + text


def generate(
    run: TrainedRun,
    prompts: list[str],
    inputs: list[str] | None = None,
    max_new_tokens: int = 128,
    raw: bool = False,
    compare: bool = False,
) -> list[dict[str, str]]:
    """Greedy answers per prompt: {'prompt', 'adapter'} and, with `compare`, the base's {'base'}."""
    inputs = inputs or [""] * len(prompts)
    if len(inputs) != len(prompts):
        raise QLoraError(f"--input: give one per --prompt (got {len(prompts)} prompts, {len(inputs)} inputs)")
    model, tokenizer = load_adapted_model(run)
    texts = [format_prompt(run, tokenizer, p, c, raw) for p, c in zip(prompts, inputs)]

    def answers() -> list[str]:
        if run.label_names:
            return classify(model, tokenizer, texts, run.label_names)
        return generate_answers(model, tokenizer, texts, max_new_tokens, add_bos=False)  # BOS is in the text

    try:
        results = [{"prompt": p, "adapter": a} for p, a in zip(prompts, answers())]
        if compare:
            with model.disable_adapter():
                for result, base_answer in zip(results, answers()):
                    result["base"] = base_answer
    finally:
        release(model)  # a notebook generating again loads a second 4-bit model: this one is freed first
    return results


def classify(model, tokenizer, texts: list[str], labels: list[str]) -> list[str]:
    """A classifier's answer per text: its most likely label and that label's probability."""
    answers = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding, so the pooled token is the text's last
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
            probs = model(input_ids=ids).logits[0].float().softmax(-1)
            best = int(probs.argmax())
            answers.append(f"{labels[best]} ({probs[best]:.0%})")
    return answers
