"""Independent recomputations of the figures chorus prints, for the tests that pin them.

Nothing here calls the code under test for the quantity it checks: the FLOP model is written out again from
the model's config.json and the formula of shared/ml/training/costs.py (its docstring), accuracies are
re-scored from saved predictions, the linear proxy is re-evaluated from the saved gradient matrices.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    """The numbers of the FLOP formula, from a Llama config (not from the loaded modules)."""

    n_body: int
    n_lora: int
    n_layers: int
    d_model: int
    d_attn: int
    vocab: int

    def as_dict(self) -> dict[str, int]:
        return {
            "n_body": self.n_body,
            "n_lora_per_adapter": self.n_lora,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_attn": self.d_attn,
            "vocab": self.vocab,
        }


def llama_shape(config: dict, rank: int = 4, targets: Sequence[str] = ("q_proj", "k_proj", "v_proj")) -> Shape:
    """N_body = every Linear of the decoder (q, k, v, o, gate, up, down); N_lora = r * (in + out) of the targets."""
    d, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    head_dim = config.get("head_dim") or d // heads
    dims = {
        "q_proj": (d, heads * head_dim),
        "k_proj": (d, kv * head_dim),
        "v_proj": (d, kv * head_dim),
        "o_proj": (heads * head_dim, d),
        "gate_proj": (d, ffn),
        "up_proj": (d, ffn),
        "down_proj": (ffn, d),
    }
    body = layers * sum(i * o for i, o in dims.values())
    lora = layers * sum(rank * (dims[t][0] + dims[t][1]) for t in targets)
    return Shape(body, lora, layers, d, heads * head_dim, config["vocab_size"])


def tiny_llama_config() -> dict:
    from shared.ml.models import resolve_model

    folder, _, _ = resolve_model("tiny-llama")
    return json.loads((Path(folder) / "config.json").read_text())


def forward_flops(shape: Shape, lengths: Iterable[int], lora: bool = True) -> float:
    """Sum over rows of 2 (N_body + N_lora) T + 2 L d_attn T^2 + 2 d_model V (the formula is per row additive)."""
    n = shape.n_body + (shape.n_lora if lora else 0)
    return float(
        sum(2 * n * t + 2 * shape.n_layers * shape.d_attn * t * t + 2 * shape.d_model * shape.vocab for t in lengths)
    )


def backward_flops(shape: Shape, lengths: Iterable[int]) -> float:
    return float(
        sum(
            2 * shape.n_body * t
            + 2 * shape.n_layers * shape.d_attn * t * t
            + 4 * shape.n_lora * t
            + 2 * shape.d_model * shape.vocab
            for t in lengths
        )
    )


def train_flops(shape: Shape, lengths: Sequence[int]) -> float:
    """One training pass (forward + backward) over rows of these lengths."""
    return forward_flops(shape, lengths) + backward_flops(shape, lengths)


def read_rows(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as fh:
        return list(csv.DictReader(fh))


def lengths_by_task(rows: list[dict[str, str]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for r in rows:
        out.setdefault(r["task"], []).append(int(r["length"]))
    return out


def accuracy(pred: Sequence[int], labels: Sequence[int]) -> float:
    assert len(pred) == len(labels) and labels
    return sum(int(p == y) for p, y in zip(pred, labels, strict=True)) / len(labels)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def logistic_stationarity(G: np.ndarray, f0: np.ndarray, w: np.ndarray, lam: float) -> np.ndarray:
    """Gradient of mean softplus(-(f0 + G w)) + lam ||w||^2 at w (zero at the Stage-1 solution)."""
    z = f0.astype(np.float64) + G.astype(np.float64) @ w.astype(np.float64)
    return -(G.astype(np.float64).T @ sigmoid(-z)) / len(z) + 2 * lam * w.astype(np.float64)


def solve_logistic(G: np.ndarray, f0: np.ndarray, lam: float) -> np.ndarray:
    """argmin_w mean softplus(-(f0 + G w)) + lam ||w||^2 by scipy's L-BFGS (float64)."""
    from scipy.optimize import minimize

    X, f = G.astype(np.float64), f0.astype(np.float64)

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = f + X @ w
        return float(np.mean(softplus(-z)) + lam * w @ w), -(X.T @ sigmoid(-z)) / len(z) + 2 * lam * w

    res = minimize(
        fun, np.zeros(X.shape[1]), jac=True, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 20000}
    )
    return res.x


def rel_err(est: float, true: float) -> float | None:
    """|est - true| / |true| (None when the truth is 0), as README's 'within 4.1 %' reads."""
    return None if abs(true) <= 1e-12 else abs(est - true) / abs(true)


def mean_defined(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None
