"""`qlora train RECIPE` / `python -m qlora.train RECIPE`: recipe in, adapter + metrics out.

Reads top to bottom: check the output folder -> load model and data -> measure before ->
train (transformers.Trainer, paged optimizer, checkpoints) -> measure after -> save atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from qlora.config.disk import writing
from qlora.config.io import atomic_write_json, publish_dir, staged_dir, staging_dir_for
from qlora.config.precision import trainer_precision_flags
from qlora.config.recipe import PREFERENCE_OBJECTIVES
from qlora.config.tracking import report_targets
from qlora.data.preference import prepare_preference_data
from qlora.data.prepare import data_collator, describe, prepare_data
from qlora.model.build import build_model
from qlora.model.load import check_model_source, load_tokenizer
from qlora.model.lora import adapter_folder, parameter_counts
from qlora.model.release import free_memory
from qlora.training import distributed
from qlora.training.auto import resolve_checkpointing, resolve_kernels, wants_offload
from qlora.training.checkpoints import mark_complete, prepare_output_dir
from qlora.training.disk import check_run_space, guard_checkpoint_saves
from qlora.training.distributed import barrier, finish, is_main_process, on_main, summary_line
from qlora.training.guards import exit_if_stopped, guarded_run, run_callbacks
from qlora.training.logbook import log_callback
from qlora.training.metrics import memory_figures, task_metrics
from qlora.training.oom import OutOfMemoryExit, fit_advice
from qlora.training.plots import write_training_plot
from qlora.training.preference import preference_trainer, reward_metrics

log = logging.getLogger(__name__)

KEPT_CHECKPOINT = "the last complete checkpoint is kept (continue with --resume after a change)"
EVAL_ADVICE = "evaluation runs training.eval_batch_size sequences at a time; lower it, or eval.max_examples"


def training_arguments(recipe, compute_dtype, checkpoint_root: Path, has_eval: bool, parallel: dict | None = None):
    """transformers `TrainingArguments` from the recipe's training section (`parallel`: training.distributed's)."""
    return TrainingArguments(**training_values(recipe, compute_dtype, checkpoint_root, has_eval, parallel))


def training_values(recipe, compute_dtype, checkpoint_root: Path, has_eval: bool, parallel: dict | None = None):
    """The Trainer settings of a run, shared by SFT's TrainingArguments and a preference objective's TRL config."""
    t = recipe.training
    return dict(
        output_dir=str(checkpoint_root),
        optim=t.optimizer,
        learning_rate=t.learning_rate,
        # 'constant' would ignore warmup; transformers names the warmed-up variant separately.
        lr_scheduler_type="constant_with_warmup"
        if (t.lr_scheduler == "constant" and t.warmup_ratio)
        else t.lr_scheduler,
        warmup_steps=t.warmup_ratio if t.warmup_ratio < 1 else 0.999,  # a float < 1 is a ratio of total steps
        weight_decay=t.weight_decay,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch,
        prediction_loss_only=recipe.task == "causal_lm",  # eval_loss only: the chunked loss returns no logits
        gradient_accumulation_steps=t.grad_accum,
        max_grad_norm=t.max_grad_norm,
        # gradient checkpointing is left off here: qlora.model.load enables it (non-reentrant) on the base
        eval_strategy="steps" if (t.eval_steps and has_eval) else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # qlora.training.guards rotates once the newer checkpoint is complete
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        train_sampling_strategy="group_by_length" if recipe.data.group_by_length else "random",
        label_names=["labels"],
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        report_to=report_targets(t.report_to) or "none",  # checked (known, installed) when the recipe loaded
        run_name=t.run_name,
        disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),  # pinning without a GPU only earns a warning
        **trainer_precision_flags(compute_dtype),
        **(parallel or {}),
    )


def checkpoint_marker_callback():
    """A Trainer callback that marks each checkpoint complete once Trainer has finished writing it."""

    class MarkCheckpointComplete(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            barrier()  # every process has written its part (ZeRO-3: one shard each)
            if state.is_world_process_zero:
                mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    return MarkCheckpointComplete()


def evaluate_before_training_callback(evaluate: Callable[[], dict[str, float]]):
    """The evaluation before training, run by the Trainer when training begins: the model is wrapped for
    training by then (DDP, a DeepSpeed engine). Evaluated before `train()`, the model would be prepared
    for evaluation only, and training would then skip its wrap (transformers 5 / accelerate 1.15).
    Training's clock (`finished_at`) and peak memory start after it."""

    class EvaluateBeforeTraining(TrainerCallback):
        metrics: dict[str, float] = {}
        finished_at = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.metrics = evaluate()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.finished_at = time.perf_counter()

    return EvaluateBeforeTraining()


