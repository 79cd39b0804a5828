"""QLoRA multi-task trainer: one adapter on the union of a group's tasks.

One task per batch, tasks interleaved (a seeded shuffle of the per-task batches, re-drawn every
epoch); loss = answer-token cross-entropy over the full vocabulary at the answer position; AdamW
over the LoRA tensors only; evaluation on the validation split after every epoch; the best epoch
(mean validation accuracy over the tasks, ties broken by lower mean validation loss) is restored;
early stopping after `patience` epochs without improvement. Every random choice is seeded.

`train_adapter` attaches a fresh seeded LoRA (A from the seed, B = 0) to `base.model` as a named
adapter, trains it, extracts its tensors (PEFT state-dict keys, on CPU) and removes it again, so the
same loaded base serves the next group. The same loop (`fit_lora`) trains boosting weak learners with
another loss and another selection score.
"""

from __future__ import annotations

import copy
import random
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from shared.ml.data import subsample
from shared.ml.encoding import DEFAULT_MAX_LENGTH, Batch, BoundTask, Encoded, bind, collate, encode_examples
from shared.ml.evaluate import TaskMetrics, TaskScores, metrics_from_scores, score_task
from shared.ml.models import DEFAULT_TARGETS, Base, answer_logits, attach_lora
from shared.ml.progress import Progress, silent
from shared.ml.tasks.base import Example, Task
from shared.ml.training.costs import Cost, Meter, ModelShape
from shared.ml.training.dequant import dequantized_base

TaskLike = str | Task


# ------------------------------------------------------------------------------------ config access


def cfg(config: Any, key: str, default: Any = None) -> Any:
    """A knob from a TrainingParams, a dict or any object with attributes (TrainingParams-like)."""
    if isinstance(config, dict):
        return config.get(key, default)
    return getattr(config, key, default)


@dataclass(frozen=True)
class LoopKnobs:
    """The knobs every training loop reads the same way from a config, with the trainer's defaults."""

    batch_size: int
    max_length: int
    patience: Any
    rank: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float
    weight_decay: float
    max_grad_norm: Any


def loop_knobs(config: Any) -> LoopKnobs:
    """The LoopKnobs of a config."""
    return LoopKnobs(
        batch_size=int(cfg(config, "batch_size", 8)),
        max_length=int(cfg(config, "max_length", DEFAULT_MAX_LENGTH)),
        patience=cfg(config, "patience"),
        rank=int(cfg(config, "rank", 4)),
        alpha=lora_alpha(config),
        targets=tuple(cfg(config, "targets", DEFAULT_TARGETS)),
        dropout=float(cfg(config, "dropout", 0.0)),
        weight_decay=float(cfg(config, "weight_decay", 0.0)),
        max_grad_norm=cfg(config, "max_grad_norm", 1.0),
    )


def lora_alpha(config: Any) -> float:
    alpha = cfg(config, "alpha")
    return float(alpha) if alpha is not None else 8.0 * int(cfg(config, "rank", 4))


# ------------------------------------------------------------------------------------------- data


@dataclass
class TaskData:
    """One task bound to the tokenizer, with the (subsampled) examples of each split and their encodings."""

    name: str
    bound: BoundTask
    train: list[Example]
    val: list[Example]
    test: list[Example]
    encoded: dict[str, list[Encoded]] = field(default_factory=dict)

    def split(self, name: str) -> list[Example]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def encodings(self, split: str, tokenizer: Any, max_length: int) -> list[Encoded]:
        if split not in self.encoded:
            self.encoded[split] = encode_examples(self.bound, self.split(split), tokenizer, max_length)
        return self.encoded[split]

    def lengths(self, split: str, tokenizer: Any, max_length: int) -> list[int]:
        return [len(e.input_ids) for e in self.encodings(split, tokenizer, max_length)]


def resolve_task(task: TaskLike) -> Task:
    if isinstance(task, Task):
        return task
    from shared.ml.tasks.registry import get_task

    return get_task(task)


