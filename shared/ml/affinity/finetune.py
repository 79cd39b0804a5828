"""A plain LoRA fine-tune on the union of some tasks' training rows (the ground truth for validate.py).

Loss = answer-token cross-entropy under the full vocabulary (the loss whose linearisation Stage 1b
solves), AdamW on the adapter's A and B, seeded shuffling, batches mixing the tasks, evaluation of
every task's validation rows after each epoch.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from shared.ml.encoding import Encoded, collate
from shared.ml.evaluate import TaskMetrics
from shared.ml.models import answer_logits, lora_state
from shared.ml.progress import Progress, silent


@dataclass
class FinetuneResult:
    per_epoch: list[dict[str, TaskMetrics]]  # validation metrics after each epoch
    train_loss: list[float]
    chosen_epoch: int  # 1-based
    seconds: float
    steps: int
    eval_seconds: float = 0.0
    chosen: dict[str, TaskMetrics] = field(default_factory=dict)


def finetune(
    rt: Any,
    train_items: Sequence[Encoded],
    val_sets: dict[str, list[Encoded]],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    select: str = "best",
    eval_batch_size: int = 64,
    progress: Progress = silent,
    stage: str = "fine-tune",
) -> FinetuneResult:
    """Train the runtime's adapter in place from its current state; returns per-epoch validation metrics."""
    model = rt.model
    params = list(lora_state(model).values())
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    pad = rt.tokenizer.pad_token_id or 0
    per_epoch: list[dict[str, TaskMetrics]] = []
    losses: list[float] = []
    steps = 0
    eval_seconds = 0.0
    n_batches = (len(train_items) + batch_size - 1) // batch_size
    start = time.perf_counter()
    try:
        for epoch in range(epochs):
            model.train()
            order = list(range(len(train_items)))
            rng.shuffle(order)
            total, count = 0.0, 0
            for b in range(n_batches):
                batch = collate([train_items[i] for i in order[b * batch_size : (b + 1) * batch_size]], pad).to(
                    rt.device
                )
                logits = answer_logits(model, batch)
                loss = F.cross_entropy(logits, batch.answer_tokens)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                total += float(loss.detach()) * len(batch)
                count += len(batch)
                progress(stage, epoch * n_batches + b + 1, epochs * n_batches, f"epoch {epoch + 1}")
            losses.append(total / max(count, 1))
            model.eval()
            t0 = time.perf_counter()
            metrics = {name: _eval_plain(rt, items, name, eval_batch_size, pad) for name, items in val_sets.items()}
            eval_seconds += time.perf_counter() - t0
            per_epoch.append(metrics)
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None
        model.eval()
    seconds = time.perf_counter() - start
    if select == "best":
        chosen = min(
            range(len(per_epoch)), key=lambda e: sum(m.loss for m in per_epoch[e].values()) / len(per_epoch[e])
        )
    else:
        chosen = len(per_epoch) - 1
    return FinetuneResult(per_epoch, losses, chosen + 1, seconds, steps, eval_seconds, per_epoch[chosen])


@torch.no_grad()
def _eval_plain(rt: Any, items: Sequence[Encoded], name: str, batch_size: int, pad: int) -> TaskMetrics:
    from shared.ml.evaluate import TaskScores, metrics_from_scores

    bound = rt.bound[name]
    choice = torch.tensor(bound.choice_token_ids, device=rt.device)
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    n = len(items)
    cl = torch.zeros(n, len(bound.choice_token_ids))
    nll = torch.zeros(n)
    for s in range(0, n, batch_size):
        chunk = order[s : s + batch_size]
        batch = collate([items[i] for i in chunk], pad).to(rt.device)
        logits = answer_logits(rt.model, batch)
        idx = torch.tensor(chunk)
        cl[idx] = logits[:, choice].cpu()
        nll[idx] = (torch.logsumexp(logits, -1) - logits.gather(1, batch.answer_tokens[:, None])[:, 0]).cpu()
    scores = TaskScores([it.example_id for it in items], cl, torch.tensor([it.label for it in items]), nll)
    return metrics_from_scores(scores, bound.num_choices)
