"""Gradient boosting of a hard group with weak LoRA learners, restricted to the verbalizer.

Round k, for the group's training examples:
    F      = current ensemble choice logits  (z_group + eta * sum_b (z_b - z_base))
    r_i    = onehot(y_i) - softmax(F_i)                       (negative gradient of CE w.r.t. F)
    booster: a fresh LoRA from theta0 (the seeded initialisation) trained so that its choice-logit
             increment over the base, z_b - z_base, matches r with mean squared error
    F     <- F + eta * (z_b - z_base)
The round is kept only if the group's mean validation accuracy improves; otherwise it is dropped and
boosting stops. Residuals and base logits are looked up by EXAMPLE ID for every row of every batch
(`batch_targets`), so shuffled batches always meet their own examples' targets (the reference wrote
predict-order residuals onto natural-order rows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from shared.ml.encoding import Batch
from shared.ml.evaluate import TaskMetrics
from shared.ml.models import DEFAULT_TARGETS, Base, answer_logits
from shared.ml.progress import Progress, silent
from shared.ml.training.costs import Cost, ModelShape
from shared.ml.training.trainer import (
    TaskData,
    TrainedAdapter,
    cfg,
    fit_lora,
    lora_alpha,
    mean,
    score_split,
    temporary_adapter,
)


def residuals(choice_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """onehot(y) - softmax(choice logits), [N, C]."""
    probs = torch.softmax(choice_logits.float(), dim=-1)
    return F.one_hot(labels.long(), probs.shape[-1]).float() - probs


def by_id(example_ids: list[str], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    if len(example_ids) != rows.shape[0]:
        raise ValueError(f"{len(example_ids)} example ids for {rows.shape[0]} rows")
    return {eid: rows[i] for i, eid in enumerate(example_ids)}


def batch_targets(
    batch: Batch, residual_by_id: dict[str, torch.Tensor], base_by_id: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual targets [B, C], base choice logits [B, C]) for the batch's rows, looked up by example id."""
    missing = [eid for eid in batch.example_ids if eid not in residual_by_id or eid not in base_by_id]
    if missing:
        raise KeyError(f"no residual / base logits for example(s) {missing[:3]}")
    target = torch.stack([residual_by_id[eid] for eid in batch.example_ids])
    zbase = torch.stack([base_by_id[eid] for eid in batch.example_ids])
    return target, zbase


def increment_loss(
    choice_ids: dict[str, list[int]], residual_by_id: dict[str, torch.Tensor], base_by_id: dict[str, torch.Tensor]
) -> Callable[[Any, Batch], torch.Tensor]:
    """MSE between the model's choice-logit increment over the base and the residuals of the batch's rows."""

    def loss(model: Any, batch: Batch) -> torch.Tensor:
        ids = torch.tensor(choice_ids[batch.tasks[0]], device=batch.input_ids.device)
        z = answer_logits(model, batch)[:, ids]
        target, zbase = batch_targets(batch, residual_by_id, base_by_id)
        return F.mse_loss(z - zbase.to(z.device), target.to(z.device))

    return loss


