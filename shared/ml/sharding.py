"""The fan-out hook of shardable stages (no queue, no database, no torch here).

A stage that can split a phase into independent pieces (rows of a gradient pass, subsets to estimate)
describes the phase as a `Phase`: its ranges and a shard function named by reference, with JSON-able
arguments, so that *any* process sharing the stage's workdir can run a piece:

    fn(args: dict, workdir: Path, progress: Progress, start: int, end: int, cache: dict) -> dict

(`cache` lets one process load a model once for all the pieces it runs; the caller may pre-fill it.)
An optional `prepare(args, workdir, cache) -> None`, also by reference, fills the cache of a helper process
before it claims its first piece, so that a piece is never held while its worker is still loading a model.

The stage asks `current_sharder()` for the sharder of the process: None (the default, e.g. the CLI)
means "run the phase here in one piece, as before"; a job runner installs one with `use_sharder(...)`
around the stage (shared/jobs/fanout.py), which cuts the phase into `sharder.shards` pieces, lets
other workers help, and returns once every piece is done. Shard functions must be idempotent (a piece
may be re-run after its worker died) and their outputs must not depend on how the phase was cut.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shared.ml.progress import Progress


@dataclass(frozen=True)
class Phase:
    name: str  # unique within the job, e.g. "gradients:train", "estimate"
    label: str  # for humans, e.g. "gradients train"
    size: int  # the phase covers [0, size) ...
    fn: str  # "package.module:function" (see the module docstring)
    args: dict[str, Any] = field(default_factory=dict)
    unit: str = "items"  # ... of these (for messages)
    align: int = 1  # shard boundaries are multiples of this ...
    prepare: str | None = None  # "package.module:function" (see the module docstring)
    starts: tuple[int, ...] | None = None  # ... or, when given, members of this (the places a piece may start)

    def ranges(self, shards: int) -> list[tuple[int, int]]:
        return split_ranges(self.size, shards, self.align, self.starts)


class Sharder(Protocol):
    shards: int

    def run(self, phase: Phase, workdir: Path, progress: Progress, cache: dict[str, Any]) -> None:
        """Run every piece of `phase` (here and/or elsewhere); return once all are done."""


_CURRENT: ContextVar[Sharder | None] = ContextVar("chorus_sharder", default=None)


def current_sharder() -> Sharder | None:
    return _CURRENT.get()


@contextlib.contextmanager
def use_sharder(sharder: Sharder | None) -> Iterator[None]:
    token = _CURRENT.set(sharder)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def split_ranges(
    size: int,
    shards: int,
    align: int = 1,
    starts: Sequence[int] | None = None,
) -> list[tuple[int, int]]:
    """[0, size) cut into at most `shards` contiguous, non-empty ranges of nearly equally many units, a unit
    running from one allowed start to the next: the multiples of `align`, or the given `starts` (0 among them)."""
    if size <= 0:
        return []
    if starts is None:
        align = max(1, int(align))
        starts = range(0, size, align)
    units = sorted({int(x) for x in starts if 0 <= x < size} | {0})
    k = max(1, min(int(shards), len(units)))
    bounds = [units[len(units) * i // k] for i in range(k)] + [size]
    return [(bounds[i], bounds[i + 1]) for i in range(k) if bounds[i] < bounds[i + 1]]
