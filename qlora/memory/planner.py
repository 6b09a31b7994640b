"""The fit planner: which methods fit a GPU, how far sequence length and batch size can go, and
what to change when nothing fits.

Every answer is a prediction of `estimate`, so the planner and the tables cannot disagree. Peak
memory grows with sequence length, batch size and rank, so the largest value that fits is found
by bisection over the model of memory (a few dozen arithmetic estimates, no allocation).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from qlora.config.long_context import mlp_tiles_for
from qlora.config.recipe import key_field
from qlora.memory.estimate import GIB, Estimate, estimate, settings_inventory
from qlora.memory.inventory import Inventory
from qlora.memory.settings import METHODS, Settings, from_recipe

MAX_BATCH = 1024  # the batch-size search stops here: beyond it "fits" says enough
METHOD_ORDER = tuple(METHODS)  # full, lora, lora-8bit, qlora: from most memory to least

# The changes the planner may advise that are no single recipe key as it stands, per style of spelling.
OTHER_SPELLINGS = {
    "flags": {
        "checkpointing": "gradient checkpointing (drop --no-checkpointing)",
        **{m: f"--methods {m}" for m in METHODS},
    },
    "recipe": {
        "checkpointing": "training.gradient_checkpointing=true",
        "full": "full fine-tuning",
        "lora": "quantization.bits=none (16-bit LoRA)",
        "lora-8bit": "quantization.bits=8",
        "qlora": "quantization.bits=4 (QLoRA)",
        "gpus": "{0} processes (torchrun --nproc_per_node {0})",
    },
}


def spellings(style: str) -> dict[str, str]:
    """How each change the planner may advise is spelled where the user makes it: `qlora profile`'s flags
    ('flags'; a key without a flag is named as a recipe key) or recipe keys ('recipe'), from the schema."""
    spelled = {}
    for f in dataclasses.fields(Settings):
        dotted = f.metadata.get("recipe_key")
        if dotted is None:
            continue
        flag = key_field(dotted).metadata["flag"]
        if style == "recipe":
            spelled[f.name] = f"{dotted}={{}}"
        else:
            spelled[f.name] = f"{flag} {{}}" if flag else f"{dotted}={{}} (recipe key)"
    return {**spelled, **OTHER_SPELLINGS[style]}


@dataclass(frozen=True)
class MethodFit:
    """One method against one GPU: the prediction at the chosen settings and the largest that fit."""

    estimate: Estimate
    gpu_bytes: int
    max_seq_len: int  # largest at the chosen batch size (0: not even one token)
    max_batch_size: int  # largest at the chosen sequence length (0: not even one sequence)
    seq_len_limit: int  # the search's upper end: the model's context length

    @property
    def method(self) -> str:
        return self.estimate.method

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.gpu_bytes

    def to_dict(self) -> dict:
        return {
            "gpu_bytes": self.gpu_bytes,
            "fits": self.fits,
            "max_seq_len": self.max_seq_len,
            "max_batch_size": self.max_batch_size,
        }


@dataclass(frozen=True)
class FitPlan:
    """Every requested method of one model against one GPU, with advice in the user's own keys."""

    model: str
    gpu_bytes: int
    settings: Settings
    methods: tuple[MethodFit, ...]
    remedies: dict[str, list[str]]  # method -> the changes that make it fit, spelled as flags or recipe keys

    def advice(self) -> list[str]:
        """One line per method (fits or not, limits), then indented changes that make it fit."""
        lines = []
        for fit in self.methods:
            lines.append(self._summary(fit))
            lines += [f"  - {remedy}" for remedy in self.remedies.get(fit.method, [])]
        return lines

    def _summary(self, fit: MethodFit) -> str:
        s = self.settings
        head = f"{self.model} {fit.method}: predicted peak {gib(fit.estimate.total)} of {gib(self.gpu_bytes)}"
        if s.gpus > 1:
            host = sum(fit.estimate.host_bytes.values())
            head += f" per GPU ({s.gpus} × {s.strategy}{', host RAM ' + gib(host) if host else ''})"
        if not fit.fits:
            return f"{head}: does not fit"
        seq = f"{fit.max_seq_len:,}" + (" (the model's context)" if fit.max_seq_len >= fit.seq_len_limit else "")
        batch = f"{fit.max_batch_size:,}" + (" or more" if fit.max_batch_size >= MAX_BATCH else "")
        host = sum(fit.estimate.host_bytes.values())
        host_ram = f" (and {gib(host)} of host RAM for the offloaded layer inputs)" if host else ""
        return (
            f"{head}{host_ram}: fits; longest sequence {seq} at batch {s.batch_size}, "
            f"largest batch {batch} at sequence {s.seq_len:,}"
        )


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def largest(fits: Callable[[int], bool], limit: int) -> int:
    """The largest n in [1, limit] with fits(n), or 0; `fits` must be monotone (true, then false)."""
    if not fits(1):
        return 0
    if fits(limit):
        return limit
    low, high = 1, limit  # fits(low) and not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def predict(inv: Inventory, method: str, settings: Settings, gpu_bytes: int) -> Estimate:
    """`estimate`, with the `auto` keys resolved as the trainer resolves them: `training.gradient_checkpointing`
    the fewest layers that fit `gpu_bytes`, `training.offload_checkpoints` offloaded only when the run does
    not fit otherwise."""
    if settings.checkpointing and settings.checkpoint_layers == "auto":
        settings = settings.replace(checkpoint_layers=fewest_checkpointed_layers(inv, method, settings, gpu_bytes))
    if settings.offload_checkpoints != "auto":
        return estimate(inv, method, settings)
    kept = estimate(inv, method, settings.replace(offload_checkpoints=False))
    return kept if kept.total <= gpu_bytes else estimate(inv, method, settings.replace(offload_checkpoints=True))


