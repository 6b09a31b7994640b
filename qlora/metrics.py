"""Measurements reported in `metrics.json`: peak memory and the generation task metric."""

from __future__ import annotations

import resource
import sys

import torch

from qlora.data import Example


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated by tensors (CUDA), else the process's peak resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def normalise_answer(text: str) -> str:
    """Compare answers without case or surrounding whitespace/punctuation."""
    return text.strip().strip(".").strip().lower()


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy completions of `prompts`, batched with left padding."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            bos = tokenizer.bos_token or ""
            batch = tokenizer([bos + p for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model.device)
            out = model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def exact_match(model, tokenizer, examples: list[Example], max_new_tokens: int) -> float:
    """Share of examples whose greedy answer equals the reference (normalised)."""
    if not examples:
        return 0.0
    answers = generate_answers(model, tokenizer, [e.prompt for e in examples], max_new_tokens)
    hits = sum(normalise_answer(a) == normalise_answer(e.response) for a, e in zip(answers, examples))
    return hits / len(examples)


def task_metrics(recipe, trainer, loaded, data) -> dict[str, float]:
    """The recipe's task metric(s) on the held-out split, keyed `eval_<metric>`."""
    if recipe.eval.metric == "exact_match":
        examples = data.eval_examples[: recipe.eval.max_examples]
        return {"eval_exact_match": exact_match(loaded.model, loaded.tokenizer, examples, recipe.eval.max_new_tokens)}
    return {}
