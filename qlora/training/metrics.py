"""Measurements reported in `metrics.json`: labelled peak memory, the generation metric and classification metrics.

Accuracy, weighted F1 and MAP@3 are three short numpy formulas, written here rather than taken from
scikit-learn to keep a heavy dependency out of the package for them.
"""

from __future__ import annotations

import resource
import sys

import numpy as np
import torch

from qlora.data.prepare import Example
from qlora.data.stop_tokens import stop_token_ids


def paged_optimizer_bytes(optimizer) -> int:
    """Bytes of bitsandbytes' paged optimizer states: CUDA unified memory that bnb allocates itself
    (`is_paged` tensors), outside PyTorch's allocator, so `max_memory_allocated` never sees them."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the real one
    state = getattr(optimizer, "state", None) or {}
    return sum(
        value.nbytes
        for per_param in state.values()
        for value in per_param.values()
        if isinstance(value, torch.Tensor) and getattr(value, "is_paged", False)
    )


def memory_figures(optimizer=None) -> dict[str, int]:
    """Labelled peak memory since the last reset, for metrics.json.

    CUDA: `peak_memory_allocated_bytes` (tensors in PyTorch's allocator), `paged_optimizer_bytes`
    (bnb's paged states, outside it), `peak_memory_bytes` = their sum (what the profiler's
    `allocated_bytes` predicts), `peak_memory_reserved_bytes` (the caching allocator's segments; still
    no CUDA context). CPU: `peak_memory_bytes` is the process's peak resident set size.
    """
    if not torch.cuda.is_available():
        return {"peak_memory_bytes": _peak_rss()}
    allocated, paged = int(torch.cuda.max_memory_allocated()), paged_optimizer_bytes(optimizer)
    return {
        "peak_memory_bytes": allocated + paged,
        "peak_memory_allocated_bytes": allocated,
        "paged_optimizer_bytes": paged,
        "peak_memory_reserved_bytes": int(torch.cuda.max_memory_reserved()),
    }


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


def normalise_answer(text: str) -> str:
    """Compare answers without case or surrounding whitespace/punctuation."""
    return text.strip().strip(".").strip().lower()


@torch.no_grad()
def generate_answers(
    model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 16, add_bos: bool = True
) -> list[str]:
    """Greedy completions of `prompts`, batched with left padding (BOS added unless the prompt carries its own),
    each ending at the first end-of-turn token (qlora.data.stop_tokens)."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    stop_ids = stop_token_ids(tokenizer, model)  # every end of turn, not only EOS
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            bos = (tokenizer.bos_token or "") if add_bos else ""
            batch = tokenizer([bos + p for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = batch.to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=stop_ids,
            )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            answers.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def exact_match(
    model, tokenizer, examples: list[Example], max_new_tokens: int, add_bos: bool = True, batch_size: int = 16
) -> float:
    """Share of examples whose greedy answer equals the reference (normalised)."""
    if not examples:
        return 0.0
    answers = generate_answers(model, tokenizer, [e.prompt for e in examples], max_new_tokens, batch_size, add_bos)
    hits = sum(normalise_answer(a) == normalise_answer(e.response) for a, e in zip(answers, examples))
    return hits / len(examples)


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Share of predictions equal to the label."""
    return float(np.mean(predictions == labels))


def weighted_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Per-class F1 averaged with each class's share of the true labels (scikit-learn's 'weighted')."""
    classes, support = np.unique(labels, return_counts=True)
    scores = []
    for cls in classes:
        tp = np.sum((predictions == cls) & (labels == cls))
        wrong = np.sum(predictions != labels, where=(predictions == cls) | (labels == cls))  # FP + FN
        scores.append(2 * tp / (2 * tp + wrong) if tp + wrong else 0.0)
    return float(np.average(scores, weights=support))


def map_at_3(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean average precision at 3 with one right answer: 1, 1/2 or 1/3 by its rank in the top 3, else 0."""
    top3 = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    hits = top3 == labels[:, None]
    return float(np.sum(hits / np.arange(1, top3.shape[1] + 1)) / len(labels))


def classification_metrics(logits: np.ndarray, labels: np.ndarray, ranked: bool) -> dict[str, float]:
    """Accuracy and weighted F1 of the top class, and MAP@3 of the ranking for ranked multiple choice."""
    predictions = logits.argmax(axis=-1)
    results = {"eval_accuracy": accuracy(predictions, labels), "eval_f1": weighted_f1(predictions, labels)}
    if ranked:
        results["eval_map_at_3"] = map_at_3(logits, labels)
    return results


def task_metrics(recipe, trainer, loaded, data) -> dict[str, float]:
    """The recipe's task metric(s) on the held-out split, keyed `eval_<metric>`."""
    if recipe.task == "classification":
        output = trainer.predict(data.eval)
        return classification_metrics(output.predictions, output.label_ids, ranked=recipe.eval.metric == "map@3")
    if recipe.eval.metric == "exact_match":
        examples = data.eval_examples[: recipe.eval.max_examples]
        # a chat template writes its own BOS into the prompt (preference pairs may be rendered with one too)
        add_bos = recipe.data.format != "chat" and not data.stats.get("chat_template")
        return {
            "eval_exact_match": exact_match(
                loaded.model,
                loaded.tokenizer,
                examples,
                recipe.eval.max_new_tokens,
                add_bos,
                recipe.training.eval_batch,
            )  # the eval phase's batch
        }
    return {}