def fit_method(inv: Inventory, method: str, settings: Settings, gpu_bytes: int) -> MethodFit:
    """`method` at `settings` against `gpu_bytes`, with the largest sequence length and batch size that fit."""
    within = lambda **change: predict(inv, method, settings.replace(**change), gpu_bytes).total <= gpu_bytes
    limit = inv.dims.max_positions
    return MethodFit(
        estimate=predict(inv, method, settings, gpu_bytes),
        gpu_bytes=gpu_bytes,
        max_seq_len=largest(lambda n: within(seq_len=n), limit),
        max_batch_size=largest(lambda n: within(batch_size=n), MAX_BATCH),
        seq_len_limit=limit,
    )


def fewest_checkpointed_layers(inv: Inventory, method: str, settings: Settings, gpu_bytes: int) -> int:
    """The fewest (first) decoder layers to checkpoint for the step to fit `gpu_bytes`; all of them when even
    that does not fit. Every layer not checkpointed is a layer's forward not recomputed: the speed a card's
    spare memory buys."""
    layers = inv.dims.layers
    fits = lambda n: predict(inv, method, settings.replace(checkpoint_layers=n), gpu_bytes).total <= gpu_bytes
    if not fits(layers):
        return layers
    low, high = -1, layers  # the peak falls as layers are checkpointed: not fits(low), fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def remedies(inv: Inventory, fit: MethodFit, keys: dict[str, str], tried: set[str]) -> list[str]:
    """What would make a method that does not fit fit, in the order a user would try them: a
    shorter sequence, a smaller batch, gradient checkpointing, an 8-bit optimizer, a lower rank, and
    a more frugal method that is not already in the plan; a combination when no single change is enough."""
    if fit.fits:
        return []
    s, k, method, gpu = fit.estimate.settings, keys, fit.method, fit.gpu_bytes
    out = []
    if fit.max_seq_len:
        out.append(f"fits with {k['seq_len'].format(fit.max_seq_len)} (at batch {s.batch_size})")
    if fit.max_batch_size:
        out.append(
            f"fits with {k['batch_size'].format(fit.max_batch_size)} (at sequence {s.seq_len}; "
            "raise gradient accumulation to keep the effective batch)"
        )
    elif s.batch_size > 1:  # one sequence per step, accumulated, keeps far more of the length
        within = lambda n: estimate(inv, method, s.replace(batch_size=1, seq_len=n)).total <= gpu
        longest = largest(within, fit.seq_len_limit)
        if longest > fit.max_seq_len:
            out.append(
                f"fits with {k['batch_size'].format(1)} and {k['seq_len'].format(longest)} "
                "(raise gradient accumulation to keep the effective batch)"
            )
    predicted = lambda m, **change: estimate(inv, m, s.replace(**change)).total
    changes = []  # (how the user spells it, predicted peak after it)
    if fit.estimate.phase == "eval" and s.eval_batch > 1:  # the eval step is the peak: a smaller eval batch
        evals = largest(lambda n: predicted(method, eval_batch_size=n) <= gpu, s.eval_batch - 1)
        if evals:
            changes.append((k["eval_batch_size"].format(evals), predicted(method, eval_batch_size=evals)))
    if s.loss != "chunked" and s.task == "causal_lm":  # the vocabulary-sized logits are often the largest term
        changes.append((k["loss"].format("chunked"), predicted(method, loss="chunked")))
    if not s.checkpointing:
        changes.append((k["checkpointing"], predicted(method, checkpointing=True)))
    if not s.optimizer.endswith("8bit"):
        eight = "paged_adamw_8bit" if s.optimizer.startswith("paged") else "adamw_8bit"
        changes.append((k["optimizer"].format(eight), predicted(method, optimizer=eight)))
    if method != "full" and s.rank > 1:
        rank = largest(lambda r: predicted(method, rank=r) <= gpu, s.rank - 1)
        if rank:
            changes.append((k["rank"].format(rank), predicted(method, rank=rank)))
    for other in METHOD_ORDER[METHOD_ORDER.index(method) + 1 :]:
        if other not in tried:
            changes.append((k[other], predicted(other)))
    out += [f"fits with {change}: {gib(peak)}" for change, peak in changes if peak <= gpu]
    lc = long_context_changes(inv, method, s, gpu, k)
    if lc and lc[1] <= gpu:
        out.append(f"fits with {lc[0]}: {gib(lc[1])}")
    if s.gpus > 1:
        out += sharding_remedies(inv, method, s, gpu, k)
    return out or [combined(inv, method, s, gpu, k)]


