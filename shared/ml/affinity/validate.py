"""Validation of the estimates against real fine-tuning (DESIGN.md §3.3, last bullet)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from shared.ml.affinity.approx_error import _seeded_pick
from shared.ml.affinity.estimate import (
    evaluate_base,
    evaluate_subsets_forward,
    evaluate_subsets_linear,
    representer_deltas,
    subset_rows,
)
from shared.ml.affinity.finetune import finetune
from shared.ml.affinity.initialise import load_runtime, theta0_info
from shared.ml.affinity.params import ValidateParams, effective_lambda
from shared.ml.affinity.runtime import atomic_write_json, atomic_write_text, json_safe
from shared.ml.affinity.solver import solve_subsets
from shared.ml.affinity.stage import _check_or_write_params, _csv_text, _subset_size
from shared.ml.affinity.store import gradient_pass
from shared.ml.affinity.subsets import sample_subsets
from shared.ml.evaluate import TaskMetrics
from shared.ml.progress import Progress, silent


def _rel(est: float, true: float) -> float | None:
    if true is None or est is None or not math.isfinite(true) or not math.isfinite(est):
        return None
    return abs(est - true) / abs(true) if abs(true) > 1e-12 else None


def run_validate_estimates(params: ValidateParams, workdir: Path, progress: Progress = silent) -> dict[str, Any]:
    """Estimate K sampled subsets, then really fine-tune a LoRA on each; compare on validation splits.

    Timed in the same run: estimation = gradient pass over the train rows of the subsets' tasks + solve +
    batched forwards at theta0 + P w (model loading excluded from both sides); fine-tuning = every epoch's
    training and its per-epoch validation (model already loaded). compute_ratio = fine-tune / estimation.
    compute_ratio_with_init (and _amortised_with_init, the fine-tune spread over the full run's subsets) also
    count the all-task fine-tune of init='meta' on the estimation side (it is excluded from both sides
    otherwise: the true fine-tunes start from the same theta0). compute_ratio_amortised divides the per-subset
    fine-tune time by the per-subset estimation cost when the gradient pass is shared by all the subsets a full
    affinity run over these tasks would sample.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_or_write_params(params, workdir)
    rt = load_runtime(params, workdir / "theta0.safetensors", progress)
    theta0 = rt.theta0()
    n = len(params.tasks)
    size = min(_subset_size(params, n), n)
    pool = [list(s) for s in sample_subsets(n, size, params.coverage, params.seed)]
    subsets = _seeded_pick(pool, params.subsets, params.seed)
    used = sorted({t for s in subsets for t in s})
    used_names = [params.tasks[t] for t in used]
    all_train = rt.rows("train", params.max_train)
    train_rows = rt.rows("train", params.max_train, used_names)
    val_rows = rt.rows("val", params.max_val, used_names)
    local = [[used.index(t) for t in s] for s in subsets]

    a_norm = rt.a_norm()
    # --- estimation pipeline (timed)
    t_est = time.perf_counter()
    G, f0 = gradient_pass(rt, train_rows, workdir, progress)
    t_grad = time.perf_counter() - t_est

    def estimate(
        lam_param: float,
        backmap: str,
        stage: str,
        output: str,
        step: float = 1.0,
    ) -> tuple[list[dict[str, TaskMetrics]], Any]:
        Go, fo = grads[output]
        lam = effective_lambda(lam_param, params.lam_scale, Go)
        key = (output, lam_param)
        if key not in solutions:
            t = time.perf_counter()
            solutions[key] = solve_subsets(Go, fo, [subset_rows(train_rows, s) for s in local], lam, rt.device)
            solve_seconds[key] = time.perf_counter() - t
        sol = solutions[key]
        stacks = None
        rt.output = output
        if backmap == "representer":
            if key not in representers:
                representers[key] = representer_deltas(
                    rt, train_rows, local, sol.w, Go, fo, lam, progress, f"representer lam={lam:g}"
                )
            stacks = {k: v * step for k, v in representers[key].items()}
        return evaluate_subsets_forward(rt, local, sol.w * step, val_rows, progress, stage, "", stacks)

    solutions: dict[tuple[str, float], Any] = {}
    solve_seconds: dict[tuple[str, float], float] = {}
    representers: dict[tuple[str, float], dict[str, Any]] = {}
    grads = {params.output: (G, f0)}
    t1 = time.perf_counter()
    est, norms = estimate(params.lam, params.backmap, "estimate forwards", params.output)
    t_sub = time.perf_counter() - t1
    est_seconds = time.perf_counter() - t_est
    # untimed extras: other outputs, lambdas, step scales and the other back-map
    outputs = [params.output] + [o for o in (params.outputs or []) if o != params.output]
    for o in outputs[1:]:
        rt.output = o
        grads[o] = gradient_pass(rt, train_rows, workdir / f"output-{o}", progress)
    backmaps = [params.backmap] + (
        [b for b in ("sketch", "representer") if b != params.backmap] if params.compare_backmaps else []
    )
    lams = [params.lam] + [x for x in (params.lams or []) if x != params.lam]
    steps = [1.0] + [x for x in (params.step_scales or []) if x != 1.0]
    Variant = tuple[str, str, float, float]  # (output, backmap, lam, step)
    variants: dict[Variant, list[dict[str, TaskMetrics]]] = {(params.output, params.backmap, params.lam, 1.0): est}
    for o in outputs:
        for bm in backmaps:
            for lam in lams:
                for st in steps:
                    if (o, bm, lam, st) not in variants:
                        variants[(o, bm, lam, st)], _ = estimate(
                            lam, bm, f"estimate {o} {bm} lam={lam:g} x{st:g}", o, st
                        )
    rt.output = params.output
    # the linear proxy (f0 + g . w on the validation rows' own gradients; mode "linear" of the affinity stage),
    # timed on its own: it separates what the linear model predicts from what the real forward gives
    t_vgrad = time.perf_counter()
    Gv, fv = gradient_pass(rt, val_rows, workdir, progress)
    t_vgrad = time.perf_counter() - t_vgrad
    lam0 = effective_lambda(params.lam, params.lam_scale, G)
    t_lin = time.perf_counter()
    linear = evaluate_subsets_linear(local, solutions[(params.output, params.lam)].w, Gv, fv, val_rows)
    t_lin = time.perf_counter() - t_lin + solve_seconds[(params.output, params.lam)]
    at_theta0 = evaluate_base(rt, val_rows, progress)

    # --- real fine-tunes (timed)
    ft_seconds = 0.0
    true: list[dict[str, TaskMetrics]] = []
    ft_info = []
    for k, s in enumerate(local):
        rt.reset_adapter(theta0)
        items = [train_rows.items[i] for i in subset_rows(train_rows, s)]
        vsets = {val_rows.tasks[t]: [val_rows.items[i] for i in val_rows.task_rows(t)] for t in s}
        res = finetune(
            rt,
            items,
            vsets,
            params.epochs,
            params.lr,
            params.train_batch_size,
            params.seed + k,
            params.weight_decay,
            params.select,
            rt.batching.eval_rows,
            progress,
            f"fine-tune {k + 1}/{len(local)}",
        )
        ft_seconds += res.seconds
        true.append(res.chosen)
        ft_info.append(
            {
                "epoch": res.chosen_epoch,
                "seconds": round(res.seconds, 3),
                "steps": res.steps,
                "train_loss": res.train_loss,
            }
        )
    rt.reset_adapter(theta0)

    rows = []
    for k, s in enumerate(local):
        for t in s:
            name = val_rows.tasks[t]
            e, tr = est[k][name], true[k][name]
            row = {
                "subset": k,
                "tasks": "+".join(val_rows.tasks[x] for x in s),
                "task": name,
                "est_loss": e.loss,
                "true_loss": tr.loss,
                "rel_err_loss": _rel(e.loss, tr.loss),
                "est_accuracy": e.accuracy,
                "true_accuracy": tr.accuracy,
                "rel_err_accuracy": _rel(e.accuracy, tr.accuracy),
                "est_macro_f1": e.macro_f1,
                "true_macro_f1": tr.macro_f1,
                "delta_rel": float(norms[k]) / a_norm,
                "ft_epoch": ft_info[k]["epoch"],
            }
            rows.append(row)

    def _mean(key: str, rs: list[dict]) -> float | None:
        vals = [r[key] for r in rs if r.get(key) is not None]
        return float(np.mean(vals)) if vals else None

    def errors(res: list[dict[str, TaskMetrics]]) -> dict[str, float | None]:
        pairs = [(res[k][val_rows.tasks[t]], true[k][val_rows.tasks[t]]) for k, s in enumerate(local) for t in s]
        rl = [x for x in (_rel(e.loss, tr.loss) for e, tr in pairs) if x is not None]
        ra = [x for x in (_rel(e.accuracy, tr.accuracy) for e, tr in pairs) if x is not None]
        return {
            "mean_rel_err_loss": float(np.mean(rl)) if rl else None,
            "mean_rel_err_accuracy": float(np.mean(ra)) if ra else None,
            "mean_est_accuracy": float(np.mean([e.accuracy for e, _ in pairs])),
            "mean_true_accuracy": float(np.mean([tr.accuracy for _, tr in pairs])),
        }

    def linear_errors() -> dict[str, Any]:
        # the proxy's loss is the choice cross-entropy, not comparable with the fine-tune's full-vocabulary NLL
        return {
            **{k: v for k, v in errors(linear).items() if k != "mean_rel_err_loss"},
            "note": "accuracy = share of rows with f0 + g.w > 0 (f > 0: the gold choice beats all others together)",
        }

    def no_change_baseline() -> dict[str, float | None]:
        """theta0's own accuracy as the estimate (what an estimator must beat), and how well the estimated change
        from theta0 tracks the true change (Pearson r over the (subset, task) rows)."""
        base = np.array([at_theta0[r["task"]].accuracy for r in rows])
        est_acc = np.array([r["est_accuracy"] for r in rows])
        true_acc = np.array([r["true_accuracy"] for r in rows])
        ra = [x for x in (_rel(b, t) for b, t in zip(base, true_acc, strict=False)) if x is not None]
        de, dt = est_acc - base, true_acc - base
        r = float(np.corrcoef(de, dt)[0, 1]) if len(rows) > 2 and de.std() > 0 and dt.std() > 0 else None
        return {"no_change_rel_err_accuracy": float(np.mean(ra)) if ra else None, "change_correlation": r}

    per_backmap = {bm: {f"{lam:g}": errors(variants[(params.output, bm, lam, 1.0)]) for lam in lams} for bm in backmaps}
    per_lam = per_backmap[params.backmap]
    per_variant = [
        {"output": o, "backmap": bm, "lam": lam, "step": st, **errors(res)}
        for (o, bm, lam, st), res in variants.items()
    ]
    full_subsets = len(sample_subsets(n, size, params.coverage, params.seed))
    grad_all_rows_est = t_grad * len(all_train) / max(len(train_rows), 1)
    per_subset_est = grad_all_rows_est / full_subsets + t_sub / len(local)
    lin_seconds = t_grad + t_vgrad + t_lin
    init_record = theta0_info(workdir / "theta0.safetensors")
    init_seconds = float(init_record.get("seconds", 0.0))
    per_subset_lin = (
        grad_all_rows_est + t_vgrad * len(rt.rows("val", params.max_val)) / max(len(val_rows), 1)
    ) / full_subsets + t_lin / len(local)
    summary = json_safe(
        {
            "subsets": [[val_rows.tasks[t] for t in s] for s in local],
            "mean_rel_err_loss": _mean("rel_err_loss", rows),
            "mean_rel_err_accuracy": _mean("rel_err_accuracy", rows),
            "per_lambda": per_lam,
            "per_backmap": per_backmap,
            "per_variant": per_variant,
            "output": params.output,
            "lam": params.lam,
            "lam_scale": params.lam_scale,
            "lam_effective": lam0,
            "backmap": params.backmap,
            "estimation_seconds": round(est_seconds, 3),
            "gradient_seconds": round(t_grad, 3),
            "solve_and_forward_seconds": round(t_sub, 3),
            "finetune_seconds": round(ft_seconds, 3),
            "compute_ratio": ft_seconds / est_seconds if est_seconds > 0 else None,
            "compute_ratio_amortised": (ft_seconds / len(local)) / per_subset_est if per_subset_est > 0 else None,
            "amortised_over_subsets": full_subsets,
            "linear_proxy": {
                "lam_effective": lam0,
                **linear_errors(),
                "seconds": round(lin_seconds, 3),
                "compute_ratio": ft_seconds / lin_seconds if lin_seconds > 0 else None,
                "compute_ratio_amortised": (ft_seconds / len(local)) / per_subset_lin if per_subset_lin > 0 else None,
            },
            "theta0": {
                **init_record,
                "val_accuracy": {k: m.accuracy for k, m in at_theta0.items()},
                **no_change_baseline(),
            },
            "compute_ratio_with_init": ft_seconds / (est_seconds + init_seconds) if est_seconds > 0 else None,
            "compute_ratio_amortised_with_init": (
                (ft_seconds / len(local)) / (per_subset_est + init_seconds / full_subsets)
                if per_subset_est > 0
                else None
            ),
            "finetunes": ft_info,
            "rows": rows,
            "params": params.model_dump(mode="json"),
            "batching": asdict(rt.batching),
            "ratio_definition": "compute_ratio = wall(fine-tunes of the K subsets) / wall(gradient pass over their tasks' "
            "train rows + solve + estimate forwards); model load excluded on both sides",
        }
    )
    atomic_write_json(workdir / "validate.json", summary)
    fields = [
        "subset",
        "tasks",
        "task",
        "est_loss",
        "true_loss",
        "rel_err_loss",
        "est_accuracy",
        "true_accuracy",
        "rel_err_accuracy",
        "est_macro_f1",
        "true_macro_f1",
        "delta_rel",
        "ft_epoch",
    ]
    atomic_write_text(workdir / "validate.csv", _csv_text(rows, fields))
    out = {
        k: summary[k]
        for k in (
            "mean_rel_err_loss",
            "mean_rel_err_accuracy",
            "compute_ratio",
            "compute_ratio_amortised",
            "compute_ratio_with_init",
            "compute_ratio_amortised_with_init",
            "linear_proxy",
            "theta0",
            "estimation_seconds",
            "finetune_seconds",
            "per_lambda",
            "per_backmap",
            "per_variant",
            "backmap",
            "output",
        )
    }
    out["rows"] = summary["rows"]
    out["artifacts"] = {"validate": "validate.json", "rows": "validate.csv", "theta0": "theta0.safetensors"}
    return out