def prepare_tasks(tokenizer: Any, tasks: Sequence[TaskLike], config: Any) -> dict[str, TaskData]:
    """Bind tasks and take the seeded stratified subsamples (max_train / max_val / max_test per task)."""
    seed = int(cfg(config, "seed", 0))
    out: dict[str, TaskData] = {}
    for item in tasks:
        task = resolve_task(item)
        bound = bind(task, tokenizer)
        train = subsample(task.split("train"), cfg(config, "max_train"), seed)
        val = subsample(task.split("val"), cfg(config, "max_val"), seed)
        test = subsample(task.split("test"), cfg(config, "max_test"), seed)
        if not train:
            raise ValueError(f"task {task.name!r} has no training examples")
        if not val:
            raise ValueError(f"task {task.name!r} has no validation examples")
        out[task.name] = TaskData(task.name, bound, train, val, test)
    return out


BATCHINGS = ("task", "mixed", "length")
LENGTH_POOL = 64  # "length" batching sorts pools of this many batches' rows by length before cutting them


def epoch_plan(
    lengths: Mapping[str, Sequence[int]],
    batch_size: int,
    seed: int,
    epoch: int,
    batching: str = "mixed",
    batch_tokens: int | None = None,
) -> list[list[tuple[str, int]]]:
    """The training batches of one epoch as (task, row index) lists. Deterministic for (seed, epoch).

    "task": one task per batch, tasks interleaved: shuffle each task's rows, cut into batches of
    `batch_size`, shuffle the batches of all tasks together (`batch_tokens` is not used).
    "mixed": tasks mixed, as a plain shuffled loop does: shuffle all rows, cut into batches of `batch_size`.
    "length": tasks mixed: shuffle all rows, sort pools of LENGTH_POOL * batch_size rows by length and cut
    them into batches of at most `batch_size` rows and (when set) `batch_tokens` padded tokens, then shuffle
    the batches (less padding; a row longer than the cap gets a batch of its own)."""
    if batching not in BATCHINGS:
        raise ValueError(f"unknown batching {batching!r}; expected one of {BATCHINGS}")
    rng = random.Random(seed * 1_000_003 + epoch)
    out: list[list[tuple[str, int]]] = []
    if batching == "task":
        for name in sorted(lengths):
            items = [(name, i) for i in range(len(lengths[name]))]
            rng.shuffle(items)
            out.extend(items[i : i + batch_size] for i in range(0, len(items), batch_size))
    elif batching == "mixed":
        items = [(name, i) for name in sorted(lengths) for i in range(len(lengths[name]))]
        rng.shuffle(items)
        out.extend(items[i : i + batch_size] for i in range(0, len(items), batch_size))
    else:
        items = [(name, i) for name in sorted(lengths) for i in range(len(lengths[name]))]
        rng.shuffle(items)
        pool = LENGTH_POOL * batch_size
        for start in range(0, len(items), pool):
            chunk = sorted(items[start : start + pool], key=lambda it: lengths[it[0]][it[1]])
            cur: list[tuple[str, int]] = []
            for it in chunk:
                n = lengths[it[0]][it[1]]
                if cur and (len(cur) >= batch_size or (batch_tokens is not None and (len(cur) + 1) * n > batch_tokens)):
                    out.append(cur)
                    cur = []
                cur.append(it)
            if cur:
                out.append(cur)
    rng.shuffle(out)
    return out


def epoch_batches(
    encoded: dict[str, list[Encoded]],
    batch_size: int,
    seed: int,
    epoch: int,
    pad_id: int = 0,
    batching: str = "mixed",
    batch_tokens: int | None = None,
) -> list[Batch]:
    """The collated batches of `epoch_plan` (default: rows of all tasks shuffled together). Example ids
    travel in the batch."""
    lengths = {t: [len(e.input_ids) for e in v] for t, v in encoded.items()}
    plan = epoch_plan(lengths, batch_size, seed, epoch, batching, batch_tokens)
    return [collate([encoded[t][i] for t, i in b], pad_id) for b in plan]


def batching_of(config: Any) -> tuple[str, int | None]:
    """(batching, batch_tokens) of a config (default: mixed batches, no token cap; TrainingParams.batching)."""
    batching = str(cfg(config, "batching", None) or "mixed")
    tokens = cfg(config, "batch_tokens", None)
    return batching, (int(tokens) if tokens is not None else None)


# ------------------------------------------------------------------------------------ adapter state

