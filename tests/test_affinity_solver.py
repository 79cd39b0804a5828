"""Stage 1b pieces: the batched logistic-regression solver and the subset sampler."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from shared.ml.affinity.solver import solve_subsets
from shared.ml.affinity.subsets import default_subset_size, pair_counts, sample_subsets


def _scipy_solution(X: np.ndarray, f0: np.ndarray, lam: float) -> tuple[np.ndarray, float]:
    def fun(w):
        z = f0 + X @ w
        return np.mean(np.logaddexp(0.0, -z)) + lam * w @ w

    def jac(w):
        z = f0 + X @ w
        p = 1.0 / (1.0 + np.exp(z))  # sigmoid(-z)
        return -(X.T @ p) / len(z) + 2 * lam * w

    res = minimize(
        fun, np.zeros(X.shape[1]), jac=jac, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000}
    )
    return res.x, float(res.fun)


@pytest.mark.parametrize("lam", [1e-3, 0.1])
def test_batched_solver_reaches_the_scipy_optimum(lam):
    rng = np.random.default_rng(0)
    N, d = 90, 12
    X = rng.normal(size=(N, d)).astype(np.float32)
    f0 = rng.normal(-0.5, 1.5, size=N).astype(np.float32)
    sets = [np.arange(0, 30), np.arange(20, 90), np.arange(0, 90), np.array([3, 7, 50, 60, 61])]
    res = solve_subsets(
        torch.from_numpy(X), torch.from_numpy(f0), [torch.as_tensor(s) for s in sets], lam, max_elems=60 * d
    )
    assert bool(res.converged.all())
    for k, s in enumerate(sets):
        w_ref, obj_ref = _scipy_solution(X[s].astype(np.float64), f0[s].astype(np.float64), lam)
        assert res.objective[k].item() <= obj_ref + 1e-6
        assert abs(res.objective[k].item() - obj_ref) < 1e-5 * max(1.0, abs(obj_ref))
        assert np.allclose(res.w[k].numpy(), w_ref, atol=2e-4 * max(1.0, np.abs(w_ref).max()))


def test_solver_sign_convention_and_offset():
    # one row with g = e1, f0 = -2: the optimum moves f = f0 + w1 UP (towards the gold answer)
    X = torch.tensor([[1.0, 0.0]])
    f0 = torch.tensor([-2.0])
    res = solve_subsets(X, f0, [torch.tensor([0])], lam=0.01)
    w = res.w[0]
    assert w[0] > 0 and abs(float(w[1])) < 1e-8
    # stationarity of mean softplus(-(f0 + g.w)) + lam ||w||^2 with the offset coefficient exactly +1
    z = float(f0[0] + w[0])
    assert abs(-1 / (1 + math.exp(z)) + 2 * 0.01 * float(w[0])) < 1e-5


def test_sampler_covers_every_pair_k_times_and_is_seeded():
    n, s, k = 14, 4, 5
    a = sample_subsets(n, s, k, seed=1)
    b = sample_subsets(n, s, k, seed=1)
    c = sample_subsets(n, s, k, seed=2)
    assert a == b and a != c
    counts = np.array(pair_counts(n, a))
    assert counts[~np.eye(n, dtype=bool)].min() >= k
    assert all(len(x) == s and len(set(x)) == s and list(x) == sorted(x) for x in a)
    lower = math.ceil(k * math.comb(n, 2) / math.comb(s, 2))
    assert len(a) <= 2 * lower  # greedy stays close to the lower bound
    assert len(set(a)) == len(a)  # no repeats


def test_sampler_uses_all_subsets_when_few():
    subsets = sample_subsets(10, 3, 5, seed=0)
    assert subsets == list(itertools.combinations(range(10), 3))
    counts = np.array(pair_counts(10, subsets))
    assert counts[~np.eye(10, dtype=bool)].min() == 8
    assert sample_subsets(3, 2, 5) == [(0, 1), (0, 2), (1, 2)]


def test_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="subset size"):
        sample_subsets(4, 5)
    with pytest.raises(ValueError, match="subset size"):
        sample_subsets(1, 2)
    assert sample_subsets(3, 1) == [(0,), (1,), (2,)]
    assert default_subset_size(3) == 2 and default_subset_size(10) == 3 and default_subset_size(20) == 6