def long_context_keys(inv: Inventory, method: str, s: Settings, k: dict[str, str]) -> tuple[dict, list[str]]:
    """The long-context keys `s` does not use yet: offloaded checkpoints, no LoRA dropout (it keeps a
    mask and a copy of every adapter's input), the tiled MLP (as many tiles as `auto` picks at `s`'s
    length). Returns the settings changes and how the user spells them."""
    changes, spelled = {}, []
    if s.checkpointing and s.offload_checkpoints is not True:
        changes["offload_checkpoints"] = True
        spelled.append(k["offload_checkpoints"].format("true"))
    if method != "full" and s.lora_dropout > 0:
        changes["lora_dropout"] = 0.0
        spelled.append(k["lora_dropout"].format(0))
    tiles = mlp_tiles_for("auto", s.batch_size * s.seq_len, inv.dims.hidden, s.strategy)
    if s.mlp_tiles != "auto" and tiles > s.mlp_tiles:
        changes["mlp_tiles"] = "auto"
        spelled.append(k["mlp_tiles"].format(tiles))
    return changes, spelled


def long_context_changes(
    inv: Inventory, method: str, s: Settings, gpu: int, k: dict[str, str]
) -> tuple[str, int] | None:
    """The long-context keys not yet in use, spelled together, and the predicted peak with all of them."""
    changes, spelled = long_context_keys(inv, method, s, k)
    return (", ".join(spelled), predict(inv, method, s.replace(**changes), gpu).total) if changes else None


