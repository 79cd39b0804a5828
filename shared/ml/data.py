"""Choosing and batching examples: deterministic subsamples and one-task-per-batch streams."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from shared.ml.tasks.base import Example


def subsample(examples: Sequence[Example], max_n: int | None, seed: int = 0) -> list[Example]:
    """At most `max_n` examples, stratified by label, deterministic for a seed; order as in the input."""
    if max_n is None or len(examples) <= max_n:
        return list(examples)
    if max_n < 1:
        raise ValueError(f"max examples must be >= 1, got {max_n}")
    by_label: dict[int, list[int]] = defaultdict(list)
    for i, ex in enumerate(examples):
        by_label[ex.label].append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    labels = sorted(by_label)
    # Proportional allocation (largest remainder), at least one per label when room allows.
    quotas = {lab: max_n * len(by_label[lab]) / len(examples) for lab in labels}
    take = {lab: int(quotas[lab]) for lab in labels}
    for lab in sorted(labels, key=lambda lab: quotas[lab] - take[lab], reverse=True)[: max_n - sum(take.values())]:
        take[lab] += 1
    for lab in labels:
        idx = by_label[lab][:]
        rng.shuffle(idx)
        chosen.extend(idx[: take[lab]])
    return [examples[i] for i in sorted(chosen)]