@contextlib.contextmanager
def tensorboard_dir(recipe):
    """TensorBoard's events in `output_dir/tensorboard` (else transformers puts them under checkpoints/runs/):
    its callback reads the folder from TENSORBOARD_LOGGING_DIR when the Trainer builds it; a user's own wins."""
    if "tensorboard" not in report_targets(recipe.training.report_to) or "TENSORBOARD_LOGGING_DIR" in os.environ:
        yield
        return
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(recipe.output_dir) / "tensorboard")
    try:
        yield
    finally:
        del os.environ["TENSORBOARD_LOGGING_DIR"]


def build_trainer(
    recipe, loaded, data, checkpoint_root: Path, parallel: dict | None = None, first: list | None = None
):
    """The Trainer of a run; `first`: callbacks that run before qlora's checkpoint and stop callbacks.
    A preference objective gets TRL's trainer (qlora.training.preference) with the same settings and callbacks."""
    callbacks = [
        *(first or []),
        log_callback(Path(recipe.output_dir)),
        checkpoint_marker_callback(),
        *run_callbacks(recipe),
    ]
    with tensorboard_dir(recipe):
        if recipe.training.objective in PREFERENCE_OBJECTIVES:
            values = training_values(recipe, loaded.compute_dtype, checkpoint_root, data.eval is not None, parallel)
            return preference_trainer(recipe, loaded, data, values, callbacks)
        return Trainer(
            model=loaded.model,
            args=training_arguments(recipe, loaded.compute_dtype, checkpoint_root, data.eval is not None, parallel),
            train_dataset=data.train,
            eval_dataset=data.eval,
            data_collator=data_collator(loaded.tokenizer, recipe.data),
            processing_class=loaded.tokenizer,
            callbacks=callbacks,
        )


def evaluate_metrics(trainer, loaded, data, recipe) -> dict[str, float]:
    """Eval loss, a preference run's reward accuracy and margin, and the task metric on the held-out split
    (empty when there is none)."""
    if data.eval is None:
        return {}
    evaluated = trainer.evaluate()
    results = {"eval_loss": float(evaluated["eval_loss"]), **reward_metrics(evaluated)}
    results.update(task_metrics(recipe, trainer, loaded, data))
    return results


def baseline(trainer, loaded, data, recipe, output_dir: Path, resuming: bool) -> dict[str, float]:
    """Metrics before training, kept on disk so that a resumed run reports the true 'before'."""
    path = output_dir / "checkpoints" / "baseline.json"
    if resuming:  # the checkpoint's weights are loaded by now: only the stored metrics are the true 'before'
        if path.exists():
            return json.loads(path.read_text())
        log.info("note: no checkpoints/baseline.json to resume from: metrics.json has no before-metrics")
        return {}

    before = evaluate_metrics(trainer, loaded, data, recipe)
    on_main(lambda: atomic_write_json(path, before))  # a failure (a full disk) reaches every process
    return before


def save_adapter(loaded, output_dir: Path, sharded_trainer=None, needed: int | None = None) -> Path:
    """Write the adapter (peft format, safetensors) + tokenizer to `output_dir/adapter` atomically, from
    the main process. `sharded_trainer` (FSDP, ZeRO-3): every process calls this; Trainer gathers the shards.
    A full disk is `DiskFull` (with `needed`, the profiler's bytes of the adapter) on every process."""
    final = output_dir / "adapter"
    with writing("the adapter", final, needed):
        if sharded_trainer is None:
            on_main(lambda: write_adapter(loaded, final))
        else:
            write_sharded_adapter(loaded, final, sharded_trainer)
    return final


