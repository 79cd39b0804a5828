"""Stage 1b pieces: the batched logistic-regression solver and the subset sampler."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from shared.ml.affinity import solver
from shared.ml.affinity.solver import solve_chunk, solve_subsets
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


def _badly_scaled_problem() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    rng = np.random.default_rng(3)
    X = torch.from_numpy((4 * rng.normal(size=(40, 4))).astype(np.float32))
    f0 = torch.from_numpy(rng.normal(-3, 1, size=40).astype(np.float32))
    return X, f0, [torch.arange(0, 40), torch.arange(0, 6)]


def test_iteration_counts_are_per_subset_and_batching_changes_nothing():
    X, f0, sets = _badly_scaled_problem()
    both = solve_subsets(X, f0, sets, 1e-3)
    # damped Newton with Armijo halving reaches tol in a handful of steps; pinned to catch step-rule changes
    assert both.iterations.tolist() == [4, 8]
    assert both.converged.tolist() == [True, True]
    for k, s in enumerate(sets):
        alone = solve_subsets(X, f0, [s], 1e-3)
        assert alone.iterations.tolist() == [both.iterations[k].item()]
        assert torch.allclose(alone.w[0], both.w[k], rtol=1e-6, atol=1e-7)
        z = f0[s].double() + X[s].double() @ both.w[k].double()
        loss = torch.nn.functional.softplus(-z).mean().item()
        assert both.train_loss[k].item() == pytest.approx(loss, rel=1e-6)
        penalty = 1e-3 * float((both.w[k].double() ** 2).sum())
        assert both.objective[k].item() == pytest.approx(loss + penalty, rel=1e-6)


def test_iteration_limit_and_convergence_flag():
    # lam ~ 0 on one separable row: the optimum is far out (w ~ 66) and Newton moves about 1 per step
    X, f0, rows = torch.tensor([[1.0]]), torch.zeros(1), [torch.tensor([0])]
    capped = solve_subsets(X, f0, rows, 1e-30, tol=0.0)
    assert capped.iterations.tolist() == [50] and capped.converged.tolist() == [False]
    chunk = solve_chunk(X[None], f0[None], torch.ones(1, 1), 1e-30, tol=0.0)
    assert chunk.iterations.tolist() == [50] and chunk.converged.tolist() == [False]
    three = solve_subsets(X, f0, rows, 1e-30, max_iter=3, tol=0.0)
    assert three.iterations.tolist() == [3] and not bool(three.converged[0])
    # a batch mixing a converged and a capped problem keeps each one's flag and count
    Xm = torch.tensor([[1.0], [1.0], [-1.0]])
    fm = torch.tensor([0.0, 0.5, 0.0])
    mixed = solve_subsets(Xm, fm, [torch.tensor([0]), torch.tensor([1, 2])], 1e-30, max_iter=30, tol=1e-20)
    assert mixed.converged.tolist() == [False, True]
    assert mixed.iterations[0].item() == 30 and 1 <= mixed.iterations[1].item() <= 10


def test_tolerance_is_half_the_newton_decrement():
    # one row x = 1, f0 = 0, lam = 1/8: at w = 0 the Hessian is 1/4 + 1/4, the step 1 and the decrement 1/2
    X, f0, rows = torch.tensor([[1.0]]), torch.zeros(1), [torch.tensor([0])]
    at_tol = solve_subsets(X, f0, rows, 0.125, tol=0.25)
    assert at_tol.iterations.tolist() == [0] and at_tol.converged.tolist() == [True]
    assert at_tol.w.tolist() == [[0.0]]
    below = solve_subsets(X, f0, rows, 0.125, tol=0.2)
    assert below.iterations.item() >= 1 and below.w[0, 0].item() > 0
    # the default tol is far below that first decrement
    default = solve_chunk(X[None], f0[None], torch.ones(1, 1), 0.125)
    assert default.converged.tolist() == [True] and default.iterations.item() >= 2


@pytest.mark.parametrize(("seed", "steps"), [(9, 7), (14, 10), (15, 4), (23, 6)])
def test_iteration_counts_of_backtracking_problems_are_pinned(seed, steps):
    # strongly scaled rows make the full Newton step fail Armijo, so these counts depend on the halving
    rng = np.random.default_rng(seed)
    n, d = int(rng.integers(3, 30)), int(rng.integers(1, 6))
    scale = float(rng.choice([1, 3, 6, 10]))
    X = torch.from_numpy((scale * rng.normal(size=(n, d))).astype(np.float32))
    f0 = torch.from_numpy(rng.normal(-2, 2, size=n).astype(np.float32))
    res = solve_subsets(X, f0, [torch.arange(n)], 1e-3)
    assert res.iterations.tolist() == [steps] and bool(res.converged[0])


def test_a_zero_step_satisfies_armijo_with_equality():
    # symmetric rows: the gradient at w = 0 is exactly 0; with the tolerance test disabled (tol < 0) the zero
    # step is still accepted (new objective == old), so the solver runs to max_iter instead of stopping
    res = solve_subsets(
        torch.tensor([[1.0], [-1.0]]), torch.zeros(2), [torch.tensor([0, 1])], 0.1, max_iter=4, tol=-1.0
    )
    assert res.iterations.tolist() == [4] and res.converged.tolist() == [False]
    assert res.w.tolist() == [[0.0]]


def test_an_unused_direction_stays_zero_under_a_tiny_ridge():
    # no row touches the second direction: its Hessian entry is 2 * lam alone, which must stay float64 (1e-50
    # underflows to 0 in float32 and the Newton system would be singular)
    X = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    res = solve_subsets(X, torch.tensor([-1.0, 0.5]), [torch.tensor([0, 1])], 1e-50)
    assert bool(res.converged[0]) and res.w[0, 1].item() == 0.0 and res.w[0, 0].item() > 0


def test_well_conditioned_newton_converges_quadratically():
    # a wrong Hessian (curvature or ridge term) still converges, but only linearly: dozens of steps
    rng = np.random.default_rng(1)
    X = torch.from_numpy(rng.normal(size=(30, 5)).astype(np.float32))
    f0 = torch.from_numpy(rng.normal(size=30).astype(np.float32))
    for lam in (1e-3, 1.0):
        res = solve_subsets(X, f0, [torch.arange(30)], lam)
        assert bool(res.converged[0]) and res.iterations.item() <= 6


def test_chunking_follows_max_elems(monkeypatch):
    shapes = []
    real = solver.solve_chunk

    def spy(Xs, *args):
        shapes.append(tuple(Xs.shape))
        return real(Xs, *args)

    monkeypatch.setattr(solver, "solve_chunk", spy)
    X = torch.randn(10, 2)
    sets = [torch.arange(4), torch.arange(1), torch.arange(3), torch.arange(2)]
    res = solve_subsets(X, torch.zeros(10), sets, 0.1, max_elems=8)
    # sorted by size; a chunk grows while (rows + 1) * n_next * d <= max_elems, with equality allowed
    assert shapes == [(2, 2, 2), (1, 3, 2), (1, 4, 2)]
    assert bool(res.converged.all()) and res.w.shape == (4, 2)


def test_no_subsets_gives_empty_results():
    res = solve_subsets(torch.zeros(5, 3), torch.zeros(5), [], 0.1)
    assert res.w.shape == (0, 3) and res.w.dtype == torch.float32
    assert res.objective.shape == (0,) and res.train_loss.shape == (0,)
    assert res.iterations.shape == (0,) and res.iterations.dtype == torch.long
    assert res.converged.shape == (0,) and res.converged.dtype == torch.bool


def test_solve_chunk_rejects_bad_inputs():
    Xs, f, mask = torch.ones(2, 2, 1), torch.zeros(2, 2), torch.ones(2, 2)
    with pytest.raises(ValueError, match=r"lambda must be > 0, got 0"):
        solve_chunk(Xs, f, mask, 0.0)
    with pytest.raises(ValueError, match=r"^a subset has no training rows$"):
        solve_chunk(Xs, f, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), 0.1)


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
