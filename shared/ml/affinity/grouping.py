"""Grouping tasks by affinity: the Peng-Wei k-means SDP, rounded to EXACTLY m non-empty groups.

SDP: maximise <C, X> s.t. X PSD, X >= 0 (elementwise), X 1 = 1, tr X = m, where C is the clustering
matrix (symmetrised, row-centred affinity, standardised for conditioning; shifts and positive scalings of
C do not move the optimum). Solved with cvxpy + CLARABEL (SCS as the second choice).

Rounding: k-means (m clusters, seeded, many restarts) on the rows of X; an empty group (only possible
when rows coincide) is filled with the member of the largest group that fits it least; then a local
search moves single tasks between groups while the partition objective
    sum_groups (1 / |G|) sum_{i, j in G} C[i, j]   (= <C, X_partition>, the SDP's own objective)
improves and no group empties. Spectral clustering (sklearn, affinity exp(C / std C)) is the fallback
when the SDP fails and the default above `sdp_max_n` tasks.

Choosing m automatically ("auto"): for each m in 2 .. min(n - 1, m_max) the partition above is computed
and scored by its silhouette on the distance D[i, j] = max(C) - C[i, j] (D[i, i] = 0); the m with the
highest silhouette wins (ties: the smaller m). When the best silhouette is <= 0 (no group structure) or
n <= 2, a single group is returned if the off-diagonal affinity is at least the mean within-task
affinity, else singletons.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Grouping:
    groups: list[list[int]]  # task indices, each group sorted, groups ordered by their first member
    method: str  # "sdp" | "spectral" | "trivial"
    m: int
    objective: float  # <C, X_partition> on the standardised clustering matrix
    details: dict[str, Any] = field(default_factory=dict)


def standardise(C: np.ndarray) -> np.ndarray:
    C = np.asarray(C, dtype=float)
    C = (C + C.T) / 2
    off = C[~np.eye(len(C), dtype=bool)] if len(C) > 1 else C.ravel()
    scale = float(off.std()) if off.size and off.std() > 1e-12 else 1.0
    return (C - float(C.mean())) / scale


def partition_objective(C: np.ndarray, labels: np.ndarray) -> float:
    total = 0.0
    for g in np.unique(labels):
        idx = np.flatnonzero(labels == g)
        total += C[np.ix_(idx, idx)].sum() / len(idx)
    return float(total)


def solve_sdp(C: np.ndarray, m: int, solver: str | None = None) -> np.ndarray:
    """The relaxed cluster matrix X (n x n) for m groups."""
    import cvxpy as cp

    n = len(C)
    X = cp.Variable((n, n), symmetric=True)
    constraints = [X >> 0, X >= 0, cp.sum(X, axis=1) == 1, cp.trace(X) == m]
    problem = cp.Problem(cp.Maximize(cp.trace(C @ X)), constraints)
    solvers = [solver] if solver else ["CLARABEL", "SCS"]
    last: Exception | None = None
    for name in solvers:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                problem.solve(solver=name)
            if problem.status in ("optimal", "optimal_inaccurate") and X.value is not None:
                return np.asarray(X.value)
            last = RuntimeError(f"{name}: status {problem.status}")
        except Exception as exc:  # solver missing or numerical failure: try the next
            last = exc
    raise RuntimeError(f"SDP failed: {last}")


def _fix_empty(labels: np.ndarray, m: int, C: np.ndarray) -> np.ndarray:
    labels = labels.copy()
    for g in range(m):
        if (labels == g).any():
            continue
        sizes = np.bincount(labels, minlength=m)
        big = int(np.argmax(sizes))
        members = np.flatnonzero(labels == big)
        fit = [C[i, members].sum() - C[i, i] for i in members]
        labels[members[int(np.argmin(fit))]] = g
    return labels


def local_search(C: np.ndarray, labels: np.ndarray, m: int, max_rounds: int = 100) -> np.ndarray:
    """Single-task moves that raise the partition objective, keeping all m groups non-empty."""
    labels = labels.copy()
    best = partition_objective(C, labels)
    for _ in range(max_rounds):
        improved = False
        for i in range(len(labels)):
            src = labels[i]
            if (labels == src).sum() == 1:
                continue
            for dst in range(m):
                if dst == src:
                    continue
                labels[i] = dst
                value = partition_objective(C, labels)
                if value > best + 1e-9:
                    best, src, improved = value, dst, True
                else:
                    labels[i] = src
        if not improved:
            break
    return labels


def round_rows(X: np.ndarray, m: int, C: np.ndarray, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "number of distinct clusters found smaller than n_clusters"
        labels = KMeans(n_clusters=m, n_init=20, random_state=seed).fit_predict(X)
    return _fix_empty(labels, m, C)


def spectral_labels(C: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    from sklearn.cluster import SpectralClustering

    off = C[~np.eye(len(C), dtype=bool)]
    tau = float(off.std()) if off.size and off.std() > 1e-12 else 1.0
    A = np.exp((C - C.max()) / tau)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = SpectralClustering(
            n_clusters=m, affinity="precomputed", random_state=seed, n_init=20, assign_labels="kmeans"
        ).fit_predict(A)
    return _fix_empty(labels, m, C)


def _canonical(labels: np.ndarray) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(labels):
        groups.setdefault(int(g), []).append(i)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def group_fixed(C: np.ndarray, m: int, method: str = "auto", seed: int = 0, sdp_max_n: int = 40) -> Grouping:
    """Exactly m non-empty groups of the n tasks of C."""
    n = len(C)
    if not 1 <= m <= n:
        raise ValueError(f"number of groups must be between 1 and the number of tasks ({n}), got {m}")
    if method not in ("auto", "sdp", "spectral"):
        raise ValueError(f"unknown grouping method {method!r}; expected auto, sdp or spectral")
    Cs = standardise(C)
    if m == 1 or m == n:
        trivial = np.zeros(n, dtype=int) if m == 1 else np.arange(n)
        return Grouping(_canonical(trivial), "trivial", m, partition_objective(Cs, trivial))
    details: dict[str, Any] = {}
    used = "spectral"
    labels: np.ndarray | None = None
    if method == "sdp" or (method == "auto" and n <= sdp_max_n):
        try:
            X = solve_sdp(Cs, m)
            details["sdp_value"] = float(np.trace(Cs @ X))
            labels = round_rows(X, m, Cs, seed)
            used = "sdp"
        except Exception as exc:
            if method == "sdp":
                raise
            details["sdp_error"] = str(exc)
    if labels is None:
        labels = spectral_labels(Cs, m, seed)
    rounded = partition_objective(Cs, labels)
    labels = local_search(Cs, labels, m)
    details["rounded_objective"] = rounded
    groups = _canonical(labels)
    assert len(groups) == m and all(groups)
    return Grouping(groups, used, m, partition_objective(Cs, labels), details)


def silhouette(C: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.metrics import silhouette_score

    D = C.max() - C
    np.fill_diagonal(D, 0.0)
    D = np.maximum(D, 0.0)
    return float(silhouette_score(D, labels, metric="precomputed"))


def group_auto(
    C: np.ndarray, method: str = "auto", seed: int = 0, m_max: int | None = None, sdp_max_n: int = 40
) -> Grouping:
    """Choose m by the silhouette rule (module docstring) and return that grouping."""
    n = len(C)
    Cs = standardise(C)
    scores: dict[int, float] = {}
    candidates: dict[int, Grouping] = {}
    upper = min(n - 1, m_max if m_max else n - 1)
    for m in range(2, upper + 1):
        g = group_fixed(C, m, method, seed, sdp_max_n)
        labels = np.empty(n, dtype=int)
        for k, members in enumerate(g.groups):
            labels[members] = k
        scores[m] = silhouette(Cs, labels)
        candidates[m] = g
    rule = "silhouette on D = max(C) - C over m in 2..n-1; ties -> smaller m; <= 0 -> 1 group or singletons"
    if scores and max(scores.values()) > 0:
        best = max(scores, key=lambda m: (scores[m], -m))
        chosen = candidates[best]
    else:
        off = Cs[~np.eye(n, dtype=bool)].mean() if n > 1 else 0.0
        chosen = group_fixed(C, 1 if off >= np.diag(Cs).mean() else n, method, seed, sdp_max_n)
    chosen.details.update({"m_rule": rule, "silhouette_by_m": {str(k): v for k, v in scores.items()}})
    return chosen