def write_adapter(loaded, final: Path) -> None:
    """One process: the adapter and tokenizer into a staging folder, published when complete."""
    with staged_dir(final) as staging:  # a failed write (disk full) leaves no debris and the old adapter
        # the trained adapter only: a preference run's frozen 'ref' copy is not part of the result
        loaded.model.save_pretrained(staging, safe_serialization=True, selected_adapters=["default"])
        loaded.tokenizer.save_pretrained(staging)


def write_sharded_adapter(loaded, final: Path, sharded_trainer) -> None:
    """Every process: the Trainer gathers the shards; the main process writes the tokenizer and publishes."""
    staging = on_main(lambda: staging_dir_for(final))
    if sharded_trainer.is_fsdp_enabled:  # checkpoints are sharded; the adapter is saved whole, in peft's format
        sharded_trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    sharded_trainer.save_model(str(staging))
    if is_main_process():
        (staging / "training_args.bin").unlink(missing_ok=True)  # Trainer's, not the adapter's
        loaded.tokenizer.save_pretrained(staging)
        publish_dir(staging, final)


def out_of_memory(phase: str, recipe, kept: str = KEPT_CHECKPOINT, extra: str = "", deferred: bool = False):
    """The OOM handler of one training phase: exit 3 with the profiler's fit plan (see qlora.training.oom)."""
    return OutOfMemoryExit(phase, lambda: [*([extra] if extra else []), *fit_advice(recipe)], kept, deferred)


def train(recipe, resume: bool = False, overwrite: bool = False, skip_space_check: bool = False) -> dict[str, Any]:
    """Run one recipe end to end; returns what was written to metrics.json.

    Under `qlora.training.guards`: one run per output_dir (lock), SIGTERM saves a checkpoint (exit 4),
    a non-finite loss stops (exit 5), a full disk is one line (exit 6), and so is too little free space
    for the run's checkpoints and adapter, checked before the model loads (unless `skip_space_check`).
    """
    with guarded_run(Path(recipe.output_dir)) as lock:
        metrics = run_recipe(recipe, resume, overwrite, lock, skip_space_check)
    free_memory()  # the Trainer and its callbacks hold the model in cycles: a second run in this process starts empty
    finish()  # every process leaves the group together
    return metrics


