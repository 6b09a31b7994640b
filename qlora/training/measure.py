"""Measured peak memory of real training steps, beside the prediction.

The model is built by the trainer's own functions (`qlora.model.load`: quantized load, LoRA, gradient
checkpointing) from the config with random weights, the optimizer by transformers' `Trainer`
mapping of the optimizer name; then one warm-up accumulation cycle (two micro-batches, gradient
clipping, optimizer step) creates the optimizer states and a second cycle is measured, then the
eval step (gradients freed as the Trainer frees them, a no-grad forward at the eval batch size).

- CUDA: `torch.cuda.max_memory_allocated`, reset per phase. Paged optimizer states live in CUDA
  unified memory outside PyTorch's allocator, so their bytes are added to the measured peak.
- CPU: `PeakTracker`, a TorchDispatchMode that follows every tensor storage from allocation to
  release, including the model's pre-existing tensors (bitsandbytes' packed weights and quant
  states) and the temporaries inside bitsandbytes' own operators.
"""

from __future__ import annotations

import ctypes
import dataclasses
import itertools
import os
import platform
import tempfile
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from bitsandbytes.functional import GlobalPageManager
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainingArguments
from transformers.utils import (
    logging as hf_logging,
)

from qlora.config.environment import keep_deepspeed_off_stdout
from qlora.config.precision import default_device, resolve_compute_dtype, trainer_precision_flags
from qlora.config.recipe import Recipe
from qlora.memory.catalog import resolve
from qlora.memory.inventory import load_config
from qlora.memory.report import Measurement
from qlora.memory.settings import METHODS, Settings, from_recipe
from qlora.model.build import prepare_for_training, use_decoder_kernels
from qlora.model.load import load_base_model
from qlora.model.release import release
from qlora.ops.experts import quant_state_tensors
from qlora.training.metrics import paged_optimizer_bytes

MICRO_BATCHES = 2  # gradient accumulation, so gradients exist while activations peak (as in the recipes)


class PeakTracker(TorchDispatchMode):
    """Live bytes of CPU tensor storages, with the peak and which storages made it up.

    Written by hand because torch's MemTracker registers a gradient hook on every parameter and so
    fails on frozen ones (all of LoRA's base), and cannot see inside custom operators.
    """

    def __init__(self) -> None:
        super().__init__()
        self._serials = itertools.count()
        self._live: dict[int, tuple[int, int, weakref.ref]] = {}  # id(storage) -> (serial, nbytes, ref)
        self.current = self.peak = 0
        self.peak_storages: dict[int, int] = {}  # serial -> nbytes, at the peak
        self.phase: str | None = None
        self.phase_peaks: dict[str, int] = {}

    def track(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live or storage.nbytes() == 0:
            return
        self._live[key] = (
            next(self._serials),
            storage.nbytes(),
            weakref.ref(storage, lambda _, k=key: self._release(k)),
        )
        self.current += storage.nbytes()
        if self.current > self.peak:
            self.peak = self.current
            self.peak_storages = {serial: size for serial, size, _ in self._live.values()}
        if self.phase and self.current > self.phase_peaks.get(self.phase, 0):
            self.phase_peaks[self.phase] = self.current

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key)[1]

    def serial(self, tensor) -> int | None:
        entry = self._live.get(id(tensor.untyped_storage()))
        return entry[0] if entry else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "bitsandbytes":
            # bitsandbytes' CPU kernels are Python functions of torch ops: run them with this mode on
            # (calling the CPU kernel directly, not the operator, which would land here again).
            with self:
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            self.track(tensor)
        return out


