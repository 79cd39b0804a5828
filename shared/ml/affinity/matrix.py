"""The task-affinity matrix from the per-subset table, and its heatmap.

T[i, j] = mean over the subsets S that contain both i and j of perf_i(S), where perf is "higher is
better": accuracy, macro_f1, or neg_loss (= -loss). The diagonal T[i, i] is the mean over every subset
containing i. `counts[i][j]` is the number of subsets averaged in each cell; a pair that never co-occurs
is NaN (null in JSON). For clustering, `clustering_matrix` removes each row's own level (row centring:
T[i, j] - mean_j T[i, j], a per-task constant that cannot change a partition's SDP objective because
every row of X sums to 1) and symmetrises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared.ml.plotting import save_png

METRICS = ("accuracy", "neg_loss", "macro_f1")


def perf_value(row: Mapping[str, Any], metric: str) -> float:
    """Higher-is-better performance of a table row (NaN when the row has no such value)."""
    key = "loss" if metric == "neg_loss" else metric
    if metric not in METRICS:
        raise ValueError(f"unknown affinity metric {metric!r}; expected one of {METRICS}")
    value = row.get(key)
    if value is None:
        return float("nan")
    return -float(value) if metric == "neg_loss" else float(value)
    raise ValueError(f"unknown affinity metric {metric!r}; expected one of {METRICS}")


def affinity_matrix(
    tasks: Sequence[str], subsets: Sequence[Sequence[str]], table: Sequence[Mapping[str, Any]], metric: str = "accuracy"
) -> tuple[np.ndarray, np.ndarray]:
    """(T [n, n], counts [n, n]) from table rows {subset: index, task: name, loss, accuracy, macro_f1}."""
    index = {t: i for i, t in enumerate(tasks)}
    n = len(tasks)
    total = np.zeros((n, n))
    counts = np.zeros((n, n), dtype=int)
    for row in table:
        subset = subsets[int(row["subset"])]
        i = index[row["task"]]
        value = perf_value(row, metric)
        if not math.isfinite(value):
            continue
        for other in subset:
            j = index[other]
            total[i, j] += value
            counts[i, j] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        T = np.where(counts > 0, total / np.maximum(counts, 1), np.nan)
    return T, counts


def symmetrise(T: np.ndarray) -> np.ndarray:
    return (T + T.T) / 2


def clustering_matrix(T: np.ndarray, centre: bool = True) -> np.ndarray:
    """Row-centred (optional), symmetrised T with missing cells filled by the row mean (then 0)."""
    T = np.array(T, dtype=float)
    row_mean = np.nanmean(np.where(np.isfinite(T), T, np.nan), axis=1, keepdims=True)
    row_mean = np.where(np.isfinite(row_mean), row_mean, 0.0)
    T = np.where(np.isfinite(T), T, row_mean)
    if centre:
        T = T - T.mean(axis=1, keepdims=True)
    return symmetrise(T)


def to_json_matrix(M: np.ndarray) -> list[list[float | None]]:
    return [[(float(v) if np.isfinite(v) else None) for v in row] for row in np.asarray(M, dtype=float)]


def from_json_matrix(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=float)


def heatmap(
    path: Path,
    tasks: Sequence[str],
    T: np.ndarray,
    title: str,
    groups: Sequence[Sequence[str]] | None = None,
    counts: np.ndarray | None = None,
) -> None:
    """PNG heatmap with task names; tasks are reordered by group and each group is outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    order = list(range(len(tasks)))
    bounds: list[tuple[int, int]] = []
    if groups:
        index = {t: i for i, t in enumerate(tasks)}
        order, start = [], 0
        for g in groups:
            order.extend(index[t] for t in g)
            bounds.append((start, len(g)))
            start += len(g)
    M = np.asarray(T, dtype=float)[np.ix_(order, order)]
    names = [tasks[i] for i in order]
    n = len(names)
    size = max(4.0, 0.6 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(np.ma.masked_invalid(M), cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), names, rotation=60, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("j (co-trained task)")
    ax.set_ylabel("i (evaluated task)")
    ax.set_title(title)
    if n <= 16:
        finite = M[np.isfinite(M)]
        mid = float(np.median(finite)) if finite.size else 0.0
        for a in range(n):
            for b in range(n):
                if np.isfinite(M[a, b]):
                    ax.text(
                        b,
                        a,
                        f"{M[a, b]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if M[a, b] < mid else "black",
                    )
    for start, length in bounds:
        ax.add_patch(Rectangle((start - 0.5, start - 0.5), length, length, fill=False, edgecolor="red", linewidth=2))
    fig.tight_layout()
    save_png(fig, path)