def run_recipe(recipe, resume: bool, overwrite: bool, lock, skip_space_check: bool = False) -> dict[str, Any]:
    """`train`'s body: check -> load -> measure before -> train -> measure after -> save."""
    # Everything a user can get wrong is checked before output_dir is touched (--overwrite would
    # delete the previous results) and before minutes go into loading the model.
    output_dir = Path(recipe.output_dir)
    plan = distributed.resolve(recipe.distributed, recipe.quantization.bits)  # torchrun / accelerate launch
    check_model_source(recipe.model)
    continued = adapter_folder(recipe.model)  # model.adapter: found, or a note that a new one starts (optional)
    tokenizer = load_tokenizer(recipe.model)
    prepare = prepare_preference_data if recipe.data.format == "preference" else prepare_data
    data = prepare(recipe, tokenizer)
    log.info(f"data: {describe(data.stats)}")
    distributed.start(plan)
    lock.acquire()  # before the first write (main process only): a second run into output_dir is refused
    # The main process alone prepares and writes the output folder; the others wait for its answer.
    resume_from = distributed.on_main(lambda: prepare_output_dir(output_dir, overwrite=overwrite, resume=resume))
    labels = len(data.label_names) if data.label_names else None
    disk = distributed.on_main(  # the checkpoints and adapter fit the free space, before minutes go into loading
        lambda: check_run_space(
            recipe, tokenizer, len(data.train), labels, output_dir, skip_space_check, plan.launch.world_size
        )
    )
    distributed.on_main(lambda: recipe.save(output_dir / "recipe.yaml"))
    set_seed(recipe.training.seed)
    distributed.prepare_loading(plan)
    recipe = resolve_checkpointing(
        resolve_kernels(recipe)
    )  # the profiler answers the `auto` keys before anything loads
    offload = wants_offload(recipe)
    with OutOfMemoryExit("model loading", lambda: fit_advice(recipe), kept="no training step ran"):
        loaded = build_model(
            recipe, data.label_names, tokenizer=tokenizer, offload=offload
        )  # a classifier head needs the labels
    resuming = resume_from is not None

    def evaluate_before():  # `trainer` is bound by then: the Trainer calls this back from train()
        with out_of_memory("the evaluation before training", recipe, kept="no training step ran", extra=EVAL_ADVICE):
            return baseline(trainer, loaded, data, recipe, output_dir, resuming)

    before = evaluate_before_training_callback(evaluate_before)  # first: SIGTERM during it exits at once
    trainer = build_trainer(recipe, loaded, data, output_dir / "checkpoints", plan.trainer_kwargs, first=[before])
    guard_checkpoint_saves(trainer, disk.checkpoint if disk else None)  # a full disk there stops every process
    with out_of_memory("training", recipe):
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    exit_if_stopped(trainer, output_dir)  # SIGTERM (exit 4) or a non-finite loss (exit 5)
    runtime = time.perf_counter() - before.finished_at
    memory = memory_figures(trainer.optimizer)  # labelled figures; paged optimizer states included on CUDA
    # before the last evaluation: an OOM there must not lose it
    adapter_dir = save_adapter(
        loaded, output_dir, trainer if plan.shards_weights else None, disk.adapter if disk else None
    )
    after: dict[str, float] = {}
    with out_of_memory(
        "the evaluation after training",
        recipe,
        f"the adapter is saved in {adapter_dir}, metrics.json has no after-metrics",
        EVAL_ADVICE,
        deferred=True,
    ) as after_oom:
        after = evaluate_metrics(trainer, loaded, data, recipe)
    trainable, total = parameter_counts(loaded.model)
    metrics: dict[str, Any] = {f"{k}_before": v for k, v in before.metrics.items()}
    metrics.update({f"{k}_after": v for k, v in after.items()})
    metrics.update(
        method=recipe.method,
        objective=recipe.training.objective,
        continued_adapter=str(continued) if continued else None,
        trainable_params=trainable,
        total_params=total,
        **memory,
        train_runtime_s=round(runtime, 2),
        train_steps=int(result.global_step),
        train_loss=float(result.training_loss),
        tokens_per_s=round(trainer.state.num_input_tokens_seen / runtime, 1) if runtime > 0 else 0.0,
        device="cuda" if torch.cuda.is_available() else "cpu",
        compute_dtype=str(loaded.compute_dtype).removeprefix("torch."),
        data=data.stats,
        adapter_dir=str(adapter_dir),
    )
    if after_oom.happened:
        metrics["eval_after_skipped"] = "out of GPU memory in the evaluation after training"
    metrics.update(
        distributed.process_metrics(
            plan, memory["peak_memory_bytes"], recipe.training.batch_size, recipe.training.grad_accum, trainer.model
        )
    )
    on_main(lambda: atomic_write_json(output_dir / "metrics.json", metrics))
    on_main(lambda: write_training_plot(output_dir))  # from log.jsonl, which the after-evaluation has just completed
    if plan.launch.is_main:
        print_summary(metrics, output_dir)
    after_oom.exit_if_out_of_memory()
    return metrics


def print_summary(metrics: dict[str, Any], output_dir: Path) -> None:
    """Before/after at a glance, on stdout."""
    table = Table(title=f"qlora: {output_dir}")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    for key in sorted(k.removesuffix("_after") for k in metrics if k.endswith("_after")):
        table.add_row(key, f"{metrics.get(key + '_before', float('nan')):.4f}", f"{metrics[key + '_after']:.4f}")
    console = Console()
    console.print(table)
    console.print(
        f"trainable params {metrics['trainable_params']:,} of {metrics['total_params']:,} | "
        f"peak memory {metrics['peak_memory_bytes'] / 2**30:.2f} GiB | {metrics['train_steps']} steps in "
        f"{metrics['train_runtime_s']:.1f} s | {metrics['tokens_per_s']:.0f} tokens/s | adapter: "
        f"{metrics['adapter_dir']}"
    )

    console.print(summary_line(metrics))