def measure(recipe: Recipe, method: str, num_labels: int | None = None, weights: Path | None = None) -> Measurement:
    """Build `method` (full, lora, lora-8bit, qlora) of `recipe` on this machine's device, from its model's
    config with random weights, and measure one training step's peak and its eval step.

    `num_labels`: a classifier's head size (else counted from the recipe's data). `weights`: a folder of
    `random_weights` to load, so a caller measuring one config several times builds them once. Nothing the
    measurement built outlives it: on a GPU, allocated memory is back where it started (checked)."""
    keep_deepspeed_off_stdout()  # `qlora profile --measure --format json` prints nothing but the JSON on stdout
    device = default_device()
    _, _, settings = from_recipe(recipe, num_labels, device)  # the batch shapes, as the profiler sees them
    hf_logging.disable_progress_bar()  # saving and loading the random model is not news to the user
    with tempfile.TemporaryDirectory(prefix="qlora-measure-") as folder:
        if weights is None:
            weights = random_weights(
                recipe, settings.num_labels if settings.task == "classification" else None, Path(folder)
            )
        start = torch.cuda.memory_allocated() if device == "cuda" else 0
        measured = _measure(recipe, method, settings, weights, device)
        if device == "cuda" and torch.cuda.memory_allocated() != start:
            raise RuntimeError(
                f"measure: {torch.cuda.memory_allocated() - start} bytes of GPU memory outlived the measurement"
            )
    return measured


def _measure(recipe: Recipe, method: str, settings: Settings, weights: Path, device: str) -> Measurement:
    """The measurement itself: every tensor it makes is local here, freed when it returns (no reference cycles)."""
    with warnings.catch_warnings(), _cpu_threads(1):
        # on CPU bitsandbytes falls back to unpaged states of the same size, and says so each time
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        built = build(recipe, method, settings, weights)
        try:
            batch = _batch(built.model, settings, device)
            eval_batch = lambda: _batch(built.model, settings.replace(batch_size=settings.eval_batch), device)
            cycle(built, batch)  # warm-up: creates the optimizer states
            built.optimizer.zero_grad(set_to_none=True)
            measure_on = _measure_cuda if device == "cuda" else _measure_cpu
            measured = measure_on(built, batch, eval_batch, method)
            if device == "cuda":
                release_paged_states(built.optimizer)
        finally:
            release(built.model)  # its 4-bit layers go with this frame, not at the next garbage collection
        return measured


def random_weights(recipe: Recipe, num_labels: int | None, folder: Path) -> Path:
    """The recipe's model config with random weights (a classifier's head with `num_labels` outputs), saved in
    the compute dtype, built on the GPU when there is one and with every CPU thread; returns `folder`."""
    keep_deepspeed_off_stdout()  # saving the model asks DeepSpeed for its accelerator (a line on stdout)
    torch.manual_seed(0)
    config = load_config(resolve(recipe.model.name_or_path).config_path)
    if num_labels:  # saved with its head, so loading it reports nothing missing
        config.num_labels = num_labels
        config.pad_token_id = 0 if config.pad_token_id is None else config.pad_token_id  # pools the last non-pad token
    dtype = resolve_compute_dtype(recipe.quantization.compute_dtype)
    with torch.device(default_device()):
        model = (AutoModelForSequenceClassification if num_labels else AutoModelForCausalLM).from_config(
            config, dtype=dtype
        )
    model.save_pretrained(folder)
    return folder


