"""validate-affinity: the agreement statistics on synthetic tables with known answers, and the CLI end to end
on tiny-llama (CPU)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from shared.ml.affinity import agreement as ag
from shared.ml.affinity.params import AffinityParams, ValidateAffinityParams
from shared.ml.affinity.subsets import pair_counts
from shared.ml.affinity.validate_affinity import METRICS, agreement_report, plan_subsets
from tests.recompute import forward_flops, lengths_by_task, llama_shape, read_rows, tiny_llama_config, train_flops

TWELVE = ["cb", "rte", "sst2", "boolq", "mr", "cr", "subj", "trec", "sst5", "mpqa", "copa", "wic"]
N, GROUPS = 12, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
CONTRACT = {
    "spearman_within_task",
    "pairwise_order_accuracy",
    "change_skill",
    "t_correlation",
    "t_true_reliability",
    "ari",
}


def _planted(seeds: int = 2, noise: float = 0.05, seed: int = 0):
    """Subsets of 3 of 12 tasks in 3 planted groups: perf_i(S) = level_i + sum_{j in S, j != i} (+1 same group, -1
    other), plus seed noise. Returns (subsets, member [K, n], true [seeds, K, n], truth without noise [K, n])."""
    subsets, _ = plan_subsets(N, 3, enumerate_limit=20, min_subsets=40, coverage=5, seed=0)
    group = {i: g for g, members in enumerate(GROUPS) for i in members}
    rng = np.random.default_rng(seed)
    level = rng.normal(0, 1, N)
    member = np.zeros((len(subsets), N), dtype=bool)
    clean = np.full((len(subsets), N), np.nan)
    for k, s in enumerate(subsets):
        member[k, list(s)] = True
        for i in s:
            clean[k, i] = level[i] + sum(1.0 if group[i] == group[j] else -1.0 for j in s if j != i)
    true = np.stack([clean + rng.normal(0, noise, clean.shape) for _ in range(seeds)])
    return subsets, member, true, clean


def _records(params, subsets, est, true, theta0):
    """Per-seed estimate / truth records as validate_affinity writes them, from [S, K, n] tables."""

    def metrics(v):
        return {m: float(v) for m in METRICS}

    est_recs, truth_recs = [], []
    for s in range(est.shape[0]):
        est_recs.append(
            {
                "seed": s,
                "init": "base",
                "theta0": {t: metrics(theta0[i]) for i, t in enumerate(params.tasks)},
                "estimates": [{params.tasks[i]: metrics(est[s, k, i]) for i in sub} for k, sub in enumerate(subsets)],
            }
        )
        truth_recs.append(
            {
                "seed": s,
                "all_tasks": None,
                "adapters": [
                    {"metrics": {params.tasks[i]: metrics(true[s, k, i]) for i in sub}} for k, sub in enumerate(subsets)
                ],
            }
        )
    return est_recs, truth_recs


# ------------------------------------------------------------------------------------------ statistics


def test_plan_subsets_enumerates_small_and_samples_at_least_the_minimum():
    all6, info = plan_subsets(6, 3, enumerate_limit=20)
    assert len(all6) == 20 and info["rule"] == "all"
    drawn, info = plan_subsets(8, 3, enumerate_limit=20, min_subsets=40, coverage=1)
    assert info["rule"] == "sampled" and len(drawn) >= 40 and len(set(drawn)) == len(drawn)
    counts = np.array(pair_counts(8, drawn))
    assert counts[~np.eye(8, dtype=bool)].min() >= 1
    with pytest.raises(ValueError, match="subset size"):
        plan_subsets(3, 3)


def test_perfect_estimate_scores_one_everywhere():
    subsets, member, true, _ = _planted()
    params = ValidateAffinityParams(tasks=TWELVE, groups=3)
    true_mean = ag.seed_mean(true, member)
    est = np.stack([true_mean] * 2)
    theta0 = np.zeros(N)
    rep = agreement_report(params, subsets, *_records(params, subsets, est, true, theta0))
    assert CONTRACT <= set(rep)
    assert rep["spearman_within_task"]["value"] == pytest.approx(1.0)
    assert rep["spearman_within_task"]["ci95"] == pytest.approx([1.0, 1.0])
    assert rep["pairwise_order_accuracy"] == pytest.approx(1.0)
    assert rep["change_skill"] == pytest.approx(1.0)
    assert rep["t_correlation"]["value"] == pytest.approx(1.0) and rep["t_correlation"]["p"] < 0.01
    assert rep["ari"]["est_vs_true"] == pytest.approx(1.0) and rep["ari"]["random_p95"] < 1.0
    assert 0.9 < rep["t_true_reliability"] <= 1.0  # small seed noise: the two seeds' T_true nearly agree
    groups = rep["detail"]["groups"]["true"]
    assert sorted(sorted(g) for g in groups) == sorted(sorted(params.tasks[i] for i in g) for g in GROUPS)


def test_negated_and_independent_estimates():
    subsets, member, true, _ = _planted()
    true_mean = ag.seed_mean(true, member)
    neg = ag.within_task_spearman(np.stack([-true_mean] * 2), true, member, bootstrap=300, seed=1)
    assert neg["value"] == pytest.approx(-1.0)
    rng = np.random.default_rng(7)
    noise = np.where(member[None], rng.normal(0, 1, (2, *member.shape)), np.nan)
    ind = ag.within_task_spearman(noise, true, member, bootstrap=500, seed=1)
    lo, hi = ind["ci95"]
    assert lo < 0 < hi and abs(ind["value"]) < 0.3
    assert set(ind["per_task"]) == set(range(N))


def test_pairwise_order_counts_only_pairs_beyond_the_seed_noise():
    member = np.ones((3, 1), dtype=bool)
    true = np.array([[0.0, 1.0, 1.1], [0.1, 1.1, 1.0]])[:, :, None]  # seed noise 0.0707; gap(1, 2) = 0 is excluded
    right = ag.pairwise_order(np.array([[0.0, 2.0, 1.0]])[:, :, None], true, member)
    assert right["pairs"] == 2 and right["value"] == 1.0
    half = ag.pairwise_order(np.array([[1.0, 0.0, 2.0]])[:, :, None], true, member)
    assert half["value"] == 0.5
    assert ag.seed_noise(true, member)[0] == pytest.approx(math.sqrt(0.005))


def test_change_skill_is_one_for_the_truth_and_zero_for_no_change():
    t = np.array([0.5, -0.2, 0.1, np.nan])
    assert ag.change_skill(t, t) == pytest.approx(1.0)
    assert ag.change_skill(np.zeros(4), t) == pytest.approx(0.0)
    assert ag.change_skill(2 * t, t) == pytest.approx(0.0)


def test_mantel_p_small_for_planted_structure_and_large_for_noise():
    subsets, member, true, clean = _planted()
    T_true = ag.affinity_from_table(ag.seed_mean(true, member), member)
    rng = np.random.default_rng(3)
    planted = T_true + rng.normal(0, 0.3, T_true.shape)
    hit = ag.mantel(planted, T_true, permutations=999, seed=0)
    assert hit["value"] > 0.5 and hit["p"] < 0.01
    miss = ag.mantel(rng.normal(0, 1, T_true.shape), T_true, permutations=999, seed=0)
    assert miss["p"] > 0.05


def test_affinity_from_table_matches_the_definition():
    member = np.array([[1, 1, 0], [1, 0, 1], [1, 1, 1]], dtype=bool)
    values = np.array([[1.0, 2.0, np.nan], [3.0, np.nan, 4.0], [5.0, 6.0, 7.0]])
    T = ag.affinity_from_table(values, member)
    assert T[0, 0] == pytest.approx(3.0) and T[0, 1] == pytest.approx(3.0) and T[0, 2] == pytest.approx(4.0)
    assert T[1, 2] == pytest.approx(6.0) and T[2, 1] == pytest.approx(7.0)


def test_ari_of_identical_groups_is_one_and_random_partitions_rarely_match():
    res = ag.ari_vs_random(GROUPS, [GROUPS], N, random_partitions=1000, seed=0)
    assert res["value"] == pytest.approx(1.0) and res["random_p95"] < 0.5
    other = [[0, 4, 8, 1], [5, 9, 2, 6], [10, 3, 7, 11]]
    assert ag.ari_vs_random(GROUPS, [other], N)["value"] < 0.2


def test_adjusted_rand_matches_sklearn():
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = rng.integers(0, rng.integers(1, 5), 10), rng.integers(0, rng.integers(1, 5), 10)
        assert ag.adjusted_rand(a, b) == pytest.approx(adjusted_rand_score(a, b))
    assert ag.adjusted_rand(np.arange(6), np.arange(6)) == adjusted_rand_score(np.arange(6), np.arange(6))
    assert ag.adjusted_rand(np.array([0]), np.array([3])) == adjusted_rand_score([0], [3]) == 1.0  # no pair at all


def _small_tables():
    """3 tasks, 5 subsets; task 2 is in none. Two estimate seeds, the second shifted by 10 (centring removes it)."""
    member = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 1, 0]], dtype=bool)
    base = np.array([[0.3, 1.0, 0], [0.1, 0, 0], [0.9, 0.2, 0], [0.5, 0, 0], [0, 0.6, 0]])
    est = np.stack([base + np.array([[0.0, 0.4, 0], [0.2, 0, 0], [0.1, 0.0, 0], [-0.3, 0, 0], [0, 0.1, 0]]), base + 10])
    true = np.stack([base, base + 0.02])
    return member, est, true


def _centred_points(est, true_mean, member, tasks):
    xs, ys = [], []
    for i in tasks:
        ks = np.flatnonzero(member[:, i])
        for s in range(est.shape[0]):
            xs += list(est[s, ks, i] - est[s, ks, i].mean())
            ys += list(true_mean[ks, i] - true_mean[ks, i].mean())
    return xs, ys


def test_within_task_spearman_centres_each_seed_and_task_and_reports_its_counts():
    from scipy.stats import spearmanr

    member, est, true = _small_tables()
    res = ag.within_task_spearman(est, true, member, bootstrap=50, seed=3)
    assert set(res) == {"value", "ci95", "per_task", "points", "bootstrap"}
    true_mean = true.mean(0)
    assert res["value"] == pytest.approx(spearmanr(*_centred_points(est, true_mean, member, [0, 1]))[0])
    assert res["per_task"][0] == pytest.approx(spearmanr(*_centred_points(est, true_mean, member, [0]))[0])
    assert res["per_task"][1] == pytest.approx(spearmanr(*_centred_points(est, true_mean, member, [1]))[0])
    assert math.isnan(res["per_task"][2]) and set(res["per_task"]) == {0, 1, 2}
    assert res["points"] == 2 * 7 and res["bootstrap"] == 50
    # defaults: 2000 resamples from seed 0, reproducible
    default, explicit = ag.within_task_spearman(est, true, member), ag.within_task_spearman(est, true, member, 2000, 0)
    assert default["ci95"] == explicit["ci95"] and default["bootstrap"] == 2000


def test_within_task_spearman_drops_missing_points_and_needs_three():
    member, est, true = _small_tables()
    gappy = est.copy()
    gappy[0, 0, 0] = np.nan  # a missing estimate drops that point only
    full = ag.within_task_spearman(gappy, true, member, bootstrap=0)
    assert np.isfinite(full["value"]) and np.isfinite(full["per_task"][0])
    t2 = true.copy()
    t2[:, 2, 1] = np.nan  # a missing truth (every seed) drops the task's points in that subset
    assert np.isfinite(ag.within_task_spearman(est, t2, member, bootstrap=0)["per_task"][1])
    # one seed of a task in two subsets: 2 points, no correlation; in three subsets: 3 points are enough
    two = np.array([[1], [1]], dtype=bool)
    assert math.isnan(ag.within_task_spearman(np.array([[[0.0], [1.0]]]), np.array([[[0.0], [1.0]]]), two)["value"])
    three = np.ones((3, 1), dtype=bool)
    one = ag.within_task_spearman(np.array([[[0.0], [1.0], [2.0]]]), np.array([[[0.0], [1.0], [2.0]]]), three)
    assert one["value"] == pytest.approx(1.0) and one["per_task"][0] == pytest.approx(1.0)


def test_within_task_spearman_without_tasks_or_resamples_has_no_interval():
    member, est, true = _small_tables()
    none = ag.within_task_spearman(est, true, np.zeros_like(member))
    assert math.isnan(none["value"]) and all(math.isnan(v) for v in none["per_task"].values())
    assert len(none["ci95"]) == 2 and all(math.isnan(v) for v in none["ci95"]) and none["points"] == 0
    nob = ag.within_task_spearman(est, true, member, bootstrap=0)
    assert len(nob["ci95"]) == 2 and all(math.isnan(v) for v in nob["ci95"]) and np.isfinite(nob["value"])


def test_within_task_spearman_bootstrap_draws_every_subset_and_takes_the_central_95(monkeypatch):
    # one task in two subsets, two seeds: a resample of both subsets reproduces the value, one subset twice is
    # constant (dropped); drawing only from the second subset would leave no resample at all
    est = np.array([[[0.0], [1.0]], [[0.5], [2.0]]])
    res = ag.within_task_spearman(est, est, np.ones((2, 1), dtype=bool), bootstrap=200, seed=0)
    assert 0 < res["value"] < 1 and res["ci95"] == pytest.approx([res["value"]] * 2)
    member, est, true = _small_tables()
    fake = np.concatenate([np.linspace(-1, 1, 41), [np.nan] * 9])
    real, seen = ag._row_spearman, []

    def row_spearman(X, Y):
        if len(X) != 50:
            return real(X, Y)
        seen.append((X, Y))
        return fake

    monkeypatch.setattr(ag, "_row_spearman", row_spearman)
    ci = ag.within_task_spearman(est, true, member, bootstrap=50, seed=0)["ci95"]
    finite = fake[np.isfinite(fake)]
    assert ci == pytest.approx([np.percentile(finite, 2.5), np.percentile(finite, 97.5)])
    # every resample is centred on its own: task 0's 2 x 4 points, then task 1's 2 x 3, each sum to 0 per seed
    ((X, Y),) = seen
    for block in (X[:, 0:4], X[:, 4:8], Y[:, 0:4], X[:, 8:11], X[:, 11:14], Y[:, 8:11]):
        assert np.abs(block.sum(1)).max() < 1e-9


def test_row_spearman_is_spearman_per_row_and_nan_for_a_constant_row():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    X[1] *= 100  # rows of different spread
    rho = ag._row_spearman(X, Y)
    assert rho == pytest.approx([spearmanr(X[k], Y[k])[0] for k in range(3)])
    pair = ag._row_spearman(np.array([[0.0, 1.0], [1.0, 1.0]]), np.array([[0.0, 1.0], [0.0, 1.0]]))
    assert pair[0] == 1.0 and math.isnan(pair[1])


def test_seed_noise_needs_two_seeds_and_takes_integer_membership():
    true = np.array([[[0.0, 1.0]], [[0.2, 1.4]]])  # 2 seeds, 1 subset, 2 tasks
    member = np.ones((1, 2), dtype=bool)
    assert ag.seed_noise(true, member) == pytest.approx([0.2 / math.sqrt(2), 0.4 / math.sqrt(2)])
    assert list(ag.seed_noise(true[:1], member)) == [0.0, 0.0]
    m3 = _small_tables()[0]
    true3 = np.random.default_rng(1).normal(size=(3, *m3.shape))  # a different spread in every subset
    assert np.allclose(ag.seed_noise(true3, m3.astype(int)), ag.seed_noise(true3, m3), equal_nan=True)


def _three_seed_task(means):
    """One task in len(means) subsets, 3 seeds at mean -1, mean, mean +1: seed noise exactly 1."""
    return np.array([[[m + d] for m in means] for d in (-1.0, 0.0, 1.0)])


def test_pairwise_order_sums_over_tasks_and_scores_ties_half():
    true = np.concatenate([_three_seed_task([0.0, 2.0, 4.5]), _three_seed_task([0.0, 3.0, 6.0])], axis=2)
    member = np.ones((3, 2), dtype=bool)
    # task 0: gap 2.0 = 2 x noise is not beyond it; (0, 4.5) and (2, 4.5) count. Task 1: all three pairs
    est = np.array([[[0.0, 0.0], [1.0, 1.0], [1.0, 2.0]]])  # task 0: one right, one tie; task 1: all right
    res = ag.pairwise_order(est, true, member)
    assert res == {
        "value": pytest.approx((1 + 0.5 + 3) / 5),
        "pairs": 5,
        "comparisons": 5,
        "factor": 2.0,
        "seed_noise": pytest.approx([1.0, 1.0]),
    }
    # a task without a pair beyond the noise does not stop the count
    lone = np.concatenate([_three_seed_task([0.0, 0.5, 1.0]), _three_seed_task([0.0, 3.0, 6.0])], axis=2)
    assert ag.pairwise_order(est, lone, member)["pairs"] == 3
    flat = ag.pairwise_order(est[:, :, :1], _three_seed_task([0.0, 0.1, 0.2]), member[:, :1])
    assert math.isnan(flat["value"]) and flat["pairs"] == 0 and flat["comparisons"] == 0


def test_change_skill_edge_cases():
    assert ag.change_skill(np.array([0.5, 0.0]), np.array([1.0, 0.0])) == pytest.approx(0.75)  # sum true^2 = 1
    assert math.isnan(ag.change_skill(np.array([0.1]), np.array([0.0])))  # no true change at all
    assert math.isnan(ag.change_skill(np.array([np.nan]), np.array([1.0])))


def test_mantel_counts_ties_and_skips_undefined_permutations(monkeypatch):
    values = iter([0.5, 0.5, 0.5 - 1e-12, 0.5 - 1e-11, 0.9, np.nan, 0.1, -0.2, 0.0, 0.3])
    seen = []

    def offdiag_corr(a, b, centred=False):
        seen.append(b)
        return next(values)

    monkeypatch.setattr(ag, "offdiag_corr", offdiag_corr)
    res = ag.mantel(np.eye(4), np.arange(16.0).reshape(4, 4) ** 2, permutations=9)
    assert res == {"value": 0.5, "p": pytest.approx((1 + 3) / 10), "permutations": 9}
    # rows and columns are permuted together: the (NaN) diagonal stays the diagonal
    assert len(seen) == 10 and all(
        np.isnan(np.diag(b)).all() and np.isfinite(b[~np.eye(4, dtype=bool)]).all() for b in seen
    )


def test_mantel_averages_a_list_and_is_undefined_without_spread():
    rng = np.random.default_rng(2)
    A1, A2, B = rng.normal(size=(3, 6, 6))
    both = ag.mantel([A1, A2], B, permutations=19)
    assert both["value"] == pytest.approx((ag.offdiag_corr(A1, B) + ag.offdiag_corr(A2, B)) / 2)
    assert ag.mantel(A1, B) == ag.mantel(A1, B, permutations=999, seed=0) and ag.mantel(A1, B)["permutations"] == 999
    assert ag.mantel(A1, B, 19, seed=1) == ag.mantel(A1, B, 19, seed=1) != ag.mantel(A1, B, 19, seed=3)
    flat = ag.mantel(np.ones((6, 6)), B, permutations=19)
    assert math.isnan(flat["value"]) and math.isnan(flat["p"]) and flat["permutations"] == 19


def test_row_centre_and_offdiag_corr_on_a_small_matrix():
    T = np.array([[9, 1, 3], [2, 9, 6], [np.nan, np.nan, 9]])
    C = ag.row_centre(np.array([[9, 1, 3], [2, 9, 6], [4, 4, 9]]))  # integers are fine
    assert np.isnan(np.diag(C)).all() and C[0, 1] == -1.0 and C[1, 2] == 2.0 and C[2, 0] == 0.0
    R = ag.row_centre(T)
    assert R[0, 2] == 1.0 and np.isnan(R[2]).all()
    A = np.array([[0, 1, 2, 3], [5, 0, 1, 1], [2, 2, 0, 7], [1, 0, 3, 0]], dtype=float)
    B = A.T.copy()
    a, b = ag.row_centre(A), ag.row_centre(B)
    off = ~np.eye(4, dtype=bool)
    assert ag.offdiag_corr(A, B) == pytest.approx(np.corrcoef(a[off], b[off])[0, 1])
    assert ag.offdiag_corr(A, B, centred=True) == pytest.approx(np.corrcoef(A[off], B[off])[0, 1])
    assert math.isnan(ag.offdiag_corr(np.ones((4, 4)), B)) and math.isnan(ag.offdiag_corr(A, np.ones((4, 4))))
    assert math.isnan(ag.offdiag_corr(A[:2, :2], B[:2, :2]))  # 2 entries
    three = np.array([[0, 1, np.nan], [np.nan, 0, 2], [5, np.nan, 0]])  # 3 entries are enough
    assert ag.offdiag_corr(three, three, centred=True) == pytest.approx(1.0)
    unit = np.array([[0, 1, -1], [1, 0, -1], [1, -1, 0]], dtype=float)  # off-diagonal SD exactly 1
    assert ag.offdiag_corr(unit, unit, centred=True) == pytest.approx(1.0)


def test_affinity_from_table_skips_missing_values_and_pairs_without_a_subset():
    member = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=bool)
    values = np.array([[1.0, 2.0, 0.0], [np.nan, 4.0, 0.0], [0.0, 0.0, 5.0]])
    T = ag.affinity_from_table(values, member)
    assert T[0, 1] == 1.0 and T[1, 0] == 3.0 and T[2, 2] == 5.0
    assert np.isnan(T[0, 2]) and np.isnan(T[2, 0])
    assert ag.seed_mean(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[1, 0], [1, 1]])).tolist() == [
        pytest.approx([1.0, math.nan], nan_ok=True),
        [3.0, 4.0],
    ]
    with pytest.raises(ValueError, match=r"table shape \(2, 2\) does not match the membership \(3, 2\)"):
        ag.seed_mean(np.ones((1, 2, 2)), np.ones((3, 2)))


def test_ari_vs_random_reads_its_null_and_refuses_uncovered_tasks(monkeypatch):
    assert ag.labels_of([[2, 0], [1]], 3).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match=r"do not cover all 3 tasks"):
        ag.labels_of([[0], [1]], 3)
    real = ag.ari_vs_random(GROUPS, [GROUPS], N, random_partitions=200)
    assert real["random_p95"] > 0.05 and abs(real["random_mean"]) < 0.05  # random partitions: ARI 0 on average
    assert ag.ari_vs_random(GROUPS, [GROUPS], N) == ag.ari_vs_random(GROUPS, [GROUPS], N, 1000, 0)
    assert math.isnan(ag.ari_vs_random(GROUPS, [], N, random_partitions=10)["value"])
    null = [0.0, 0.1, -0.05, 0.3, 0.2, 0.02, -0.1, 0.5, 0.05, 0.01]
    values = iter([0.8, 0.6, *null])
    monkeypatch.setattr(ag, "adjusted_rand", lambda a, b: next(values))
    assert ag.ari_vs_random(GROUPS, [GROUPS, GROUPS], N, random_partitions=10) == {
        "value": pytest.approx(0.7),
        "per_estimate": [0.8, 0.6],
        "random_p95": pytest.approx(np.percentile(null, 95)),
        "random_mean": pytest.approx(np.mean(null)),
    }


def test_params_refuse_what_the_validation_sets_itself():
    with pytest.raises(ValueError, match="affinity.seed"):
        ValidateAffinityParams(tasks=["cb", "rte", "sst2"], affinity={"seed": 3})
    with pytest.raises(ValueError, match="backmap"):
        ValidateAffinityParams(tasks=["cb", "rte", "sst2"], affinity={"mode": "forward", "backmap": "representer"})
    with pytest.raises(ValueError, match="subset_size"):
        ValidateAffinityParams(tasks=["cb", "rte", "sst2"], subset_size=3)
    with pytest.raises(ValueError, match="not in tasks"):
        AffinityParams(tasks=["cb", "rte"], subsets=[["cb", "sst2"]])
    assert AffinityParams(tasks=["cb", "rte", "sst2"], subsets=[["sst2", "cb"]]).subsets == [["sst2", "cb"]]
    p = ValidateAffinityParams(tasks=["cb", "rte", "sst2"], training={"rank": 8}, seeds=[4])
    assert p.affinity_params(4, [["cb", "rte"]]).rank == 8 and p.training_params(4).seed == 4


# ------------------------------------------------------------------------------------------ end to end

runner = CliRunner()


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    import torch

    from services.cli.main import app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's forwards are all overhead: one thread is several times faster
    out = tmp_path_factory.mktemp("va") / "run"
    args = [
        "validate-affinity",
        "--model",
        "tiny-llama",
        "--tasks",
        "cb,rte,sst2",
        "--seeds",
        "2",
        "--max-train",
        "8",
        "--max-val",
        "6",
        "--epochs",
        "1",
        "--subset-size",
        "2",
        "--dim",
        "16",
        "--init",
        "base",
        "--max-length",
        "128",
        "--quantization",
        "none",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    try:
        result = runner.invoke(app, args)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_cli_writes_every_contract_key(cli_run):
    out, output = cli_run
    doc = json.loads((out / "validate_affinity.json").read_text())
    assert CONTRACT <= set(doc)
    assert set(doc["spearman_within_task"]) == {"value", "ci95"} and set(doc["t_correlation"]) == {"value", "p"}
    assert set(doc["ari"]) == {"est_vs_true", "random_p95"}
    finite = [
        doc["spearman_within_task"]["value"],
        *doc["spearman_within_task"]["ci95"],
        doc["change_skill"],
        doc["t_correlation"]["value"],
        doc["t_correlation"]["p"],
        doc["t_true_reliability"],
        doc["ari"]["est_vs_true"],
        doc["ari"]["random_p95"],
    ]
    assert all(isinstance(v, float) and math.isfinite(v) for v in finite), finite
    assert doc["pairwise_order_accuracy"] is None or 0.0 <= doc["pairwise_order_accuracy"] <= 1.0
    assert doc["seeds"] == [0, 1] and doc["metric"] == "neg_loss" and len(doc["subsets"]) == 3
    assert len(doc["table"]) == 2 * 3 * 2  # seeds x subsets x tasks per subset
    # the re-read estimates reproduce Stage 1's table; the re-scored adapters reproduce the trainer's accuracy
    for s in ("0", "1"):
        assert doc["consistency"]["estimate_reread_vs_stage1"][s]["max_abs_accuracy"] == 0.0
        assert doc["consistency"]["rescore_vs_trainer"][s] <= 1 / 6 + 1e-9  # at most one of 6 rows (trainer's numerics)
    assert doc["change_reference"].startswith("theta0")
    assert (out / "validate_affinity.csv").exists() and (out / "seed-1" / "affinity" / "affinity.json").exists()
    assert "within-task Spearman" in output


@pytest.mark.needs_data
def test_cli_costs_follow_the_flop_formula(cli_run):
    """Stage 1's FLOPs per seed (init base, mode linear: the gradient passes over the training and validation rows
    and the base evaluation) and the fine-tunes' (one epoch over each subset's training rows, one validation pass
    of its tasks), recomputed from the model's config.json, the formula and each seed's rows_*.csv; their sums and
    ratio, and the printed ratio."""
    out, output = cli_run
    doc = json.loads((out / "validate_affinity.json").read_text())
    shape = llama_shape(tiny_llama_config())
    subsets = doc["subsets"]
    s1_total, ft_total = 0.0, 0.0
    for s in ("0", "1"):
        aff = json.loads((out / f"seed-{s}" / "affinity" / "affinity.json").read_text())
        assert (aff["mode"], aff["init"], aff["params"]["rank"]) == ("linear", "base", 4)
        train = lengths_by_task(read_rows(out / f"seed-{s}" / "affinity" / "rows_train.csv"))
        val = lengths_by_task(read_rows(out / f"seed-{s}" / "affinity" / "rows_val.csv"))
        all_train, all_val = [n for v in train.values() for n in v], [n for v in val.values() for n in v]
        assert (len(all_train), len(all_val)) == (24, 18)
        flops = doc["costs"]["stage1"][s]["flops"]
        expected = {
            "gradients": train_flops(shape, all_train),
            "theta0_finetune": 0.0,
            "base_eval": forward_flops(shape, all_val),
            "estimate_forwards": train_flops(shape, all_val),
        }
        assert flops == pytest.approx({**expected, "total": sum(expected.values())}, rel=1e-12), s
        cost = doc["costs"]["finetunes"][s]["subsets_cost"]
        ft = sum(
            train_flops(shape, [n for t in sub for n in train[t]])
            + forward_flops(shape, [n for t in sub for n in val[t]])
            for sub in subsets
        )
        assert cost["total_flops"] == pytest.approx(ft, rel=1e-12), s
        assert cost["train_rows"] == sum(len(train[t]) for sub in subsets for t in sub)
        s1_total, ft_total = s1_total + flops["total"], ft_total + ft
    assert doc["costs"]["stage1_flops"] == pytest.approx(s1_total, rel=1e-12)
    assert doc["costs"]["finetune_flops"] == pytest.approx(ft_total, rel=1e-12)
    assert doc["costs"]["flop_ratio"] == pytest.approx(ft_total / s1_total, rel=1e-12)
    assert f"FLOP ratio {ft_total / s1_total:.3f}" in " ".join(output.split())


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):
    from services.cli.main import app

    base = ["validate-affinity", "--model", "tiny-llama", "--out", str(tmp_path / "x")]
    result = runner.invoke(app, [*base, "--tasks", "cb,rte,sst2", "--seeds", "0"])
    assert result.exit_code == 2 and "--seeds" in result.output
    result = runner.invoke(app, [*base, "--tasks", "cb,rte,sst2", "--seeds", "1,1"])
    assert result.exit_code == 2 and "--seeds" in result.output
    result = runner.invoke(app, [*base, "--tasks", "cb,nosuchtask"])
    assert result.exit_code == 2 and "nosuchtask" in result.output
    result = runner.invoke(app, [*base, "--tasks", "cb,rte,sst2", "--metric", "f1"])
    assert result.exit_code == 2 and "--metric" in result.output
    assert not list(tmp_path.iterdir())


def test_variants_are_checked_like_the_main_estimator():
    tasks = ["cb", "rte", "sst2"]
    with pytest.raises(ValueError, match=r"variants\.sub\.max_train=900 must be at most the top-level max_train=500"):
        ValidateAffinityParams(tasks=tasks, variants={"sub": {"max_train": 900}})
    with pytest.raises(ValueError, match="variants: name 'Bad-Name'"):
        ValidateAffinityParams(tasks=tasks, variants={"Bad-Name": {}})
    with pytest.raises(ValueError, match=r"variants\.lin: mode 'linear' estimates only"):
        ValidateAffinityParams(
            tasks=tasks, metric="margin", affinity={"mode": "forward"}, variants={"lin": {"mode": "linear"}}
        )
    with pytest.raises(ValueError, match=r"error, affinity: mode 'linear' estimates only"):
        ValidateAffinityParams(tasks=tasks, metric="margin")
    with pytest.raises(ValueError, match=r"variants\.x\.seed is set by the validation"):
        ValidateAffinityParams(tasks=tasks, variants={"x": {"seed": 1}})
    with pytest.raises(ValueError, match=r"training\.max_train is set by the validation"):
        ValidateAffinityParams(tasks=tasks, training={"max_train": 10})
    p = ValidateAffinityParams(tasks=tasks, affinity={"dim": 32}, variants={"sub": {"max_train": 100, "init": "base"}})
    main, sub = p.affinity_params(0, [tasks[:2]]), p.affinity_params(0, [tasks[:2]], "sub")
    # Stage 1 defaults to min(max_train, STAGE1_TRAIN_ROWS) rows per task, as in a pipeline
    assert (main.dim, main.max_train, main.init) == (32, 150, "meta") and (sub.dim, sub.max_train, sub.init) == (
        32,
        100,
        "base",
    )


@pytest.mark.needs_data
def test_variants_reuse_the_fine_tunes_and_report_their_own_cost(cli_run):
    """Adding variants to a finished validation scores them against the same fine-tunes (truth.json untouched);
    a subsampled Stage 1 costs fewer FLOPs; a linear one reports its own first-order estimates."""
    import torch

    from shared.ml.affinity.validate_affinity import run_validate_affinity

    out, _ = cli_run
    truth = out / "seed-0" / "truth.json"
    stamp = truth.stat().st_mtime_ns
    params = ValidateAffinityParams.model_validate(
        {
            **json.loads((out / "params.json").read_text()),
            "variants": {
                "sub": {"max_train": 4},
                "fwd": {"mode": "forward"},
                "ab": {"gradients": "AB", "init": "meta"},
            },
        }
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_validate_affinity(params, out)
    finally:
        torch.set_num_threads(threads)
    assert truth.stat().st_mtime_ns == stamp
    doc = json.loads((out / "validate_affinity.json").read_text())
    assert set(doc["variants"]) == {"sub", "fwd", "ab"}
    spec = json.loads((out / "seed-0" / "variant-ab" / "affinity" / "projection_spec.json").read_text())
    assert any(".lora_A." in q["name"] for q in spec["params"])  # the AB variant's sketch covers the A matrices
    for v in doc["variants"].values():
        assert CONTRACT <= set(v)
    main = np.mean([doc["costs"]["stage1"][s]["flops"]["total"] for s in ("0", "1")])
    assert doc["variants"]["fwd"]["stage1_flops"] == pytest.approx(
        np.mean(
            [
                json.loads((out / f"seed-{s}" / "variant-fwd" / "estimates.json").read_text())["stage1"]["flops"][
                    "total"
                ]
                for s in ("0", "1")
            ]
        ),
        rel=1e-12,
    )
    # a subsampled Stage 1 (4 of 8 training rows per task) costs fewer FLOPs: its own rows, same formula
    shape = llama_shape(tiny_llama_config())
    sub_flops = []
    for s in ("0", "1"):
        rows = out / f"seed-{s}" / "variant-sub" / "affinity"
        train = [int(r["length"]) for r in read_rows(rows / "rows_train.csv")]
        val = [int(r["length"]) for r in read_rows(rows / "rows_val.csv")]
        assert len(train) == 12
        sub_flops.append(train_flops(shape, train) + forward_flops(shape, val) + train_flops(shape, val))
    assert doc["variants"]["sub"]["stage1_flops"] == pytest.approx(np.mean(sub_flops), rel=1e-12)
    assert doc["variants"]["sub"]["stage1_flops"] < main
    assert doc["variants"]["sub"]["affinity_params"]["max_train"] == 4
    lin = json.loads((out / "seed-0" / "estimates.json").read_text())  # the main estimator: linear by default
    fwd = json.loads((out / "seed-0" / "variant-fwd" / "estimates.json").read_text())
    assert lin["mode"] == "linear" and fwd["mode"] == "forward"
    assert lin["reread_vs_stage1"]["max_abs_accuracy"] == 0.0 and fwd["reread_vs_stage1"]["max_abs_accuracy"] == 0.0
    # theta0's linear proxy is f0 itself: its accuracy is the base model's choice accuracy on the same rows
    assert {t: m["accuracy"] for t, m in lin["theta0"].items()} == pytest.approx(
        {t: m["accuracy"] for t, m in fwd["theta0"].items()}
    )