def reach(inv: Inventory, fit: MethodFit, keys: dict[str, str]) -> list[str]:
    """How much longer a sequence the long-context keys not yet in use allow (one line, or none)."""
    s, method, gpu = fit.estimate.settings, fit.method, fit.gpu_bytes
    changes, _ = long_context_keys(inv, method, s, keys)
    if s.mlp_tiles != "auto":
        changes["mlp_tiles"] = "auto"  # as many tiles as each length needs
    if not changes:
        return []
    longest = largest(
        lambda n: predict(inv, method, s.replace(seq_len=n, **changes), gpu).total <= gpu, fit.seq_len_limit
    )
    if longest <= fit.max_seq_len:
        return []
    _, spelled = long_context_keys(inv, method, s.replace(seq_len=longest), keys)
    host = sum(predict(inv, method, s.replace(seq_len=longest, **changes), gpu).host_bytes.values())
    return [
        f"longest sequence {longest:,} at batch {s.batch_size} with {', '.join(spelled)}"
        + (f" (host RAM for the offloaded layer inputs: {gib(host)})" if host else "")
    ]


def combined(inv: Inventory, method: str, s: Settings, gpu: int, k: dict[str, str]) -> str:
    """When no single change is enough: QLoRA with checkpointing and 8-bit AdamW, at the largest
    rank that fits, else rank 1 at the longest sequence that fits one per batch, else nothing."""
    frugal = s.replace(checkpointing=True, optimizer="paged_adamw_8bit", loss="chunked")
    spelled = ([] if method == "qlora" else [k["qlora"]]) + [k["optimizer"].format(frugal.optimizer)]
    spelled += [] if s.loss == "chunked" or s.task != "causal_lm" else [k["loss"].format("chunked")]
    spelled += [] if s.checkpointing else [k["checkpointing"]]
    rank = largest(lambda r: estimate(inv, "qlora", frugal.replace(rank=r)).total <= gpu, s.rank)
    if rank:
        peak = estimate(inv, "qlora", frugal.replace(rank=rank)).total
        return f"fits with {', '.join(spelled + ([k['rank'].format(rank)] if rank < s.rank else []))}: {gib(peak)}"
    tiny = frugal.replace(rank=1, batch_size=1)
    seq = largest(lambda n: estimate(inv, "qlora", tiny.replace(seq_len=n)).total <= gpu, s.seq_len)
    if seq:
        peak = estimate(inv, "qlora", tiny.replace(seq_len=seq)).total
        changes = spelled + [k["rank"].format(1), k["batch_size"].format(1), k["seq_len"].format(seq)]
        return f"fits with {', '.join(changes)}: {gib(peak)}"
    floor = estimate(inv, "qlora", tiny.replace(seq_len=1)).total
    return (
        f"nothing fits {gib(gpu)}: even QLoRA at batch 1, one token, rank 1 and 8-bit AdamW needs {gib(floor)}; "
        "use a GPU with more memory or a smaller model"
    )


# --- how many GPUs (--gpus auto) and what makes a sharded step fit ------------------------------------

MAX_GPUS = 16  # the card search stops here (two 8-GPU nodes)
SEARCH = (("ddp", "none"), ("zero3", "none"), ("fsdp", "none"), ("zero3", "cpu"), ("fsdp", "cpu"))


@dataclass(frozen=True)
class CardPlan:
    """The fewest GPUs of one size that hold a step with one strategy."""

    strategy: str
    offload: str
    gpus: int  # 0: no number up to MAX_GPUS fits
    estimate: object | None

    def line(self, gpu_bytes: int) -> str:
        name = self.strategy + (" + CPU offload" if self.offload == "cpu" else "")
        if not self.gpus:
            why = " (each GPU holds a whole replica)" if self.strategy == "ddp" else ""
            return f"{name}: does not fit on up to {MAX_GPUS} GPUs of {gpu_bytes / 2**30:.2f} GiB{why}"
        host = sum(self.estimate.host_bytes.values())
        ram = f", host RAM {host / 2**30:.1f} GiB" if host else ""
        gpus = f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}"
        return f"{name}: {gpus}, {self.estimate.total / 2**30:.2f} GiB per GPU{ram}"

    def to_dict(self) -> dict:
        if not self.gpus:
            return {"strategy": self.strategy, "offload": self.offload, "gpus": None}
        return {
            "strategy": self.strategy,
            "offload": self.offload,
            "gpus": self.gpus,
            "per_gpu_bytes": self.estimate.total,
            "host_ram_bytes": sum(self.estimate.host_bytes.values()),
        }


