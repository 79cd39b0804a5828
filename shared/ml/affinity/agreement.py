"""Agreement statistics between an estimated and a true per-subset performance table (numpy/scipy only).

Tables are arrays [seeds, K subsets, n tasks] with NaN where a task is not in a subset; `member` [K, n]
says which tasks each subset holds. Estimates are compared seed by seed with the seed-averaged truth (a
Stage-1 run is used once; the truth is as good as the seeds make it).

    within_task_spearman   pooled Spearman after task-centring, subset bootstrap CI, per task
    pairwise_order         share of well-separated subset pairs (per task) the estimate orders correctly
    change_skill           1 - MSE(est change, true change) / MSE(0, true change)
    affinity_from_table    T[i, j] = mean over subsets holding i and j of perf_i(S)
    offdiag_corr, mantel   Pearson of row-centred off-diagonal entries, label-permutation p-value
    ari_vs_random          adjusted Rand index and its null over random partitions of the same sizes
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata


def _nanmean(x: np.ndarray, axis: int | None = None, keepdims: bool = False) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices (tasks outside a subset) give NaN
        return np.nanmean(x, axis=axis, keepdims=keepdims)


def seed_mean(table: np.ndarray, member: np.ndarray) -> np.ndarray:
    """[K, n] mean over seeds of a [seeds, K, n] (or [K, n]) table, NaN outside the subsets."""
    return _nanmean(_as_table(table, np.asarray(member, dtype=bool)), axis=0)


def _as_table(values: np.ndarray, member: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if values.ndim == 2:
        values = values[None]
    if values.shape[1:] != member.shape:
        raise ValueError(f"table shape {values.shape[1:]} does not match the membership {member.shape}")
    return np.where(member[None], values, np.nan)


def _row_spearman(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row pair of X, Y [B, P] (finite values; NaN where a row is constant)."""
    rx, ry = rankdata(X, axis=1), rankdata(Y, axis=1)
    rx = rx - rx.mean(1, keepdims=True)
    ry = ry - ry.mean(1, keepdims=True)
    den = np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def within_task_spearman(
    est: np.ndarray, true: np.ndarray, member: np.ndarray, bootstrap: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Pooled Spearman of task-centred estimates (each seed) against the task-centred seed-mean truth.

    CI: percentile bootstrap that resamples, within every task, its subsets with replacement (a drawn subset
    brings its points of every seed); the centring is redone on each resample."""
    member = np.asarray(member, dtype=bool)
    est = _as_table(est, member)
    true_mean = seed_mean(true, member)
    n = member.shape[1]
    subsets = [np.flatnonzero(member[:, i]) for i in range(n)]
    tasks = [i for i in range(n) if len(subsets[i])]

    def points(draws: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Centred points of draws {task: [B, m] subset indices} -> X, Y [B, P]."""
        xs, ys = [], []
        for i, d in draws.items():
            e = np.moveaxis(est[:, d, i], 0, 1)  # [B, S, m]
            t = true_mean[d, i]  # [B, m]
            e = e - _nanmean(e, axis=2, keepdims=True)
            t = t - _nanmean(t, axis=1, keepdims=True)
            xs.append(e.reshape(len(d), -1))
            ys.append(np.broadcast_to(t[:, None, :], e.shape).reshape(len(d), -1))
        return np.concatenate(xs, axis=1), np.concatenate(ys, axis=1)

    def rho(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
        ok = np.isfinite(X).all(0) & np.isfinite(Y).all(0)  # (members always have values; guard anyway)
        return _row_spearman(X[:, ok], Y[:, ok]) if ok.sum() >= 3 else np.full(len(X), np.nan)

    value = float(rho(*points({i: subsets[i][None] for i in tasks}))[0]) if tasks else float("nan")
    per_task = {i: float(rho(*points({i: subsets[i][None]}))[0]) if i in tasks else float("nan") for i in range(n)}
    rng = np.random.default_rng(seed)
    boots = np.empty(0)
    if tasks and bootstrap:
        draws = {i: subsets[i][rng.integers(0, len(subsets[i]), (bootstrap, len(subsets[i])))] for i in tasks}
        boots = rho(*points(draws))
        boots = boots[np.isfinite(boots)]
    ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots.size else [float("nan")] * 2
    points_n = int(est.shape[0] * member.sum())
    return {"value": value, "ci95": ci, "per_task": per_task, "points": points_n, "bootstrap": bootstrap}


def seed_noise(true: np.ndarray, member: np.ndarray) -> np.ndarray:
    """Per task: the SD of the true value across seeds, pooled over the task's subsets (0 with one seed)."""
    member = np.asarray(member, dtype=bool)
    true = _as_table(true, member)
    if true.shape[0] < 2:
        return np.zeros(member.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        var = np.nanvar(true, axis=0, ddof=1)  # [K, n]
    pooled = np.array(
        [_nanmean(var[member[:, i], i]) if member[:, i].any() else np.nan for i in range(member.shape[1])]
    )
    return np.sqrt(pooled)


def pairwise_order(est: np.ndarray, true: np.ndarray, member: np.ndarray, factor: float = 2.0) -> dict[str, Any]:
    """Over subset pairs (S, S') sharing task t whose seed-mean true gap exceeds factor x t's seed noise: the
    share (over pairs and estimate seeds) the estimate orders the same way; a tie in the estimate counts 1/2."""
    member = np.asarray(member, dtype=bool)
    est = _as_table(est, member)
    true = _as_table(true, member)
    true_mean = _nanmean(true, axis=0)
    noise = seed_noise(true, member)
    score, comparisons, pairs = 0.0, 0, 0
    for i in range(member.shape[1]):
        ks = np.flatnonzero(member[:, i])
        a, b = np.triu_indices(len(ks), 1)
        ka, kb = ks[a], ks[b]
        gap = true_mean[ka, i] - true_mean[kb, i]
        keep = np.isfinite(gap) & (np.abs(gap) > factor * noise[i])
        if not keep.any():
            continue
        ka, kb, gap = ka[keep], kb[keep], gap[keep]
        pairs += len(gap)
        d = est[:, ka, i] - est[:, kb, i]  # [S, pairs]
        ok = np.isfinite(d)
        agree = np.where(d == 0, 0.5, (np.sign(d) == np.sign(gap)[None]).astype(float))
        score += float(agree[ok].sum())
        comparisons += int(ok.sum())
    return {
        "value": score / comparisons if comparisons else float("nan"),
        "pairs": pairs,
        "comparisons": comparisons,
        "factor": factor,
        "seed_noise": noise.tolist(),
    }


def change_skill(est_change: np.ndarray, true_change: np.ndarray) -> float:
    """1 - sum (est - true)^2 / sum true^2 over the finite pairs (1: perfect, 0: no better than 'no change')."""
    e = np.asarray(est_change, dtype=float).ravel()
    t = np.broadcast_to(np.asarray(true_change, dtype=float), np.shape(est_change)).ravel()
    ok = np.isfinite(e) & np.isfinite(t)
    denom = float((t[ok] ** 2).sum())
    if not ok.any() or denom == 0:
        return float("nan")
    return 1.0 - float(((e[ok] - t[ok]) ** 2).sum()) / denom


def affinity_from_table(values: np.ndarray, member: np.ndarray) -> np.ndarray:
    """T [n, n] from one [K, n] table: T[i, j] = mean over subsets holding i and j of values[k, i] (NaN if none)."""
    member = np.asarray(member, dtype=bool)
    V = np.where(member, np.asarray(values, dtype=float), 0.0)
    ok = member & np.isfinite(V)
    V = np.where(ok, V, 0.0)
    num = V.T @ member.astype(float)
    cnt = ok.astype(float).T @ member.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, num / np.maximum(cnt, 1), np.nan)


def row_centre(T: np.ndarray) -> np.ndarray:
    """T minus each row's mean over its finite off-diagonal entries; the diagonal becomes NaN."""
    T = np.array(T, dtype=float)
    np.fill_diagonal(T, np.nan)
    mean = _nanmean(np.where(np.isfinite(T), T, np.nan), axis=1, keepdims=True)
    return T - np.where(np.isfinite(mean), mean, 0.0)


def offdiag_corr(A: np.ndarray, B: np.ndarray, centred: bool = False) -> float:
    """Pearson correlation of the off-diagonal entries finite in both row-centred matrices."""
    if not centred:
        A, B = row_centre(A), row_centre(B)
    off = ~np.eye(len(A), dtype=bool) & np.isfinite(A) & np.isfinite(B)
    a, b = A[off], B[off]
    if a.size < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def mantel(
    A: np.ndarray | Sequence[np.ndarray], B: np.ndarray, permutations: int = 999, seed: int = 0
) -> dict[str, Any]:
    """offdiag_corr(A, B) (the mean over A's matrices when a list is given) and its one-sided Mantel p-value:
    B's task labels permuted jointly on rows and columns, p = (1 + #{perm >= observed}) / (1 + permutations)."""
    As = [row_centre(a) for a in ([A] if isinstance(A, np.ndarray) and A.ndim == 2 else A)]
    Bc = row_centre(B)

    def stat(Bm: np.ndarray) -> float:
        vals = [offdiag_corr(a, Bm, centred=True) for a in As]
        return float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")

    observed = stat(Bc)
    if not np.isfinite(observed):
        return {"value": observed, "p": float("nan"), "permutations": permutations}
    rng = np.random.default_rng(seed)
    n = len(Bc)
    hits = 0
    for _ in range(permutations):
        p = rng.permutation(n)
        s = stat(Bc[np.ix_(p, p)])
        hits += int(np.isfinite(s) and s >= observed - 1e-12)
    return {"value": observed, "p": (1 + hits) / (1 + permutations), "permutations": permutations}


def labels_of(groups: Sequence[Sequence[int]], n: int) -> np.ndarray:
    labels = np.full(n, -1)
    for g, members in enumerate(groups):
        labels[list(members)] = g
    if (labels < 0).any():
        raise ValueError(f"groups {groups} do not cover all {n} tasks")
    return labels


def adjusted_rand(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (sklearn's adjusted_rand_score, without its per-call overhead)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), pairs(np.array([len(a)]))
    expected = rows * cols / total if total else 0.0
    top = (rows + cols) / 2
    if top == expected:  # both trivial (one cluster, or all singletons): sklearn's convention
        return 1.0
    return (index - expected) / (top - expected)


def ari_vs_random(
    true_groups: Sequence[Sequence[int]],
    est_groups: Sequence[Sequence[Sequence[int]]],
    n: int,
    random_partitions: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean ARI of the estimated partitions against the true one, and the 95th percentile of the ARI between the
    true partition and random partitions with the true partition's group sizes."""
    truth = labels_of(true_groups, n)
    values = [adjusted_rand(truth, labels_of(g, n)) for g in est_groups]
    rng = np.random.default_rng(seed)
    null = np.array([adjusted_rand(truth, rng.permutation(truth)) for _ in range(random_partitions)])
    return {
        "value": float(np.mean(values)) if values else float("nan"),
        "per_estimate": values,
        "random_p95": float(np.percentile(null, 95)),
        "random_mean": float(null.mean()),
    }
