"""Seeded task-subset sampling that covers every pair of tasks at least k times.

Rule: when C(n, s) <= `enumerate_limit` every s-subset is used (each pair then co-occurs C(n-2, s-2)
times, the most possible without repeating a subset). Otherwise subsets are drawn greedily until every
pair co-occurs >= k times: each new subset starts from a least-covered pair (ties broken by the seeded
RNG) and is completed with the tasks that add the most still-under-covered pairs (ties again by the RNG);
an already drawn subset is never drawn twice unless nothing else covers a missing pair.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from typing import Any


def default_subset_size(n: int) -> int:
    """3 for up to 10 tasks, else round(0.3 n); never more than n - 1 (so pairs are contrasted) and >= 2."""
    if n < 2:
        raise ValueError(f"need at least 2 tasks for affinity, got {n}")
    size = 3 if n <= 10 else round(0.3 * n)
    return max(2, min(size, n - 1)) if n > 2 else 2


def subset_size(params: Any, n: int) -> int:
    """The subset size a run uses: `params.subset_size`, else the default for n tasks; never more than n."""
    size = params.subset_size or default_subset_size(n)
    if size > n:
        raise ValueError(f"subset_size={size} is more than the {n} tasks")
    return size


def seeded_pick(items: list, k: int, seed: int) -> list:
    """k of `items` (all when fewer), drawn by `seed`, in their original order."""
    rng = random.Random(seed + 7919)
    idx = sorted(rng.sample(range(len(items)), min(k, len(items))))
    return [items[i] for i in idx]


def pair_counts(n: int, subsets: Sequence[Sequence[int]]) -> list[list[int]]:
    counts = [[0] * n for _ in range(n)]
    for s in subsets:
        for i in s:
            for j in s:
                counts[i][j] += 1
    return counts


def sample_subsets(
    n: int, size: int, coverage: int = 5, seed: int = 0, enumerate_limit: int = 120, max_subsets: int = 100_000
) -> list[tuple[int, ...]]:
    """Sorted task-index tuples; every pair i != j co-occurs >= `coverage` times (or in all C(n-2, s-2))."""
    if n < 1:
        raise ValueError("need at least 1 task")
    if not 1 <= size <= n:
        raise ValueError(f"subset size must be between 1 and the number of tasks ({n}), got {size}")
    if size == 1:  # single tasks: no pairs to cover
        return [(i,) for i in range(n)]
    if n < 2:
        raise ValueError(f"need at least 2 tasks, got {n}")
    if coverage < 1:
        raise ValueError(f"pair coverage must be >= 1, got {coverage}")
    total = math.comb(n, size)
    if total <= enumerate_limit or total <= math.ceil(coverage * math.comb(n, 2) / math.comb(size, 2)):
        return list(itertools.combinations(range(n), size))
    rng = random.Random(seed)
    counts = [[0] * n for _ in range(n)]
    chosen: list[tuple[int, ...]] = []
    seen: set[tuple[int, ...]] = set()
    pairs = list(itertools.combinations(range(n), 2))

    def deficit(i: int, j: int) -> int:
        return max(0, coverage - counts[i][j])

    while len(chosen) < max_subsets:
        low = min(counts[i][j] for i, j in pairs)
        if low >= coverage:
            break
        candidates = [(i, j) for i, j in pairs if counts[i][j] == low]
        best: tuple[int, ...] | None = None
        for attempt in range(8):
            i, j = rng.choice(candidates)
            members = [i, j]
            while len(members) < size:
                rest = [t for t in range(n) if t not in members]
                rng.shuffle(rest)
                gain = {t: sum(deficit(min(t, m), max(t, m)) > 0 for m in members) for t in rest}
                members.append(max(rest, key=lambda t: gain[t]))  # max keeps the first of ties (shuffled)
            cand = tuple(sorted(members))
            if cand not in seen or attempt == 7:
                best = cand
                break
        assert best is not None
        chosen.append(best)
        seen.add(best)
        for a, b in itertools.combinations(best, 2):
            counts[a][b] += 1
            counts[b][a] += 1
    return chosen