def cards_needed(inv, method: str, settings, gpu_bytes: int) -> list[CardPlan]:
    """For each strategy, the fewest GPUs of `gpu_bytes` that hold one step (DDP: one, or none: a replica never
    shrinks).
    """
    plans = []
    for strategy, offload in SEARCH:
        if method == "lora-8bit" and strategy != "ddp":
            continue
        counts = [1] if strategy == "ddp" else range(2, MAX_GPUS + 1)
        found = CardPlan(strategy, offload, 0, None)
        for n in counts:
            est = estimate(inv, method, settings.replace(gpus=n, strategy=strategy, offload=offload))
            if est.total <= gpu_bytes:
                found = CardPlan(strategy, offload, n, est)
                break
        plans.append(found)
    return sorted(plans, key=lambda p: (not p.gpus, p.gpus, sum(p.estimate.host_bytes.values()) if p.gpus else 0))


def sharding_remedies(inv, method: str, settings, gpu_bytes: int, keys: dict[str, str]) -> list[str]:
    """What makes a step on several GPUs fit: CPU offload, the other sharding strategy (or one instead of
    DDP), more GPUs."""
    out = []
    predicted = lambda **change: estimate(inv, method, settings.replace(**change))
    options = []
    if settings.strategy == "ddp" and method != "lora-8bit":
        options += [{"strategy": "fsdp"}, {"strategy": "zero3"}, {"strategy": "fsdp", "offload": "cpu"}]
    elif settings.strategy != "ddp":
        other = "fsdp" if settings.strategy == "zero3" else "zero3"
        options += (
            [{"offload": "cpu"}, {"strategy": other}, {"strategy": other, "offload": "cpu"}]
            if settings.offload == "none"
            else [{"strategy": other}]
        )
    for change in options:
        est = predicted(**change)
        if est.total <= gpu_bytes:
            host = sum(est.host_bytes.values())
            spelled = ", ".join(keys[k].format(v) for k, v in change.items())
            out.append(
                f"fits with {spelled}: {est.total / 2**30:.2f} GiB per GPU"
                + (f", host RAM {host / 2**30:.1f} GiB" if host else "")
            )
    if settings.strategy != "ddp":
        more = next((n for n in range(settings.gpus + 1, MAX_GPUS + 1) if predicted(gpus=n).total <= gpu_bytes), None)
        if more:
            est, host = predicted(gpus=more), sum(predicted(gpus=more).host_bytes.values())
            out.append(
                f"fits with {keys['gpus'].format(more)}: {est.total / 2**30:.2f} GiB per GPU"
                + (f", host RAM {host / 2**30:.1f} GiB" if host else "")
            )
    return out


def plan(model: str | Inventory, methods, settings: Settings, gpu_bytes: int, spelling: str = "flags") -> FitPlan:
    """Fit every method of `methods` on `model` into `gpu_bytes`; advice spelled as `spellings(spelling)`."""
    inv = settings_inventory(model, settings)
    keys = spellings(spelling)
    fits = tuple(fit_method(inv, m, settings, gpu_bytes) for m in methods)
    tried = set(methods)
    return FitPlan(
        inv.name,
        gpu_bytes,
        settings,
        fits,
        {f.method: remedies(inv, f, keys, tried) + reach(inv, f, keys) for f in fits},
    )


def plan_fit(recipe, gpu_bytes: int) -> FitPlan:
    """The fit plan of what `recipe` trains, on a GPU of `gpu_bytes`, advice in recipe keys."""
    model, method, settings = from_recipe(recipe)
    return plan(model, (method,), settings, gpu_bytes, "recipe")
