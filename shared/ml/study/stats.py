"""Statistics of paired comparisons between arms: per-row correctness, seeds, then rows.

`Correct` is one arm's per-row correctness: correct[s][task] = bool array over the test rows of seed s
(the rows are the same for every arm of a seed, so arms are paired row by row). Accuracy is averaged
over tasks (macro), then over seeds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypedDict

import numpy as np
from scipy.stats import binomtest

Correct = Sequence[Mapping[str, np.ndarray]]


class PairedDifference(TypedDict):
    mean: float
    ci95: list[float]
    sd_over_seeds: float | None
    per_seed: list[float]
    p_le_0: float


def macro_accuracy(correct: Mapping[str, np.ndarray]) -> float:
    """Mean over tasks of each task's accuracy."""
    return float(np.mean([np.mean(v) for v in correct.values()]))


def per_seed(correct: Correct) -> list[float]:
    return [macro_accuracy(c) for c in correct]


def _check_paired(a: Correct, b: Correct) -> None:
    if len(a) != len(b):
        raise ValueError(f"arms cover different numbers of seeds ({len(a)} vs {len(b)})")
    for s, (ca, cb) in enumerate(zip(a, b, strict=True)):
        if set(ca) != set(cb):
            raise ValueError(f"seed {s}: arms cover different tasks")
        for t in ca:
            if len(ca[t]) != len(cb[t]):
                raise ValueError(f"seed {s}, task {t}: {len(ca[t])} vs {len(cb[t])} rows; arms must share rows")


def hierarchical_bootstrap(a: Correct, b: Correct, resamples: int = 2000, seed: int = 0) -> PairedDifference:
    """Mean paired difference a - b of macro accuracy with a 95 % CI from a two-level bootstrap:
    seeds are resampled with replacement, then, within each drawn seed, the test rows of every task
    (stratified by task; the pairing of a row across arms is kept). One seed: rows only."""
    _check_paired(a, b)
    rng = np.random.default_rng(seed)
    n_seeds = len(a)
    seed_boot = np.empty((n_seeds, resamples))
    for s in range(n_seeds):
        per_task = []
        for t in sorted(a[s]):
            d = a[s][t].astype(np.float64) - b[s][t].astype(np.float64)
            idx = rng.integers(0, len(d), size=(resamples, len(d)))
            per_task.append(d[idx].mean(axis=1))
        seed_boot[s] = np.mean(per_task, axis=0)
    if n_seeds > 1:
        draws = rng.integers(0, n_seeds, size=(resamples, n_seeds))
        boot = seed_boot[draws, np.arange(resamples)[:, None]].mean(axis=1)
    else:
        boot = seed_boot[0]
    diffs = np.array(per_seed(a)) - np.array(per_seed(b))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {
        "mean": float(diffs.mean()),
        "ci95": [float(lo), float(hi)],
        "sd_over_seeds": float(diffs.std(ddof=1)) if n_seeds > 1 else None,
        "per_seed": [float(x) for x in diffs],
        "p_le_0": float((boot <= 0).mean()),  # bootstrap share of resamples with no improvement
    }


def mcnemar(a: Correct, b: Correct) -> dict[str, dict[str, float]]:
    """Per task, pooled over seeds: discordant counts and the exact two-sided McNemar p-value."""
    _check_paired(a, b)
    out: dict[str, dict[str, float]] = {}
    for t in sorted(a[0]):
        only_a = int(sum(np.sum(ca[t] & ~cb[t]) for ca, cb in zip(a, b, strict=True)))
        only_b = int(sum(np.sum(~ca[t] & cb[t]) for ca, cb in zip(a, b, strict=True)))
        n = only_a + only_b
        p = float(binomtest(min(only_a, only_b), n, 0.5).pvalue) if n else 1.0
        out[t] = {"only_a": only_a, "only_b": only_b, "p": p}
    return out
