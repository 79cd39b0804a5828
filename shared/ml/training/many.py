"""Train several LoRA adapters on one frozen base: the one entry point every caller uses.

`train_many(base, specs, config, data)` returns one `TrainedAdapter` per `AdapterSpec`, each what
`train_adapter` gives for that spec alone (same seed, same batches, same selection rule), up to float
noise. By default all specs train together in one fused run (`multi.train_stacked`: one forward/backward
per step over every adapter's next batch); `method="sequential"` trains them one after the other through
`train_adapter` (the reference the fused run is tested against). Stage 2, the study and the ground-truth
sweeps of Stage 1 all go through it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.ml.models import Base
from shared.ml.progress import Progress, silent
from shared.ml.training.trainer import TaskData, TrainedAdapter, cfg, train_adapter

METHODS = ("multi", "sequential")


@dataclass
class AdapterSpec:
    """One adapter to train: its name, the tasks whose training rows it sees, and optional overrides."""

    name: str
    tasks: list[str]
    init_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    seed: int | None = None  # None: config.seed
    lr: float | None = None  # None: config.lr
    epochs: int | None = None  # None: config.epochs


def train_many(
    base: Base,
    specs: Sequence[AdapterSpec],
    config: Any,
    data: dict[str, TaskData],
    progress: Progress = silent,
    *,
    method: str | None = None,
    mode: str = "auto",
) -> list[TrainedAdapter]:
    """Train every spec on `base` and return them in order.

    `method`: "multi" (one fused run; the default) or "sequential" (one adapter at a time); None reads
    config.trainer. `mode`: how the fused run applies the stacked adapters ("auto", "stacked", "bmm")."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {names}")
    for spec in specs:
        if not spec.tasks:
            raise ValueError(f"adapter {spec.name!r} has no tasks")
        missing = [t for t in spec.tasks if t not in data]
        if missing:
            raise ValueError(f"adapter {spec.name!r}: no prepared data for task(s) {missing}")
    method = method or str(cfg(config, "trainer", None) or "multi")
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; expected one of {METHODS}")
    if not specs:
        return []
    if method == "sequential":
        out = []
        for spec in specs:
            overrides = {
                k: v for k, v in (("seed", spec.seed), ("lr", spec.lr), ("epochs", spec.epochs)) if v is not None
            }
            c = _with(config, overrides) if overrides else config
            out.append(
                train_adapter(base, spec.tasks, c, progress, name=spec.name, init_state=spec.init_state, data=data)
            )
        return out
    from shared.ml.training.multi import Job, train_stacked

    jobs = [
        Job(
            spec.name,
            list(spec.tasks),
            int(cfg(config, "seed", 0) if spec.seed is None else spec.seed),
            float(spec.lr or cfg(config, "lr", 5e-4)),
            int(spec.epochs or cfg(config, "epochs", 3)),
            spec.init_state,
        )
        for spec in specs
    ]
    return train_stacked(base, jobs, config, data, progress, mode=mode)


def _with(config: Any, overrides: dict[str, Any]) -> Any:
    if isinstance(config, dict):
        return {**config, **overrides}
    return config.model_copy(update=overrides)
