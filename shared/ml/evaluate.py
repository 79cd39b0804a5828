"""Scoring a model on tasks: answer-token logits restricted to the choices -> loss, accuracy, macro-F1."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.ml.data import subsample
from shared.ml.encoding import DEFAULT_MAX_LENGTH, BoundTask, batches, bind, encode_examples
from shared.ml.eval_params import EvalParams
from shared.ml.models import answer_logits, load_model
from shared.ml.progress import Progress, silent


@dataclass
class TaskMetrics:
    """Corpus-level metrics of one task. loss = mean answer-token cross-entropy (full vocabulary)."""

    loss: float
    accuracy: float
    macro_f1: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class TaskScores:
    """Raw scores of one task's examples, in example order."""

    example_ids: list[str]
    choice_logits: torch.Tensor  # [N, C] float32, logits of the choices' first tokens
    labels: torch.Tensor  # [N]
    token_nll: torch.Tensor  # [N] -log softmax(full vocab)[gold answer token]


def macro_f1(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(gold, pred, labels=list(range(num_classes)), average="macro", zero_division=0))


def metrics_from_scores(scores: TaskScores, num_classes: int) -> TaskMetrics:
    pred = scores.choice_logits.argmax(-1).numpy()
    gold = scores.labels.numpy()
    return TaskMetrics(
        loss=float(scores.token_nll.mean()),
        accuracy=float((pred == gold).mean()),
        macro_f1=macro_f1(pred, gold, num_classes),
        n=len(gold),
    )


@torch.no_grad()
def score_task(
    model: Any,
    tokenizer: Any,
    bound: BoundTask,
    examples: list,
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: Progress = silent,
    stage: str = "evaluate",
) -> TaskScores:
    """Choice logits and answer-token NLL for `examples` of one task (dynamic padding, length-sorted)."""
    device = next(model.parameters()).device
    encoded = encode_examples(bound, examples, tokenizer, max_length)
    order: list[str] = []
    logits, labels, nll = [], [], []
    choice_ids = torch.tensor(bound.choice_token_ids, device=device)
    chunks = batches(encoded, batch_size, pad_id=tokenizer.pad_token_id or 0)
    for i, batch in enumerate(chunks):
        batch = batch.to(device)
        full = answer_logits(model, batch)
        logits.append(full[:, choice_ids].cpu())
        nll.append((torch.logsumexp(full, -1) - full.gather(1, batch.answer_tokens[:, None])[:, 0]).cpu())
        labels.append(batch.labels.cpu())
        order.extend(batch.example_ids)
        progress(stage, i + 1, len(chunks), bound.name)
    # Restore the input order so callers can align rows with their examples.
    pos = {eid: k for k, eid in enumerate(order)}
    perm = torch.tensor([pos[ex.id] for ex in examples])
    return TaskScores(
        [ex.id for ex in examples], torch.cat(logits)[perm], torch.cat(labels)[perm], torch.cat(nll)[perm]
    )


def evaluate(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    split: str = "test",
    max_examples: int | None = None,
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    seed: int = 0,
    progress: Progress = silent,
) -> dict[str, TaskMetrics]:
    """Metrics per task on `split` (optionally a stratified subsample of `max_examples` per task)."""
    from shared.ml.tasks.registry import get_task

    results: dict[str, TaskMetrics] = {}
    for name in tasks:
        task = get_task(name)
        bound = bind(task, tokenizer)
        examples = subsample(task.split(split), max_examples, seed)
        scores = score_task(model, tokenizer, bound, examples, batch_size, max_length, progress, f"evaluate {name}")
        results[name] = metrics_from_scores(scores, bound.num_choices)
    return results


def run_evaluation(params: EvalParams, workdir: Path, progress: Progress = silent) -> dict[str, Any]:
    """Job stage: evaluate the base model on tasks; writes report.json into `workdir`."""
    start = time.perf_counter()
    model, tokenizer, info = load_model(params.model, params.quantization)
    metrics = evaluate(
        model,
        tokenizer,
        params.tasks,
        params.split,
        params.max_examples,
        params.batch_size,
        params.max_length,
        params.seed,
        progress,
    )
    tasks = {name: m.to_dict() for name, m in metrics.items()}
    report = {
        "model": info.to_dict(),
        "split": params.split,
        "tasks": tasks,
        "average": {k: float(np.mean([t[k] for t in tasks.values()])) for k in ("accuracy", "macro_f1", "loss")},
        "wall_seconds": round(time.perf_counter() - start, 3),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "report.json").write_text(json.dumps(report, indent=2))
    return {"report": report, "artifacts": {"report": "report.json"}}