def environment(device: str) -> dict[str, str]:
    """Where a measurement ran: the device and the versions of everything that decides its bytes."""
    if device == "cuda":
        env = {"device": torch.cuda.get_device_name(), "CUDA": str(torch.version.cuda), "driver": _cuda_driver()}
    else:
        env = {"device": f"CPU ({platform.machine()}, {os.cpu_count()} cores)"}
    env["python"] = platform.python_version()
    env.update({name: version(name) for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate")})
    return env


def _cuda_driver() -> str:
    """The NVIDIA driver version (torch reports the CUDA runtime only), via NVML when installed."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception:  # NVML missing or unusable: the report says so instead of failing the measurement
        return "unknown"


@contextmanager
def _cpu_threads(count: int):
    """Bytes do not depend on the thread count, but on a busy CPU OpenMP's spin-waiting threads make
    the small ops of a small model 50x slower; the measurement runs on one thread and restores it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Built:
    """A model as `qlora train` builds it (not trained yet), its optimizer, and the autocast Trainer would use."""

    model: object
    optimizer: object
    method: str
    autocast: torch.dtype | None = None  # Trainer's bf16/fp16 autocast around forward and loss (GPU only)
    loss: object = None  # a preference objective: TRL's loss of a batch (its trainer's compute_loss)

    def step_loss(self, batch: dict):
        return self.loss(batch) if self.loss is not None else self.model(**batch).loss


def build(recipe: Recipe, method: str, settings: Settings, weights: Path) -> Built:
    """The saved random `weights`, loaded and wrapped exactly as `qlora train` does (with the base quantized as
    `method` says)."""
    torch.manual_seed(0)
    labels = [str(i) for i in range(settings.num_labels)] if settings.task == "classification" else None
    recipe = dataclasses.replace(
        recipe,
        model=dataclasses.replace(recipe.model, name_or_path=str(weights)),
        quantization=dataclasses.replace(recipe.quantization, bits=METHODS[method]),
    )
    use_decoder_kernels(recipe)  # training.kernels, as build_model does
    compute = resolve_compute_dtype(recipe.quantization.compute_dtype, settings.device)
    net, _ = prepare_for_training(
        load_base_model(recipe, compute, labels),
        recipe,
        lora=method != "full",
        offload=settings.offload_checkpoints is True and settings.device == "cuda",
    )
    net.config.use_cache = False
    net.train()
    args = TrainingArguments(
        output_dir=str(weights / "out"), optim=settings.optimizer, report_to="none", use_cpu=settings.device == "cpu"
    )
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    optimizer = optimizer_cls([p for p in net.parameters() if p.requires_grad], **kwargs)
    autocast = compute if any(trainer_precision_flags(compute, settings.device).values()) else None
    loss = preference_loss(recipe, net, settings, weights) if settings.objective != "sft" else None
    return Built(net, optimizer, method, autocast, loss)


def preference_loss(recipe: Recipe, net, settings: Settings, weights: Path):
    """TRL's DPO loss of a batch, from the DPOTrainer `qlora train` builds around `net` (qlora.training.preference):
    its 'ref' adapter copy, its fused log-prob head and its `compute_loss`, as training runs them."""
    from types import SimpleNamespace

    import datasets
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from qlora.training.preference import preference_trainer

    # TRL's trainer wants a tokenizer; a random model has none, and the step only needs its pad id.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 0}, "<pad>")))
    tokenizer.pad_token = tokenizer.eos_token = "<pad>"
    pair = datasets.Dataset.from_list([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}])
    values = dict(
        output_dir=str(weights / "out"),
        report_to="none",
        use_cpu=settings.device == "cpu",
        per_device_train_batch_size=settings.batch_size,
        **trainer_precision_flags(resolve_compute_dtype(recipe.quantization.compute_dtype, settings.device)),
    )
    loaded = SimpleNamespace(model=net, tokenizer=tokenizer)
    trainer = preference_trainer(recipe, loaded, SimpleNamespace(train=pair, eval=None), values, [])
    return lambda batch: trainer.compute_loss(trainer.model, batch)


def _batch(model, settings: Settings, device: str) -> dict[str, torch.Tensor]:
    """Random token ids, and labels as a separate tensor as the data collator makes them (one class
    id per sequence for a classifier). A preference step: TRL's collated pairs, chosen then rejected
    (2 x batch sequences), the second half of each sequence its completion."""
    generator = torch.Generator().manual_seed(0)
    if settings.objective != "sft":
        shape = (2 * settings.batch_size, settings.seq_len)
        ids = torch.randint(0, model.config.vocab_size, shape, generator=generator)
        completion = torch.zeros(shape, dtype=torch.long)
        completion[:, settings.seq_len // 2 :] = 1
        batch = {
            "input_ids": ids,
            "attention_mask": torch.ones(shape, dtype=torch.long),
            "completion_mask": completion,
        }
        if settings.precompute_ref:  # the reference's log-probs come with the batch
            reference = -torch.ones(settings.batch_size)
            batch.update(ref_chosen_logps=reference, ref_rejected_logps=reference.clone())
        return {k: v.to(device) for k, v in batch.items()}
    ids = torch.randint(0, model.config.vocab_size, (settings.batch_size, settings.seq_len), generator=generator)
    if settings.task == "classification":
        labels = torch.randint(0, settings.num_labels, (settings.batch_size,), generator=generator)
    else:
        labels = ids.clone()
    return {"input_ids": ids.to(device), "labels": labels.to(device)}


def cycle(built: Built, batch: dict, tracker: PeakTracker | None = None, on_phase=None) -> None:
    """One optimizer step over MICRO_BATCHES micro-batches, as Trainer runs it (gradients not yet cleared)."""
    device = next(iter(batch.values())).device.type
    for _ in range(MICRO_BATCHES):
        _phase("forward", tracker, on_phase)
        with torch.autocast(device, dtype=built.autocast, enabled=built.autocast is not None):
            loss = built.step_loss(batch) / MICRO_BATCHES
        _phase("backward", tracker, on_phase)
        loss.backward()
        del loss
    _phase("optimizer step", tracker, on_phase)
    torch.nn.utils.clip_grad_norm_([p for p in built.model.parameters() if p.requires_grad], 0.3)
    built.optimizer.step()
    _phase(None, tracker, on_phase)


def evaluate(built: Built, make_batch, tracker: PeakTracker | None = None, on_phase=None) -> None:
    """The eval step as Trainer.evaluate runs it between optimizer steps: gradients freed, eval mode, no
    grad, its batch made then (`make_batch`), as the eval loader makes it."""
    built.optimizer.zero_grad(set_to_none=True)
    built.model.eval()
    _phase("eval", tracker, on_phase)
    batch = make_batch()
    device = next(iter(batch.values())).device.type
    with torch.no_grad(), torch.autocast(device, dtype=built.autocast, enabled=built.autocast is not None):
        loss = built.step_loss(batch)
    del loss, batch
    _phase(None, tracker, on_phase)
    built.model.train()


def _phase(name, tracker, on_phase) -> None:
    if tracker is not None:
        tracker.phase = name
    if on_phase is not None:
        on_phase(name)


def model_tensors(model):
    """(tensor, kind) for everything a loaded model stores: parameters, buffers, bitsandbytes' quant states.

    kind: 'trainable', 'frozen' (weights and quant states) or 'buffer'."""
    for param in model.parameters():
        yield param, "trainable" if param.requires_grad else "frozen"
        state = getattr(param, "quant_state", None)
        if state is not None:
            nested = state.state2
            for tensor in (state.absmax, state.code, state.offset, *((nested.absmax, nested.code) if nested else ())):
                if tensor is not None:  # no offset without double quant
                    yield tensor, "frozen"
        if getattr(param, "SCB", None) is not None:
            yield param.SCB, "frozen"
    for tensor in quant_state_tensors(model):  # 4-bit expert stacks (qlora.ops.experts)
        yield tensor, "frozen"
    for module in model.modules():
        scb = getattr(getattr(module, "state", None), "SCB", None)
        if isinstance(scb, torch.Tensor):
            yield scb, "frozen"
    for buffer in model.buffers():
        yield buffer, "buffer"


def release_paged_states(optimizer, cudart=None) -> int:
    """Free the paged states of a bitsandbytes optimizer that is done with; returns the bytes freed.

    bitsandbytes (0.50) allocates each paged state with cudaMallocManaged, keeps every one in its
    `GlobalPageManager` for prefetching, and has no call that frees them: a process that measures several
    runs would keep every earlier run's states on the device. So the states are dropped from the optimizer
    and the page manager, then freed with the CUDA runtime's `cudaFree` (`cudart`: the library this process
    has loaded, which bitsandbytes links). Without a runtime to call, they are left as bitsandbytes leaves them."""
    sizes = {t.data_ptr(): t.nbytes for t in optimizer_tensors(optimizer) if getattr(t, "is_paged", False)}
    if not sizes:
        return 0
    try:
        cudart = cudart or _cuda_runtime()
    except OSError:
        return 0
    optimizer.state.clear()
    manager = GlobalPageManager.get_instance()
    manager.paged_tensors = [t for t in manager.paged_tensors if t.data_ptr() not in sizes]
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # no kernel may still use them
    for pointer in sizes:
        cudart.cudaFree(ctypes.c_void_p(pointer))
    return sum(sizes.values())


def _cuda_runtime():
    """The CUDA runtime library loaded in this process (Linux: found in /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libcudart.so" in line:
                return ctypes.CDLL(line.split()[-1])
    raise OSError("no CUDA runtime library is loaded")


def optimizer_tensors(optimizer):
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def _categories(built: Built, serial) -> dict[int, str]:
    """Storage serial -> component, for the tensors that outlive the step."""
    trainable_kind = "weights" if built.method == "full" else "adapters"
    kinds = {}
    for tensor, kind in model_tensors(built.model):
        kinds[serial(tensor)] = {"trainable": trainable_kind, "frozen": "weights", "buffer": "overhead"}[kind]
        if getattr(tensor, "grad", None) is not None:
            kinds[serial(tensor.grad)] = "gradients"
    for name, param in built.model.named_parameters():  # a preference step's frozen 'ref' adapter copy
        if ".ref." in name:
            kinds[serial(param)] = "adapters"
    for tensor in optimizer_tensors(built.optimizer):
        kinds[serial(tensor)] = "optimizer"
    kinds.pop(None, None)
    return kinds


def _measure_cpu(built: Built, batch: dict, eval_batch, method: str) -> Measurement:
    tracker = PeakTracker()
    for tensor, _ in model_tensors(built.model):
        tracker.track(tensor)
    for tensor in optimizer_tensors(built.optimizer):
        tracker.track(tensor)
    for tensor in batch.values():
        tracker.track(tensor)
    with tracker:
        cycle(built, batch, tracker)
        kinds = _categories(built, tracker.serial)  # before the eval step frees the gradients
        evaluate(built, eval_batch, tracker)
    parts = dict.fromkeys(("weights", "adapters", "gradients", "optimizer", "activations", "overhead"), 0)
    for serial, size in tracker.peak_storages.items():
        parts[kinds.get(serial, "activations")] += size
    return Measurement(method, "cpu", tracker.peak, parts, dict(tracker.phase_peaks))


def _measure_cuda(built: Built, batch: dict, eval_batch, method: str) -> Measurement:
    """Peak allocated per phase; paged optimizer states (outside the allocator) are added to every phase."""
    torch.cuda.synchronize()
    paged = paged_optimizer_bytes(built.optimizer)  # the same count as a training run's metrics.json
    phases: dict[str, int] = {}
    current = {"phase": None}

    def on_phase(name):
        torch.cuda.synchronize()
        if current["phase"] is not None:
            phases[current["phase"]] = max(phases.get(current["phase"], 0), torch.cuda.max_memory_allocated() + paged)
        torch.cuda.reset_peak_memory_stats()
        current["phase"] = name

    on_phase(None)
    cycle(built, batch, on_phase=on_phase)
    grads = sum(p.grad.nbytes for p in built.model.parameters() if p.grad is not None)
    states = sum(t.nbytes for t in optimizer_tensors(built.optimizer))
    trainable = sum(p.nbytes for p in built.model.parameters() if p.requires_grad)
    buffers = sum(b.nbytes for b in built.model.buffers())
    resident = torch.cuda.memory_allocated() + paged - grads - states - buffers
    evaluate(built, eval_batch, on_phase=on_phase)
    peak = max(phases.values())
    parts = {
        "weights": resident - (0 if method == "full" else trainable),
        "adapters": 0 if method == "full" else trainable,
        "gradients": grads,
        "optimizer": states,
        "overhead": buffers,
    }
    parts["activations"] = peak - sum(parts.values())
    return Measurement(method, "cuda", peak, parts, phases)
