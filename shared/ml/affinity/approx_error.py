"""First-order approximation error (DESIGN.md §3.4): how well f0 + g . w predicts the true f at theta0 + P w.

Directions: subset solutions w_S (from the training rows), rescaled so that ||P w|| = scale * ||A0||, i.e.
`scale` is the relative distance of the adapter from its initialisation, ||Delta|| / ||theta0||, with
||theta0|| = ||A0|| because B0 = 0 (the reference's definition; the relative change of the adapted weights,
||s * dB A0|| / ||W||, is reported beside it). Held-out examples = the validation split (never test).
Error per example: |f0 + g . w - f_true| / max(|f_true|, |f0|).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.files import atomic_write_json, atomic_write_text, json_safe
from shared.ml.affinity.estimate import delta_norms, multiplexed_forward, subset_rows
from shared.ml.affinity.initialise import load_runtime
from shared.ml.affinity.params import ApproxErrorParams, effective_lambda
from shared.ml.affinity.run_files import check_or_write_params, csv_text
from shared.ml.affinity.runtime import Runtime, SplitRows
from shared.ml.affinity.solver import solve_subsets
from shared.ml.affinity.store import gradient_pass
from shared.ml.affinity.subsets import sample_subsets, seeded_pick, subset_size
from shared.ml.progress import Progress, silent


@torch.no_grad()
def _relative_weight_change(rt: Runtime, stacks: dict[str, torch.Tensor], slot: int) -> float | None:
    """||s * dB A0||_F / ||W||_F over all adapted layers (None on a quantized base)."""
    num = 0.0
    den = 0.0
    for site in rt.sites:
        mod = rt.model.get_submodule(site.module_name)
        W = mod.base_layer.weight
        if W.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        scaling = mod.scaling["default"]
        dW = scaling * stacks[site.param_name][slot].to(W.device) @ site.lora_a.weight.float()
        num += float((dW.float() ** 2).sum())
        den += float((W.float() ** 2).sum())
    return math.sqrt(num / den) if den > 0 else None


@dataclass(frozen=True)
class _Directions:
    """The rescaled subset solutions: slot j = (scale index, subset index, rescale factor), W [slots, d] and
    its LoRA deltas (stacks)."""

    subsets: list[list[int]]
    a_norm: float
    slots: list[tuple[int, int, float]]
    W: torch.Tensor
    stacks: dict[str, torch.Tensor]


@dataclass(frozen=True)
class _Predictions:
    """Per (slot, validation row): the linear prediction, the true f and both relative errors."""

    f_lin: torch.Tensor
    f_true: torch.Tensor
    rel: torch.Tensor  # first order
    rel0: torch.Tensor  # zeroth order (f0 alone)


_CSV_FIELDS = ["scale", "direction", "subset", "task", "example_id", "f0", "f_linear", "f_true", "rel_error"]


def run_approx_error(params: ApproxErrorParams, workdir: Path, progress: Progress = silent) -> dict[str, Any]:
    """First-order error of f0 + g . w against the true f at theta0 + P w on held-out (validation) rows.

    Directions: subset solutions w_S (train rows), rescaled so that ||P w|| = scale * ||A0|| (||theta0|| of
    the adapter = ||A0|| since B0 = 0; the reference's definition). Error per example:
    |f_lin - f_true| / max(|f_true|, |f0|); also reported: the reference's mean squared version and the
    zeroth-order error |f0 - f_true| / max(|f_true|, |f0|) (what the gradient term is compared against).
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_or_write_params(params, workdir)
    t0 = time.perf_counter()
    rt = load_runtime(params, workdir / "theta0.safetensors", progress)
    atomic_write_text(workdir / "projection_spec.json", json.dumps(rt.spec.to_dict(), indent=2))
    train_rows = rt.rows("train", params.max_train)
    val_rows = rt.rows("val", params.max_val)
    G, f0 = gradient_pass(rt, train_rows, workdir, progress)
    Gv, fv = gradient_pass(rt, val_rows, workdir, progress)
    dirs = _directions(params, rt, train_rows, G, f0)
    f_true = _true_f(params, rt, val_rows, dirs, progress)
    pred = _predictions(dirs, f_true, Gv, fv)
    per_scale = _per_scale(params, rt, dirs, pred)
    csv_rows = _csv_rows(params, val_rows, dirs, pred, fv)
    wall = time.perf_counter() - t0
    doc = json_safe(
        {
            "tasks": params.tasks,
            "a0_norm": dirs.a_norm,
            "scale_definition": "||Delta_B|| = scale * ||theta0|| = scale * ||A0|| (all LoRA tensors)",
            "error_definition": "|f0 + g.w - f_true| / max(|f_true|, |f0|) per held-out (validation) example",
            "directions": [[params.tasks[t] for t in s] for s in dirs.subsets],
            "per_scale": per_scale,
            "validation_examples": len(val_rows),
            "wall_seconds": round(wall, 3),
            "params": params.model_dump(mode="json"),
        }
    )
    atomic_write_json(workdir / "approx_error.json", doc)
    atomic_write_text(workdir / "approx_error.csv", csv_text(csv_rows, _CSV_FIELDS))
    return {
        "per_scale": per_scale,
        "wall_seconds": round(wall, 3),
        "artifacts": {
            "approx_error": "approx_error.json",
            "examples": "approx_error.csv",
            "theta0": "theta0.safetensors",
            "projection_spec": "projection_spec.json",
        },
    }


def _directions(
    params: ApproxErrorParams, rt: Runtime, train_rows: SplitRows, G: torch.Tensor, f0: torch.Tensor
) -> _Directions:
    """Subset solutions w_S on the training rows, each rescaled to ||P w|| = scale * ||A0|| for every scale."""
    n = len(params.tasks)
    size = min(subset_size(params, n), n)
    subsets = seeded_pick([list(s) for s in sample_subsets(n, size, 1, params.seed)], params.directions, params.seed)
    sol = solve_subsets(
        G,
        f0,
        [subset_rows(train_rows, s) for s in subsets],
        effective_lambda(params.lam, params.lam_scale, G),
        rt.device,
    )
    norms = delta_norms(rt.projector.backmap(sol.w))
    a_norm = rt.a_norm()
    slots, scaled = [], []
    for si, scale in enumerate(params.scales):
        for k in range(len(subsets)):
            c = scale * a_norm / float(norms[k]) if float(norms[k]) > 0 else 0.0
            slots.append((si, k, c))
            scaled.append(sol.w[k] * c)
    W = torch.stack(scaled)
    return _Directions(subsets=subsets, a_norm=a_norm, slots=slots, W=W, stacks=rt.projector.backmap(W))


def _true_f(
    params: ApproxErrorParams, rt: Runtime, val_rows: SplitRows, dirs: _Directions, progress: Progress
) -> torch.Tensor:
    """[slots, validation rows] the true f at theta0 + P w of every slot, by multiplexed forwards per task."""
    pad = rt.tokenizer.pad_token_id or 0
    n_slots = len(dirs.slots)
    f_true = torch.zeros(n_slots, len(val_rows))
    for t, name in enumerate(params.tasks):
        rows = val_rows.task_rows(t)
        items = [(val_rows.items[i], s) for s in range(n_slots) for i in rows]
        out = multiplexed_forward(
            rt.model,
            rt.sites,
            dirs.stacks,
            items,
            rt.bound[name].choice_token_ids,
            rt.batching.eval_rows,
            pad,
            rt.device,
            progress,
            "approx-error forwards",
            name,
            rt.output,
            rt.batching.eval_tokens,
        )
        f_true[:, torch.as_tensor(rows)] = out.f.reshape(n_slots, len(rows))
    return f_true


def _predictions(dirs: _Directions, f_true: torch.Tensor, Gv: torch.Tensor, fv: torch.Tensor) -> _Predictions:
    """f_lin = f0 + g . w per slot and row, and the relative errors of f_lin and of f0 against f_true."""
    f_lin = fv[None, :].double() + (dirs.W.double() @ Gv.double().T)
    denom = torch.maximum(f_true.double().abs(), fv[None, :].double().abs()).clamp_min(1e-12)
    rel = (f_lin - f_true.double()).abs() / denom
    rel0 = (fv[None, :].double() - f_true.double()).abs() / denom
    return _Predictions(f_lin=f_lin, f_true=f_true, rel=rel, rel0=rel0)


def _scale_slots(dirs: _Directions, si: int) -> list[int]:
    """The slots of scale index `si`, in slot order."""
    return [j for j, (s, _, _) in enumerate(dirs.slots) if s == si]


def _per_scale(params: ApproxErrorParams, rt: Runtime, dirs: _Directions, pred: _Predictions) -> list[dict[str, Any]]:
    """The error summary of each scale over all its directions' validation rows."""
    a_norm = dirs.a_norm
    per_scale = []
    for si, scale in enumerate(params.scales):
        idx = _scale_slots(dirs, si)
        r = pred.rel[idx].flatten()
        r0 = pred.rel0[idx].flatten()
        rwc = [v for v in (_relative_weight_change(rt, dirs.stacks, j) for j in idx) if v is not None]
        per_scale.append(
            json_safe(
                {
                    "scale": scale,
                    "mean_rel_error": float(r.mean()),
                    "median_rel_error": float(r.median()),
                    "p90_rel_error": float(r.quantile(0.9)),
                    "max_rel_error": float(r.max()),
                    "mean_sq_rel_error": float((r**2).mean()),
                    "zeroth_order_mean_rel_error": float(r0.mean()),
                    "zeroth_order_median_rel_error": float(r0.median()),
                    "delta_norm": scale * a_norm,
                    "relative_weight_change": float(np.mean(rwc)) if rwc else None,
                    "examples": int(r.numel()),
                }
            )
        )
    return per_scale


def _csv_rows(
    params: ApproxErrorParams, val_rows: SplitRows, dirs: _Directions, pred: _Predictions, fv: torch.Tensor
) -> list[dict[str, Any]]:
    """approx_error.csv: one row per (scale, direction, validation example)."""
    csv_rows = []
    for si, scale in enumerate(params.scales):
        for j in _scale_slots(dirs, si):
            _, k, _ = dirs.slots[j]
            for i in range(len(val_rows)):
                csv_rows.append(
                    {
                        "scale": scale,
                        "direction": k,
                        "subset": "+".join(params.tasks[t] for t in dirs.subsets[k]),
                        "task": val_rows.items[i].task,
                        "example_id": val_rows.items[i].example_id,
                        "f0": float(fv[i]),
                        "f_linear": float(pred.f_lin[j, i]),
                        "f_true": float(pred.f_true[j, i]),
                        "rel_error": float(pred.rel[j, i]),
                    }
                )
    return csv_rows
