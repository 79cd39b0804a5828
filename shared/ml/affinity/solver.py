"""Stage 1b solver: w = argmin_w mean_{i in S} softplus(-(f0_i + g_i . w)) + lam * ||w||^2, many S at once.

This is the linearised answer-token cross-entropy (softplus(-f) = -log p(y)) of fine-tuning from theta0
along the sketched directions: the offset f0 enters with coefficient exactly +1 (not a learned or negated
one, unlike the reference code), every example of S is a "positive", and there is no random labelling.

Solved by damped Newton in float64: the problem is smooth and lam-strongly convex, d is small (hundreds),
so a few Newton steps with a batched Armijo backtracking line search reach machine precision. Subsets are
padded to a common row count and solved together, in chunks bounded by `max_elems`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class SolveResult:
    w: torch.Tensor  # [K, d] float32 (CPU)
    objective: torch.Tensor  # [K] final objective value
    train_loss: torch.Tensor  # [K] mean softplus(-(f0 + g.w)) without the penalty
    iterations: torch.Tensor  # [K] Newton steps taken
    converged: torch.Tensor  # [K] bool


def _objective(
    Xs: torch.Tensor, f: torch.Tensor, weight: torch.Tensor, w: torch.Tensor, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    z = f + torch.einsum("knd,kd->kn", Xs, w)
    data = (weight * F.softplus(-z)).sum(1)
    return data + lam * (w * w).sum(1), data


def solve_chunk(
    Xs: torch.Tensor, f: torch.Tensor, mask: torch.Tensor, lam: float, max_iter: int = 50, tol: float = 1e-10
) -> SolveResult:
    """Solve K padded problems: Xs [K, n, d], f [K, n], mask [K, n] (1 = real row)."""
    if lam <= 0:
        raise ValueError(f"lambda must be > 0, got {lam}")
    Xs = Xs.double()
    f = f.double()
    mask = mask.double()
    counts = mask.sum(1, keepdim=True)
    if bool((counts == 0).any()):
        raise ValueError("a subset has no training rows")
    weight = mask / counts
    K, _, d = Xs.shape
    w = torch.zeros(K, d, dtype=torch.float64, device=Xs.device)
    eye = torch.eye(d, dtype=torch.float64, device=Xs.device)
    iters = torch.zeros(K, dtype=torch.long)
    done = torch.zeros(K, dtype=torch.bool, device=Xs.device)
    obj, data = _objective(Xs, f, weight, w, lam)
    for _ in range(max_iter):
        z = f + torch.einsum("knd,kd->kn", Xs, w)
        p = torch.sigmoid(-z)  # d softplus(-z)/dz = -p
        grad = -torch.einsum("kn,knd->kd", weight * p, Xs) + 2 * lam * w
        s = weight * p * (1 - p)
        H = torch.bmm(Xs.transpose(1, 2), Xs * s[:, :, None]) + 2 * lam * eye
        step = -torch.linalg.solve(H, grad.unsqueeze(-1)).squeeze(-1)
        decrement = -(grad * step).sum(1)  # g^T H^-1 g >= 0
        done = done | (decrement / 2 <= tol)
        if bool(done.all()):
            break
        active = ~done
        t = torch.ones(K, dtype=torch.float64, device=Xs.device)
        accepted = torch.zeros(K, dtype=torch.bool, device=Xs.device)
        for _ls in range(40):
            new_obj, new_data = _objective(Xs, f, weight, w + t[:, None] * step, lam)
            ok = (new_obj <= obj - 0.25 * t * decrement) & active & ~accepted
            accepted = accepted | ok
            if bool((accepted | ~active).all()):
                break
            t = torch.where(accepted | ~active, t, t / 2)
        move = accepted[:, None]
        w = torch.where(move, w + t[:, None] * step, w)
        obj, data = _objective(Xs, f, weight, w, lam)
        iters += active.cpu().long()
        # no acceptable step = numerically at the optimum
        done = done | (active & ~accepted)
    return SolveResult(w.float().cpu(), obj.float().cpu(), data.float().cpu(), iters, done.cpu())


def solve_subsets(
    X: torch.Tensor,
    f0: torch.Tensor,
    row_sets: Sequence[torch.Tensor | np.ndarray],
    lam: float,
    device: torch.device | str = "cpu",
    max_elems: int = 1 << 24,
    max_iter: int = 50,
    tol: float = 1e-10,
) -> SolveResult:
    """One logistic regression per row set (indices into X [N, d], f0 [N]); results in input order."""
    K = len(row_sets)
    d = X.shape[1]
    if K == 0:
        empty = torch.zeros(0)
        return SolveResult(
            torch.zeros(0, d), empty, empty, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
        )
    order = sorted(range(K), key=lambda k: len(row_sets[k]))
    results: list[tuple[list[int], SolveResult]] = []
    i = 0
    while i < K:
        n_max = len(row_sets[order[i]])
        chunk = [order[i]]
        i += 1
        while i < K:
            n_next = len(row_sets[order[i]])
            if (len(chunk) + 1) * n_next * d > max_elems:
                break
            chunk.append(order[i])
            n_max = n_next
            i += 1
        idx = torch.zeros(len(chunk), n_max, dtype=torch.long)
        mask = torch.zeros(len(chunk), n_max)
        for r, k in enumerate(chunk):
            rows = torch.as_tensor(row_sets[k], dtype=torch.long)
            idx[r, : len(rows)] = rows
            mask[r, : len(rows)] = 1
        Xs = X[idx].to(device)
        fs = f0[idx].to(device)
        results.append((chunk, solve_chunk(Xs, fs, mask.to(device), lam, max_iter, tol)))
    w = torch.zeros(K, d)
    obj = torch.zeros(K)
    data = torch.zeros(K)
    its = torch.zeros(K, dtype=torch.long)
    conv = torch.zeros(K, dtype=torch.bool)
    for chunk, res in results:
        ix = torch.tensor(chunk)
        w[ix], obj[ix], data[ix], its[ix], conv[ix] = (
            res.w,
            res.objective,
            res.train_loss,
            res.iterations,
            res.converged,
        )
    return SolveResult(w, obj, data, its, conv)
