"""Grouping: the SDP recovers planted groups, exactly m non-empty groups, auto m, the affinity matrix."""

from __future__ import annotations

import numpy as np
import pytest

from shared.ml.affinity.grouping import group_auto, group_fixed
from shared.ml.affinity.matrix import affinity_matrix, clustering_matrix


def _planted(sizes, seed=0, noise=0.03, within=0.8, between=0.5):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(labels)
    T = np.where(labels[:, None] == labels[None, :], within, between) + rng.normal(0, noise, (len(labels),) * 2)
    # task-specific levels (easy vs hard tasks) must not matter
    T += rng.uniform(-0.2, 0.2, size=(len(labels), 1))
    return T, labels


def _as_sets(groups):
    return {frozenset(g) for g in groups}


@pytest.mark.parametrize("sizes", [[3, 3, 3], [2, 4, 3, 3], [5, 2]])
def test_sdp_recovers_planted_groups(sizes):
    T, labels = _planted(sizes, seed=len(sizes))
    planted = {frozenset(np.flatnonzero(labels == g).tolist()) for g in range(len(sizes))}
    res = group_fixed(clustering_matrix(T), len(sizes), method="sdp")
    assert res.method == "sdp"
    assert _as_sets(res.groups) == planted
    spec = group_fixed(clustering_matrix(T), len(sizes), method="spectral")
    assert _as_sets(spec.groups) == planted


def test_exactly_m_non_empty_groups_for_every_m():
    T, _ = _planted([3, 3, 3], seed=5)
    C = clustering_matrix(T)
    for m in range(1, 10):
        res = group_fixed(C, m)
        assert len(res.groups) == m and all(res.groups)
        assert sorted(i for g in res.groups for i in g) == list(range(9))


def test_duplicate_rows_still_give_m_groups():
    T = np.ones((6, 6))  # no structure at all: every row of X is the same
    res = group_fixed(T, 4)
    assert len(res.groups) == 4 and all(res.groups)


def test_auto_chooses_the_planted_number():
    T, labels = _planted([3, 3, 3], seed=7)
    res = group_auto(clustering_matrix(T))
    assert res.m == 3 and "silhouette_by_m" in res.details


def test_bad_m_is_rejected():
    with pytest.raises(ValueError, match="between 1 and"):
        group_fixed(np.eye(3), 4)


def test_affinity_matrix_is_the_mean_over_subsets_containing_both():
    tasks = ["a", "b", "c"]
    subsets = [["a", "b"], ["a", "c"], ["a", "b", "c"]]
    table = [
        {"subset": 0, "task": "a", "loss": 1.0, "accuracy": 0.6, "macro_f1": 0.5},
        {"subset": 0, "task": "b", "loss": 2.0, "accuracy": 0.7, "macro_f1": 0.5},
        {"subset": 1, "task": "a", "loss": 3.0, "accuracy": 0.8, "macro_f1": 0.5},
        {"subset": 1, "task": "c", "loss": 4.0, "accuracy": 0.9, "macro_f1": 0.5},
        {"subset": 2, "task": "a", "loss": 5.0, "accuracy": 1.0, "macro_f1": 0.5},
        {"subset": 2, "task": "b", "loss": 6.0, "accuracy": 0.1, "macro_f1": 0.5},
        {"subset": 2, "task": "c", "loss": 7.0, "accuracy": 0.2, "macro_f1": 0.5},
    ]
    T, counts = affinity_matrix(tasks, subsets, table, "accuracy")
    assert T[0, 1] == pytest.approx((0.6 + 1.0) / 2) and counts[0, 1] == 2
    assert T[0, 0] == pytest.approx((0.6 + 0.8 + 1.0) / 3) and counts[0, 0] == 3
    assert T[1, 2] == pytest.approx(0.1) and T[2, 1] == pytest.approx(0.2)
    L, _ = affinity_matrix(tasks, subsets, table, "neg_loss")
    assert L[0, 2] == pytest.approx(-(3.0 + 5.0) / 2)