_ADAPTER_KEY = re.compile(r"\.(lora_[AB]|lora_embedding_[AB])\.[^.]+\.weight$")


def canonical_state(state: dict[str, torch.Tensor], adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """Keys in PEFT's saved form (`...q_proj.lora_A.weight`), from either that form or the live form
    (`...q_proj.lora_A.<adapter>.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = _ADAPTER_KEY.sub(r".\1.weight", key) if (adapter_name is None or f".{adapter_name}." in key) else key
        out[new] = value
    return out


def extract_state(model: Any, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's LoRA tensors in PEFT's saved form, detached copies on CPU (float32)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def load_state(model: Any, adapter_name: str, state: dict[str, torch.Tensor]) -> None:
    """Copy LoRA tensors (saved or live key form) into the named adapter; every key must land."""
    from peft import set_peft_model_state_dict

    canon = canonical_state(state)
    expected = set(extract_state_keys(model, adapter_name))
    unknown = sorted(set(canon) - expected)
    missing = sorted(expected - set(canon))
    if unknown or missing:
        raise ValueError(
            f"adapter state does not fit adapter {adapter_name!r}: "
            f"{len(unknown)} unexpected keys (e.g. {unknown[:2]}), {len(missing)} missing (e.g. {missing[:2]})"
        )
    set_peft_model_state_dict(model, canon, adapter_name=adapter_name)
    # set_peft_model_state_dict copies into the existing parameters; keep them float32
    for pname, param in model.named_parameters():
        if "lora_" in pname and f".{adapter_name}." in pname and param.dtype != torch.float32:
            param.data = param.data.float()


def extract_state_keys(model: Any, adapter_name: str) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(model, adapter_name=adapter_name))


def peft_config_dict(config: Any) -> dict[str, Any]:
    """A PEFT config as the JSON dict written to adapter_config.json (sets -> sorted lists, enums -> values)."""
    import enum

    raw = config.to_dict()

    def clean(value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value.value
        if isinstance(value, (set, frozenset)):
            return sorted(clean(v) for v in value)
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    out = clean(raw)
    out["inference_mode"] = True
    return out


def trainable_4bit(model: Any) -> int:
    """Keep bitsandbytes 4-bit layers in their differentiable layout, for good. Returns layers changed.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weights into an inference-only layout
    at the first eval-mode, no-grad forward. That layout runs `gemv_4bit`, which has no backward (the
    gradients through the frozen base are silently dropped), and packing -> unpacking is lossy (the
    double-quantised absmax is re-encoded), so the base would drift a little with every train/eval cycle.
    We undo a packing that already happened (once) and switch packing off on this model, so training,
    validation and evaluation all run the same numerics. (CUDA is unaffected.)"""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    changed = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight: Any = module.weight  # a bitsandbytes Params4bit: carries quant_state
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            changed += 1
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


@contextmanager
def temporary_adapter(
    base: Base,
    name: str,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    dropout: float,
    seed: int,
    init_state: dict[str, torch.Tensor] | None = None,
) -> Iterator[Any]:
    """A fresh seeded LoRA attached to `base.model` as adapter `name`, active and trainable inside the
    block; removed afterwards (the base model is left as it was: plain, or a PeftModel with its
    previous adapters and active adapter)."""
    from peft import PeftModel

    original = base.model
    was_peft = isinstance(original, PeftModel)
    prev_active = original.active_adapter if was_peft else None
    prev_flags = {n: p.requires_grad for n, p in original.named_parameters()} if was_peft else {}
    if was_peft and name in original.peft_config:
        raise ValueError(f"adapter name {name!r} is already loaded on the base model")
    pm = attach_lora(
        original, rank=rank, alpha=alpha, targets=tuple(targets), dropout=dropout, seed=seed, adapter_name=name
    )
    try:
        pm.set_adapter(name)
        if init_state is not None:
            load_state(pm, name, init_state)
        for pname, param in pm.named_parameters():
            param.requires_grad_("lora_" in pname and f".{name}." in pname)
        yield pm
    finally:
        pm.eval()
        if was_peft:
            with warnings.catch_warnings():  # "adapter X was active which is now deleted": expected
                warnings.simplefilter("ignore", UserWarning)
                pm.delete_adapter(name)
            remaining = list(pm.peft_config)
            if prev_active in remaining:
                pm.set_adapter(prev_active)
            for pname, param in pm.named_parameters():
                param.requires_grad_(prev_flags.get(pname, False))
        else:
            restored = pm.unload()
            base.model = restored
            restored.requires_grad_(False)
            restored.eval()


# ---------------------------------------------------------------------------------------- results


@dataclass
class TrainedAdapter:
    """A trained adapter, detached from the base: LoRA tensors (PEFT saved-key form, CPU float32)."""

    name: str
    tasks: list[str]
    state: dict[str, torch.Tensor]
    val_metrics: dict[str, TaskMetrics]
    history: list[dict[str, Any]]
    best_epoch: int
    cost: Cost
    peft_config: dict[str, Any] = field(default_factory=dict)
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def train_accuracy(self) -> dict[str, float]:
        """Per-task running training accuracy of the best epoch (argmax over the choices, measured on the
        training forward passes of that epoch; empty for losses that do not report it)."""
        for entry in self.history:
            if entry["epoch"] == self.best_epoch:
                return dict(entry.get("train") or {})
        return {}

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tasks": list(self.tasks),
            "best_epoch": self.best_epoch,
            "val_metrics": {t: m.to_dict() for t, m in self.val_metrics.items()},
            "val_accuracy": mean([m.accuracy for m in self.val_metrics.values()]),
            "history": self.history,
            "cost": self.cost.to_dict(),
            **self.extra,
        }


def mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


# -------------------------------------------------------------------------------------- the loop

LossFn = Callable[[Any, Batch], Any]  # -> loss, or (loss, rows correct)
# evaluate(model, cost) -> (score to maximise (tuple), history fields, per-task val metrics)
EvalFn = Callable[[Any, Cost], tuple[tuple[float, ...], dict[str, Any], dict[str, TaskMetrics]]]


@dataclass(frozen=True)
class _FitPlan(LoopKnobs):
    """What one fit_lora run trains with: its resolved knobs and encoded training rows."""

    seed: int
    epochs: int
    lr: float
    batching: str
    batch_tokens: int | None
    stage: str
    pad_id: int
    shape: ModelShape
    encoded: dict[str, list[Encoded]]
    per_epoch: int  # batches per epoch ("length": epoch 1's count)


@dataclass(frozen=True)
class _EpochStats:
    """One training epoch's running figures; `done` counts the batches of the whole run so far."""

    loss_sum: float
    rows: int
    correct: dict[str, int]
    seen: dict[str, int]
    done: int


@dataclass(frozen=True)
class _FitOutcome:
    """The epochs' history and the best epoch (its number, LoRA state and validation metrics)."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    best_metrics: dict[str, TaskMetrics]


def _fit_plan(
    base: Base,
    data: dict[str, TaskData],
    config: Any,
    *,
    name: str,
    lr: float | None,
    epochs: int | None,
    seed: int | None,
    stage: str | None,
    batching: str | None,
) -> _FitPlan:
    """The knobs of a fit_lora call (arguments over the config over the defaults) and its training rows."""
    seed = int(cfg(config, "seed", 0) if seed is None else seed)
    epochs = int(epochs or cfg(config, "epochs", 3))
    lr = float(lr or cfg(config, "lr", 5e-4))
    knobs = loop_knobs(config)
    batching_cfg, batch_tokens = batching_of(config)
    batching = batching or batching_cfg
    tokenizer = base.tokenizer
    shape = ModelShape.from_model(base.model, knobs.rank, knobs.targets)
    encoded = {t: d.encodings("train", tokenizer, knobs.max_length) for t, d in data.items()}
    lengths = {t: [len(e.input_ids) for e in v] for t, v in encoded.items()}
    return _FitPlan(
        **vars(knobs),
        seed=seed,
        epochs=epochs,
        lr=lr,
        batching=batching,
        batch_tokens=batch_tokens,
        stage=stage or f"train {name}",
        pad_id=tokenizer.pad_token_id or 0,
        shape=shape,
        encoded=encoded,
        per_epoch=len(epoch_plan(lengths, knobs.batch_size, seed, 1, batching, batch_tokens)),
    )


def _train_epoch(
    model: Any,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    plan: _FitPlan,
    meter: Meter,
    epoch: int,
    done: int,
    *,
    name: str,
    device: torch.device,
    loss_fn: LossFn,
    progress: Progress,
) -> _EpochStats:
    """One epoch of optimizer steps over the seeded batch order; raises on a non-finite loss."""
    model.train()
    loss_sum, rows = 0.0, 0
    correct: dict[str, int] = {}
    seen: dict[str, int] = {}
    total = plan.epochs * plan.per_epoch
    batches = epoch_batches(
        plan.encoded, plan.batch_size, plan.seed, epoch, plan.pad_id, plan.batching, plan.batch_tokens
    )
    for batch in batches:
        batch = batch.to(device)
        out = loss_fn(model, batch)
        loss, hits = out if isinstance(out, tuple) else (out, None)
        if not torch.isfinite(loss):
            raise RuntimeError(
                f"adapter {name!r}: training loss became {loss.item()} at epoch {epoch}; lower the learning rate ({plan.lr})"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if plan.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, float(plan.max_grad_norm))
        optimizer.step()
        meter.cost.add_train(plan.shape, batch.attention_mask)
        loss_sum += float(loss.detach()) * len(batch)
        rows += len(batch)
        if hits is not None:
            per_task = hits if isinstance(hits, dict) else {batch.tasks[0]: int(hits)}
            for task, n in per_task.items():
                correct[task] = correct.get(task, 0) + int(n)
            for task in batch.tasks:
                seen[task] = seen.get(task, 0) + 1
        done += 1
        progress(plan.stage, done, total, f"epoch {epoch} loss {loss_sum / rows:.4f}")
    return _EpochStats(loss_sum, rows, correct, seen, done)


def _fit_epochs(
    model: Any,
    params: list[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    plan: _FitPlan,
    meter: Meter,
    *,
    name: str,
    device: torch.device,
    loss_fn: LossFn,
    evaluate_fn: EvalFn,
    progress: Progress,
) -> _FitOutcome:
    """Train and evaluate epoch by epoch, keeping the best-scoring epoch and stopping after `patience` epochs
    without improvement."""
    history: list[dict[str, Any]] = []
    best: tuple[tuple[float, ...], int, dict[str, torch.Tensor], dict[str, TaskMetrics]] | None = None
    since_best = 0
    done = 0
    total = plan.epochs * plan.per_epoch
    for epoch in range(1, plan.epochs + 1):
        start = time.perf_counter()
        stats = _train_epoch(
            model,
            params,
            optimizer,
            plan,
            meter,
            epoch,
            done,
            name=name,
            device=device,
            loss_fn=loss_fn,
            progress=progress,
        )
        done = stats.done
        model.eval()
        score, fields, metrics = evaluate_fn(model, meter.cost)
        train_acc = {t: stats.correct[t] / stats.seen[t] for t in stats.seen}
        entry = {
            "epoch": epoch,
            "train_loss": stats.loss_sum / max(stats.rows, 1),
            **fields,
            **({"train_accuracy": mean(list(train_acc.values())), "train": train_acc} if train_acc else {}),
            "seconds": round(time.perf_counter() - start, 3),
        }
        history.append(entry)
        if best is None or score > best[0]:
            best = (score, epoch, extract_state(model, name), copy.deepcopy(metrics))
            since_best = 0
        else:
            since_best += 1
            if plan.patience and since_best >= int(plan.patience):
                break
    if done < total:  # stopped early: close the bar
        progress(plan.stage, total, total, f"stopped early; best epoch {best[1] if best else '-'}")
    assert best is not None
    _, best_epoch, best_state, best_metrics = best
    return _FitOutcome(history, best_epoch, best_state, best_metrics)


def hyperparameters(
    config: Any,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int,
    rank: int,
    alpha: float,
    targets: Sequence[str],
    dropout: float,
    weight_decay: float,
    max_grad_norm: Any,
    patience: Any,
    max_length: int,
    batching: str,
    batch_tokens: int | None,
) -> dict[str, Any]:
    """A trained adapter's recorded hyperparameters (the same keys, in the same order, for every trainer)."""
    return {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "rank": rank,
        "alpha": alpha,
        "targets": list(targets),
        "dropout": dropout,
        "weight_decay": weight_decay,
        "max_grad_norm": max_grad_norm,
        "patience": patience,
        "seed": seed,
        "max_length": max_length,
        "max_train": cfg(config, "max_train"),
        "max_val": cfg(config, "max_val"),
        "optimizer": "adamw",
        **({"batching": batching, "batch_tokens": batch_tokens} if batching != "task" else {}),
    }


def fit_lora(
    base: Base,
    data: dict[str, TaskData],
    config: Any,
    *,
    name: str,
    loss_fn: LossFn,
    evaluate_fn: EvalFn,
    progress: Progress = silent,
    init_state: dict[str, torch.Tensor] | None = None,
    lr: float | None = None,
    epochs: int | None = None,
    seed: int | None = None,
    stage: str | None = None,
    batching: str | None = None,
) -> TrainedAdapter:
    """Train a fresh LoRA on `data`'s training examples; keep the epoch with the best `evaluate_fn` score.

    `batching` overrides the config's (one of BATCHINGS; losses that need one task per batch pass "task").
    A loss may return (loss, hits) with hits an int (rows correct; one task per batch) or {task: rows correct}."""
    plan = _fit_plan(base, data, config, name=name, lr=lr, epochs=epochs, seed=seed, stage=stage, batching=batching)
    device = base.device
    meter = Meter(device)
    trainable_4bit(base.model)
    with (
        meter,
        temporary_adapter(
            base, name, plan.rank, plan.alpha, plan.targets, plan.dropout, plan.seed, init_state
        ) as model,
        dequantized_base(base.model, cfg(config, "dequantize", "auto")),
    ):
        params = [p for n, p in model.named_parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(plan.seed)  # dropout (if any) is the only other random draw
        try:
            fit = _fit_epochs(
                model,
                params,
                optimizer,
                plan,
                meter,
                name=name,
                device=device,
                loss_fn=loss_fn,
                evaluate_fn=evaluate_fn,
                progress=progress,
            )
            load_state(model, name, fit.best_state)  # restore the best epoch (the state returned below)
            peft_cfg = peft_config_dict(model.peft_config[name])
        finally:
            torch.random.set_rng_state(generator_state)
    hyper = hyperparameters(
        config,
        epochs=plan.epochs,
        lr=plan.lr,
        seed=plan.seed,
        batch_size=plan.batch_size,
        rank=plan.rank,
        alpha=plan.alpha,
        targets=plan.targets,
        dropout=plan.dropout,
        weight_decay=plan.weight_decay,
        max_grad_norm=plan.max_grad_norm,
        patience=plan.patience,
        max_length=plan.max_length,
        batching=plan.batching,
        batch_tokens=plan.batch_tokens,
    )
    return TrainedAdapter(
        name=name,
        tasks=list(data),
        state=fit.best_state,
        val_metrics=fit.best_metrics,
        history=fit.history,
        best_epoch=fit.best_epoch,
        cost=meter.cost,
        peft_config=peft_cfg,
        hyperparameters=hyper,
        seed=plan.seed,
    )


def answer_ce_loss(model: Any, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the gold answer token over the full vocabulary at the answer position."""
    return F.cross_entropy(answer_logits(model, batch), batch.answer_tokens)


def choice_hits(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[b] bool: the row's argmax over its task's choices (batch.choice_tokens, -1 = padding) is the gold label."""
    assert batch.choice_tokens is not None, "batch has no choice tokens"
    choices = batch.choice_tokens.to(logits.device)
    z = logits.detach().gather(1, choices.clamp(min=0)).masked_fill(choices < 0, float("-inf"))
    return z.argmax(-1) == batch.labels.to(logits.device)


def answer_ce_with_accuracy(choice_ids: dict[str, list[int]]) -> LossFn:
    """answer_ce_loss, plus the rows whose argmax over the task's choices is the gold label (the running
    training accuracy of the epoch, at no extra forward cost): an int for a one-task batch, else per task."""

    def loss(model: Any, batch: Batch) -> tuple[torch.Tensor, int | dict[str, int]]:
        logits = answer_logits(model, batch)
        ce = F.cross_entropy(logits, batch.answer_tokens)
        if len(set(batch.tasks)) == 1:
            ids = torch.tensor(choice_ids[batch.tasks[0]], device=logits.device)
            return ce, int((logits.detach()[:, ids].argmax(-1) == batch.labels).sum())
        hit = choice_hits(logits, batch).tolist()
        per_task: dict[str, int] = {}
        for task, h in zip(batch.tasks, hit, strict=True):
            per_task[task] = per_task.get(task, 0) + int(h)
        return ce, per_task

    return loss


def add_eval_cost(cost: Cost, shape: ModelShape, lengths: Sequence[int], lora: bool = True) -> None:
    """Analytic forward cost of scoring rows of the given lengths (padding excluded)."""
    tokens = int(sum(lengths))
    sq = int(sum(n * n for n in lengths))
    cost.eval_tokens += tokens
    cost.eval_rows += len(lengths)
    cost.eval_flops += shape.forward_flops(tokens, len(lengths), sq, lora=lora)


def score_split(
    model: Any,
    base: Base,
    data: TaskData,
    split: str,
    config: Any,
    cost: Cost | None = None,
    shape: ModelShape | None = None,
    lora: bool = True,
    progress: Progress = silent,
    stage: str = "",
) -> TaskScores:
    """score_task on one split of a task (the canonical scoring pass), adding its cost to `cost`."""
    max_length = int(cfg(config, "max_length", DEFAULT_MAX_LENGTH))
    scores = score_task(
        model,
        base.tokenizer,
        data.bound,
        data.split(split),
        int(cfg(config, "eval_batch_size", 32)),
        max_length,
        progress,
        stage or f"score {data.name} {split}",
    )
    if cost is not None and shape is not None:
        add_eval_cost(cost, shape, data.lengths(split, base.tokenizer, max_length), lora=lora)
    return scores


def validation_evaluator(base: Base, data: dict[str, TaskData], config: Any) -> EvalFn:
    """Score = (mean validation accuracy, -mean validation loss) over the tasks."""
    shape = ModelShape.from_model(
        base.model, int(cfg(config, "rank", 4)), tuple(cfg(config, "targets", DEFAULT_TARGETS))
    )

    def evaluate(model: Any, cost: Cost) -> tuple[tuple[float, ...], dict[str, Any], dict[str, TaskMetrics]]:
        metrics = {}
        for t, d in data.items():
            scores = score_split(model, base, d, "val", config, cost, shape)
            metrics[t] = metrics_from_scores(scores, d.bound.num_choices)
        acc = mean([m.accuracy for m in metrics.values()])
        loss = mean([m.loss for m in metrics.values()])
        fields = {"val_accuracy": acc, "val_loss": loss, "val": {t: m.to_dict() for t, m in metrics.items()}}
        return (acc, -loss), fields, metrics

    return evaluate


def train_adapter(
    base: Base,
    tasks: Sequence[TaskLike],
    config: Any,
    progress: Progress = silent,
    name: str = "default",
    init_state: dict[str, torch.Tensor] | None = None,
    data: dict[str, TaskData] | None = None,
) -> TrainedAdapter:
    """Fine-tune one LoRA on the union of `tasks` (names or Task objects) and return it detached.

    `config` is a TrainingParams or anything with its attributes (epochs, lr, batch_size, rank, alpha,
    targets, max_train, max_val, patience, seed, max_length, ...). `init_state` (LoRA tensors, saved or
    live key form, e.g. Stage 1's theta0) replaces the fresh seeded initialisation. `data` reuses
    already prepared task data (same subsamples across adapters).
    """
    if not tasks:
        raise ValueError("train_adapter needs at least one task")
    data = data if data is not None else prepare_tasks(base.tokenizer, tasks, config)
    names = [resolve_task(t).name if not isinstance(t, str) else t for t in tasks]
    missing = [t for t in names if t not in data]
    if missing:
        raise ValueError(f"no prepared data for task(s) {missing}")
    subset = {t: data[t] for t in names}
    return fit_lora(
        base,
        subset,
        config,
        name=name,
        loss_fn=answer_ce_with_accuracy({t: d.bound.choice_token_ids for t, d in subset.items()}),
        evaluate_fn=validation_evaluator(base, subset, config),
        progress=progress,
        init_state=init_state,
    )
