"""Preference objectives (`training.objective: dpo`): TRL's DPOTrainer over the model qlora built.

The policy is the 4-bit base with its LoRA adapter (new, or `model.adapter` continued). The reference is
that same model with the adapter as it was when training began: TRL copies the adapter under the name
'ref' (frozen) and switches to it for the reference forward, so no second base is loaded and nothing is
merged into 4-bit weights; for a new adapter (B = 0) that copy is the base itself. With
`dpo.precompute_ref_log_probs` TRL runs the reference once over the data before training instead. TRL's
loss, its chunked log-prob head (never the full batch x sequence x vocabulary logits) and its reward
metrics are used as they are; qlora supplies the data (tokenized, with counts), the training arguments
of the recipe and its callbacks.
"""

from __future__ import annotations

from typing import Any

# TRL's eval metrics -> the names metrics.json, the summary table and the model card use.
REWARD_METRICS = {"eval_rewards/accuracies": "eval_reward_accuracy", "eval_rewards/margins": "eval_reward_margin"}


def dpo_config(recipe, values: dict[str, Any]):
    """trl.DPOConfig: the run's Trainer settings (`values`, as for SFT) plus the recipe's dpo section."""
    from trl import DPOConfig

    p = recipe.dpo
    return DPOConfig(
        **values,
        beta=p.beta,
        label_smoothing=p.label_smoothing,
        loss_type=[p.loss_type] if isinstance(p.loss_type, str) else list(p.loss_type),
        loss_weights=p.loss_weights,
        precompute_ref_log_probs=p.precompute_ref_log_probs,
        max_length=recipe.data.max_seq_len,  # the pairs are already cut to it (qlora.data.preference)
        gradient_checkpointing=False,  # qlora.model.build enabled it on the base as the recipe says
        model_init_kwargs=None,
    )


def preference_trainer(recipe, loaded, data, values: dict[str, Any], callbacks: list):
    """TRL's DPOTrainer for the recipe; the trainable weights stay in qlora's fp32 (precision.ADAPTER_DTYPE)."""
    from trl import DPOTrainer

    class PretokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer over pairs that qlora.data.preference has tokenized (and counted) already: TRL's own
        tokenization, which would start from text columns, is skipped for them."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    # TRL casts a quantized model's trainable weights to bf16 (its reading of the QLoRA paper), after it has
    # copied them into the frozen 'ref' adapter: the policy would start a bf16 rounding away from its reference.
    # qlora keeps them as they were, in fp32 like its SFT runs (and as the profiler counts them).
    kept = {name: param.detach().clone() for name, param in loaded.model.named_parameters() if param.requires_grad}
    trainer = PretokenizedDPOTrainer(
        model=loaded.model,
        ref_model=None,  # the peft model's frozen 'ref' adapter copy (or the base) is the reference
        args=dpo_config(recipe, values),
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=loaded.tokenizer,
        callbacks=callbacks,
    )
    for name, param in loaded.model.named_parameters():  # the optimizer does not exist yet
        if name in kept:
            param.data = kept[name]
    return trainer


def reward_metrics(results: dict[str, float]) -> dict[str, float]:
    """Held-out reward accuracy and margin from DPOTrainer.evaluate()'s results (empty for SFT)."""
    return {name: float(results[key]) for key, name in REWARD_METRICS.items() if key in results}
