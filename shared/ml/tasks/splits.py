"""Deterministic stratified splitting (scikit-learn, seed 0) with graceful fallbacks.

Every helper returns sorted index lists into the input, so splits keep the source file's order.
`groups` (optional) keeps rows that share a group (a passage, a WSC sentence) on one side of a cut,
so near-duplicates never straddle train and validation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np
from sklearn.model_selection import train_test_split

SEED = 0
Indices = list[int]


def held_out_count(n: int, fraction: float) -> int:
    """round(n * fraction), but at least 1 row when there are at least 3 rows to share."""
    count = int(round(n * fraction))
    return max(count, 1) if n >= 3 else count


def split_off(
    labels: Sequence[int],
    size: int,
    seed: int = SEED,
    groups: Sequence[Hashable] | None = None,
) -> tuple[Indices, Indices]:
    """Split rows into (kept, held) with about `size` rows held out, stratified by label.

    Without groups the held-out count is exact (sklearn `train_test_split`); when a class is too small
    to stratify it falls back to a plain seeded shuffle. With groups (not all singletons) whole groups
    are held out under per-label quotas (see `_split_groups`), so the count can fall a little short.
    """
    n = len(labels)
    if size <= 0 or n == 0:
        return list(range(n)), []
    if size >= n:
        raise ValueError(f"cannot hold out {size} of {n} rows")
    index = np.arange(n)
    y = np.asarray(labels)
    if groups is not None and len(set(groups)) == n:
        groups = None  # all singletons: the exact-count path gives the same kind of split
    if groups is None:
        try:
            kept, held = train_test_split(index, test_size=size, random_state=seed, shuffle=True, stratify=y)
        except ValueError:  # a class with < 2 rows, or fewer held rows than classes
            kept, held = train_test_split(index, test_size=size, random_state=seed, shuffle=True)
        return sorted(kept.tolist()), sorted(held.tolist())
    return _split_groups(y, _group_ids(groups), size, seed)


def _split_groups(y: np.ndarray, g: np.ndarray, size: int, seed: int) -> tuple[Indices, Indices]:
    """Hold out whole groups, visited in a seeded random order, while every label stays within its quota.

    Quotas are each label's share of `size`, so label proportions match closely even when a few groups
    are large (a phrase repeated 70 times); the held-out count can fall a little short of `size`.
    """
    quota = _quotas(y, size)
    members: dict[int, list[int]] = {}
    for row, group in enumerate(g.tolist()):
        members.setdefault(group, []).append(row)
    order = np.random.default_rng(seed).permutation(len(members))
    taken = dict.fromkeys(quota, 0)
    held: list[int] = []
    for group in order.tolist():
        rows = members[group]
        need: dict[int, int] = {}
        for row in rows:
            need[int(y[row])] = need.get(int(y[row]), 0) + 1
        if all(taken[k] + c <= quota[k] for k, c in need.items()):
            held.extend(rows)
            for k, c in need.items():
                taken[k] += c
            if taken == quota:
                break
    held_set = set(held)
    return [i for i in range(len(y)) if i not in held_set], sorted(held)


def _quotas(y: np.ndarray, size: int) -> dict[int, int]:
    """Split `size` over the labels in proportion to their counts (largest-remainder rounding)."""
    labels, counts = np.unique(y, return_counts=True)
    exact = size * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: size - int(quota.sum())]:
        quota[i] += 1
    return {int(k): int(q) for k, q in zip(labels, quota, strict=True)}


def _group_ids(groups: Sequence[Hashable]) -> np.ndarray:
    """Group keys as ints numbered by first appearance (stable across processes, unlike hash())."""
    seen: dict[Hashable, int] = {}
    return np.asarray([seen.setdefault(key, len(seen)) for key in groups])


def carve_val(
    labels: Sequence[int], fraction: float = 0.1, seed: int = SEED, groups: Sequence[Hashable] | None = None
) -> tuple[Indices, Indices]:
    """(train, val) indices: a stratified `fraction` of the rows becomes the validation split."""
    return split_off(labels, held_out_count(len(labels), fraction), seed, groups)


def three_way(
    labels: Sequence[int],
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = SEED,
    groups: Sequence[Hashable] | None = None,
) -> tuple[Indices, Indices, Indices]:
    """(train, val, test) indices, stratified: test is cut first, then val from the rest."""
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {fractions}")
    n = len(labels)
    n_test = held_out_count(n, fractions[2])
    n_val = held_out_count(n, fractions[1])
    rest, test = split_off(labels, n_test, seed, groups)
    sub_labels = [labels[i] for i in rest]
    sub_groups = [groups[i] for i in rest] if groups is not None else None
    train_pos, val_pos = split_off(sub_labels, min(n_val, max(len(rest) - 1, 0)), seed, sub_groups)
    return [rest[i] for i in train_pos], [rest[i] for i in val_pos], test


def label_proportions(labels: Sequence[int]) -> dict[int, float]:
    """Share of each label (for checking that a split is stratified)."""
    counts = Counter(labels)
    total = sum(counts.values()) or 1
    return {label: counts[label] / total for label in sorted(counts)}