def accuracy_and_ce(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    acc = float((logits.argmax(-1) == labels).double().mean())
    ce = float(F.cross_entropy(logits.float(), labels.long()))
    return acc, ce


@dataclass
class BoostRound:
    round: int
    train_error_before: float
    val_accuracy_before: float
    val_accuracy_after: float
    kept: bool
    booster: str
    train_loss: list[float] = field(default_factory=list)  # the weak learner's MSE per epoch
    best_epoch: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BoostResult:
    group: str
    boosters: list[TrainedAdapter] = field(default_factory=list)
    rounds: list[BoostRound] = field(default_factory=list)
    cost: Cost = field(default_factory=Cost)
    train_error: float = 0.0
    val_accuracy: float = 0.0
    stopped: str = "max rounds"

    def summary(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "boosters": [b.name for b in self.boosters],
            "rounds": [r.to_dict() for r in self.rounds],
            "cost": self.cost.to_dict(),
            "train_error": self.train_error,
            "val_accuracy": self.val_accuracy,
            "stopped": self.stopped,
        }


def train_booster(
    base: Base,
    data: dict[str, TaskData],
    config: Any,
    *,
    name: str,
    residual_by_id: dict[str, torch.Tensor],
    base_train_by_id: dict[str, torch.Tensor],
    current_val: dict[str, torch.Tensor],
    base_val: dict[str, torch.Tensor],
    eta: float,
    lr: float | None = None,
    epochs: int | None = None,
    progress: Progress = silent,
    init_state: dict[str, torch.Tensor] | None = None,
) -> tuple[TrainedAdapter, dict[str, torch.Tensor]]:
    """One weak learner; epochs selected by the group's validation accuracy (then CE) of F + eta * increment.
    Returns the adapter and its validation choice logits (per task, in data[t].val order)."""
    shape = ModelShape.from_model(
        base.model, int(cfg(config, "rank", 4)), tuple(cfg(config, "targets", DEFAULT_TARGETS))
    )
    val_logits: list[dict[str, torch.Tensor]] = []

    def evaluate(model: Any, cost: Cost) -> tuple[tuple[float, ...], dict[str, Any], dict[str, TaskMetrics]]:
        zs: dict[str, torch.Tensor] = {}
        metrics: dict[str, TaskMetrics] = {}
        for t, d in data.items():
            scores = score_split(model, base, d, "val", config, cost, shape)
            zs[t] = scores.choice_logits
            ens = current_val[t] + eta * (scores.choice_logits - base_val[t])
            acc, ce = accuracy_and_ce(ens, scores.labels)
            metrics[t] = TaskMetrics(loss=ce, accuracy=acc, macro_f1=float("nan"), n=len(scores.labels))
        val_logits.append(zs)
        acc = mean([m.accuracy for m in metrics.values()])
        ce = mean([m.loss for m in metrics.values()])
        return (acc, -ce), {"val_accuracy": acc, "val_loss": ce, "ensemble_val": True}, metrics

    choice_ids = {t: d.bound.choice_token_ids for t, d in data.items()}
    trained = fit_lora(
        base,
        data,
        config,
        name=name,
        loss_fn=increment_loss(choice_ids, residual_by_id, base_train_by_id),
        evaluate_fn=evaluate,
        progress=progress,
        init_state=init_state,
        lr=lr,
        epochs=epochs,
        stage=f"boost {name}",
        batching="task",  # the residual targets of a batch share its task's choices
    )
    return trained, val_logits[trained.best_epoch - 1]


def score_state(
    base: Base,
    state: dict[str, torch.Tensor],
    data: dict[str, TaskData],
    split: str,
    config: Any,
    name: str,
    cost: Cost | None = None,
) -> dict[str, torch.Tensor]:
    """Choice logits of a detached adapter on one split of each task (attached temporarily)."""
    rank = int(cfg(config, "rank", 4))
    targets = tuple(cfg(config, "targets", DEFAULT_TARGETS))
    shape = ModelShape.from_model(base.model, rank, targets)
    out = {}
    with temporary_adapter(base, name, rank, lora_alpha(config), targets, 0.0, 0, init_state=state) as model:
        model.eval()
        for t, d in data.items():
            out[t] = score_split(model, base, d, split, config, cost, shape).choice_logits
    return out


def boost_group(
    base: Base,
    data: dict[str, TaskData],
    config: Any,
    *,
    group: str,
    group_train: dict[str, torch.Tensor],
    group_val: dict[str, torch.Tensor],
    base_train: dict[str, torch.Tensor],
    base_val: dict[str, torch.Tensor],
    eta: float,
    max_rounds: int,
    lr: float | None = None,
    epochs: int | None = None,
    progress: Progress = silent,
    name_prefix: str | None = None,
    max_flops: float | None = None,
    round_flops: float = 0.0,
) -> BoostResult:
    """Boost one group (its tasks = data's keys). All logits are [N, C] per task in data[t].<split> order.

    With `max_flops`, a round starts only if the FLOPs spent so far plus `round_flops` (an estimate of
    one round) stay within it."""
    prefix = name_prefix or f"{group}_boost"
    labels_train = {t: torch.tensor([e.label for e in d.train]) for t, d in data.items()}
    labels_val = {t: torch.tensor([e.label for e in d.val]) for t, d in data.items()}
    ids_train = {t: [e.id for e in d.train] for t, d in data.items()}
    base_train_by_id: dict[str, torch.Tensor] = {}
    for t in data:
        base_train_by_id.update(by_id(ids_train[t], base_train[t]))
    current_train = {t: group_train[t].float().clone() for t in data}
    current_val = {t: group_val[t].float().clone() for t in data}
    result = BoostResult(group)

    def train_error() -> float:
        return 1.0 - mean([accuracy_and_ce(current_train[t], labels_train[t])[0] for t in data])

    def val_acc(logits: dict[str, torch.Tensor]) -> float:
        return mean([accuracy_and_ce(logits[t], labels_val[t])[0] for t in data])

    result.train_error = train_error()
    best_val = val_acc(current_val)
    for k in range(1, max_rounds + 1):
        if max_flops is not None and result.cost.total_flops + round_flops > max_flops:
            result.stopped = "budget"
            break
        name = f"{prefix}{k}"
        residual_by_id: dict[str, torch.Tensor] = {}
        for t in data:
            residual_by_id.update(by_id(ids_train[t], residuals(current_train[t], labels_train[t])))
        err_before = train_error()
        booster, zb_val = train_booster(
            base,
            data,
            config,
            name=name,
            residual_by_id=residual_by_id,
            base_train_by_id=base_train_by_id,
            current_val=current_val,
            base_val=base_val,
            eta=eta,
            lr=lr,
            epochs=epochs,
            progress=progress,
        )
        result.cost = result.cost.merge(booster.cost)
        new_val = {t: current_val[t] + eta * (zb_val[t] - base_val[t]) for t in data}
        after = val_acc(new_val)
        kept = after > best_val
        result.rounds.append(
            BoostRound(
                k,
                err_before,
                best_val,
                after,
                kept,
                name,
                [h["train_loss"] for h in booster.history],
                booster.best_epoch,
            )
        )
        if not kept:
            result.stopped = "no validation improvement"
            break
        result.boosters.append(booster)
        current_val = new_val
        best_val = after
        if k < max_rounds:  # the next round needs this booster's increments on the training rows
            extra = Cost()
            zb_train = score_state(base, booster.state, data, "train", config, name, extra)
            result.cost = result.cost.merge(extra)
            current_train = {t: current_train[t] + eta * (zb_train[t] - base_train[t]) for t in data}
    result.val_accuracy = best_val
    return result
