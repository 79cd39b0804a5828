"""Validation of the estimates against real fine-tuning (DESIGN.md §3.3, last bullet)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.files import atomic_write_json, atomic_write_text, json_safe
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
from shared.ml.affinity.run_files import check_or_write_params, csv_text
from shared.ml.affinity.runtime import Runtime, SplitRows
from shared.ml.affinity.solver import solve_subsets
from shared.ml.affinity.store import gradient_pass
from shared.ml.affinity.subsets import sample_subsets, seeded_pick, subset_size
from shared.ml.evaluate import TaskMetrics
from shared.ml.progress import Progress, silent


def _rel(est: float, true: float) -> float | None:
    if true is None or est is None or not math.isfinite(true) or not math.isfinite(est):
        return None
    return abs(est - true) / abs(true) if abs(true) > 1e-12 else None


SubsetMetrics = list[dict[str, TaskMetrics]]  # per subset: task -> validation metrics
Variant = tuple[str, str, float, float]  # (output, backmap, lam, step)
_CSV_FIELDS = [
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
_RESULT_KEYS = (
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


@dataclass(frozen=True)
class _Sample:
    """The sampled subsets (task indices into params.tasks; `local`: into the used tasks) and their rows."""

    n: int  # tasks
    size: int  # tasks per subset
    local: list[list[int]]
    all_train: SplitRows  # every task's training rows (what a full affinity run takes gradients of)
    train_rows: SplitRows  # the used tasks' training rows
    val_rows: SplitRows  # the used tasks' validation rows


@dataclass(frozen=True)
class _TimedEstimate:
    """The timed estimate (main output, lambda and back-map) and its wall seconds."""

    est: SubsetMetrics
    norms: torch.Tensor  # per subset ||Delta||
    G: torch.Tensor  # training-row gradients of the main output
    t_grad: float  # gradient pass
    t_sub: float  # solve + estimate forwards
    est_seconds: float  # both


@dataclass(frozen=True)
class _LinearProxy:
    """The linear proxy's estimates (f0 + g . w on the validation rows' own gradients) and its seconds."""

    metrics: SubsetMetrics
    lam0: float  # the effective lambda of the main estimate
    t_vgrad: float  # validation gradient pass
    t_lin: float  # solve + linear evaluation


@dataclass(frozen=True)
class _Finetunes:
    """The real fine-tunes: each subset's chosen-epoch validation metrics and run record, total seconds."""

    true: SubsetMetrics
    info: list[dict[str, Any]]
    seconds: float


@dataclass(frozen=True)
class _Costs:
    """The seconds both sides of the compute ratios are built from (amortised: per subset of a full run)."""

    est_seconds: float
    ft_seconds: float
    lin_seconds: float
    per_subset_est: float
    per_subset_lin: float
    full_subsets: int
    init_seconds: float
    k: int  # sampled subsets


class _Estimator:
    """Estimated validation metrics of the sampled subsets for an (output, back-map, lambda, step); subset
    solutions (and their solve seconds) and representer deltas are cached per (output, lambda)."""

    def __init__(self, rt: Runtime, params: ValidateParams, sample: _Sample, progress: Progress) -> None:
        self.rt, self.params, self.sample, self.progress = rt, params, sample, progress
        self.grads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.solutions: dict[tuple[str, float], Any] = {}
        self.solve_seconds: dict[tuple[str, float], float] = {}
        self.representers: dict[tuple[str, float], dict[str, Any]] = {}

    def estimate(
        self, lam_param: float, backmap: str, stage: str, output: str, step: float = 1.0
    ) -> tuple[SubsetMetrics, Any]:
        """The subsets' estimated metrics at theta0 + step * P w (w solved with lambda `lam_param` on the
        `output` gradients) and the norms of their deltas."""
        rt, train_rows, local = self.rt, self.sample.train_rows, self.sample.local
        Go, fo = self.grads[output]
        lam = effective_lambda(lam_param, self.params.lam_scale, Go)
        key = (output, lam_param)
        if key not in self.solutions:
            t = time.perf_counter()
            self.solutions[key] = solve_subsets(Go, fo, [subset_rows(train_rows, s) for s in local], lam, rt.device)
            self.solve_seconds[key] = time.perf_counter() - t
        sol = self.solutions[key]
        stacks = None
        rt.output = output
        if backmap == "representer":
            if key not in self.representers:
                self.representers[key] = representer_deltas(
                    rt, train_rows, local, sol.w, Go, fo, lam, self.progress, f"representer lam={lam:g}"
                )
            stacks = {k: v * step for k, v in self.representers[key].items()}
        return evaluate_subsets_forward(rt, local, sol.w * step, self.sample.val_rows, self.progress, stage, "", stacks)


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
    check_or_write_params(params, workdir)
    rt = load_runtime(params, workdir / "theta0.safetensors", progress)
    theta0 = rt.theta0()
    sample = _sample(params, rt)
    a_norm = rt.a_norm()
    estimator = _Estimator(rt, params, sample, progress)
    timed = _timed_estimate(estimator, workdir)
    variants, backmaps, lams = _variants(estimator, timed.est, workdir)
    linear = _linear_proxy(estimator, timed.G, workdir)
    at_theta0 = evaluate_base(rt, sample.val_rows, progress)
    ft = _finetunes(rt, params, theta0, sample, progress)
    rows = _rows(sample, timed, ft, a_norm)
    summary = _summary(params, rt, workdir, sample, timed, variants, backmaps, lams, linear, at_theta0, ft, rows)
    atomic_write_json(workdir / "validate.json", summary)
    atomic_write_text(workdir / "validate.csv", csv_text(rows, _CSV_FIELDS))
    out = {k: summary[k] for k in _RESULT_KEYS}
    out["rows"] = summary["rows"]
    out["artifacts"] = {"validate": "validate.json", "rows": "validate.csv", "theta0": "theta0.safetensors"}
    return out


def _sample(params: ValidateParams, rt: Runtime) -> _Sample:
    """The K subsets (seeded pick from a full run's sample) and the rows of the tasks they use."""
    n = len(params.tasks)
    size = min(subset_size(params, n), n)
    pool = [list(s) for s in sample_subsets(n, size, params.coverage, params.seed)]
    subsets = seeded_pick(pool, params.subsets, params.seed)
    used = sorted({t for s in subsets for t in s})
    used_names = [params.tasks[t] for t in used]
    all_train = rt.rows("train", params.max_train)
    train_rows = rt.rows("train", params.max_train, used_names)
    val_rows = rt.rows("val", params.max_val, used_names)
    local = [[used.index(t) for t in s] for s in subsets]
    return _Sample(n=n, size=size, local=local, all_train=all_train, train_rows=train_rows, val_rows=val_rows)


def _timed_estimate(estimator: _Estimator, workdir: Path) -> _TimedEstimate:
    """The estimation pipeline, timed: gradient pass over the training rows, solve, estimate forwards."""
    rt, params = estimator.rt, estimator.params
    t_est = time.perf_counter()
    G, f0 = gradient_pass(rt, estimator.sample.train_rows, workdir, estimator.progress)
    t_grad = time.perf_counter() - t_est
    estimator.grads[params.output] = (G, f0)
    t1 = time.perf_counter()
    est, norms = estimator.estimate(params.lam, params.backmap, "estimate forwards", params.output)
    t_sub = time.perf_counter() - t1
    est_seconds = time.perf_counter() - t_est
    return _TimedEstimate(est=est, norms=norms, G=G, t_grad=t_grad, t_sub=t_sub, est_seconds=est_seconds)


def _variants(
    estimator: _Estimator, est: SubsetMetrics, workdir: Path
) -> tuple[dict[Variant, SubsetMetrics], list[str], list[float]]:
    """Untimed extras: the estimates of the other outputs, lambdas, step scales and back-map (variants, with the
    timed one first), the back-maps and the lambdas."""
    rt, params = estimator.rt, estimator.params
    outputs = [params.output] + [o for o in (params.outputs or []) if o != params.output]
    for o in outputs[1:]:
        rt.output = o
        estimator.grads[o] = gradient_pass(rt, estimator.sample.train_rows, workdir / f"output-{o}", estimator.progress)
    backmaps = [params.backmap] + (
        [b for b in ("sketch", "representer") if b != params.backmap] if params.compare_backmaps else []
    )
    lams = [params.lam] + [x for x in (params.lams or []) if x != params.lam]
    steps = [1.0] + [x for x in (params.step_scales or []) if x != 1.0]
    variants: dict[Variant, SubsetMetrics] = {(params.output, params.backmap, params.lam, 1.0): est}
    for o in outputs:
        for bm in backmaps:
            for lam in lams:
                for st in steps:
                    if (o, bm, lam, st) not in variants:
                        variants[(o, bm, lam, st)], _ = estimator.estimate(
                            lam, bm, f"estimate {o} {bm} lam={lam:g} x{st:g}", o, st
                        )
    rt.output = params.output
    return variants, backmaps, lams


def _linear_proxy(estimator: _Estimator, G: torch.Tensor, workdir: Path) -> _LinearProxy:
    """The linear proxy (f0 + g . w on the validation rows' own gradients; mode "linear" of the affinity stage),
    timed on its own: it separates what the linear model predicts from what the real forward gives."""
    rt, params, sample = estimator.rt, estimator.params, estimator.sample
    t_vgrad = time.perf_counter()
    Gv, fv = gradient_pass(rt, sample.val_rows, workdir, estimator.progress)
    t_vgrad = time.perf_counter() - t_vgrad
    lam0 = effective_lambda(params.lam, params.lam_scale, G)
    key = (params.output, params.lam)
    t_lin = time.perf_counter()
    linear = evaluate_subsets_linear(sample.local, estimator.solutions[key].w, Gv, fv, sample.val_rows)
    t_lin = time.perf_counter() - t_lin + estimator.solve_seconds[key]
    return _LinearProxy(metrics=linear, lam0=lam0, t_vgrad=t_vgrad, t_lin=t_lin)


def _finetunes(
    rt: Runtime, params: ValidateParams, theta0: dict[str, torch.Tensor], sample: _Sample, progress: Progress
) -> _Finetunes:
    """The real fine-tunes (timed), each from theta0 on its subset's training rows; theta0 is restored after."""
    train_rows, val_rows, local = sample.train_rows, sample.val_rows, sample.local
    ft_seconds = 0.0
    true: SubsetMetrics = []
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
    return _Finetunes(true=true, info=ft_info, seconds=ft_seconds)


def _rows(sample: _Sample, timed: _TimedEstimate, ft: _Finetunes, a_norm: float) -> list[dict[str, Any]]:
    """One row per (subset, task): estimated against true metrics."""
    val_rows = sample.val_rows
    rows = []
    for k, s in enumerate(sample.local):
        for t in s:
            name = val_rows.tasks[t]
            e, tr = timed.est[k][name], ft.true[k][name]
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
                "delta_rel": float(timed.norms[k]) / a_norm,
                "ft_epoch": ft.info[k]["epoch"],
            }
            rows.append(row)
    return rows


def _mean(key: str, rs: list[dict]) -> float | None:
    vals = [r[key] for r in rs if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _errors(res: SubsetMetrics, true: SubsetMetrics, sample: _Sample) -> dict[str, float | None]:
    """Mean relative errors of estimates `res` against the fine-tunes, and both sides' mean accuracy."""
    tasks = sample.val_rows.tasks
    pairs = [(res[k][tasks[t]], true[k][tasks[t]]) for k, s in enumerate(sample.local) for t in s]
    rl = [x for x in (_rel(e.loss, tr.loss) for e, tr in pairs) if x is not None]
    ra = [x for x in (_rel(e.accuracy, tr.accuracy) for e, tr in pairs) if x is not None]
    return {
        "mean_rel_err_loss": float(np.mean(rl)) if rl else None,
        "mean_rel_err_accuracy": float(np.mean(ra)) if ra else None,
        "mean_est_accuracy": float(np.mean([e.accuracy for e, _ in pairs])),
        "mean_true_accuracy": float(np.mean([tr.accuracy for _, tr in pairs])),
    }


def _no_change_baseline(rows: list[dict[str, Any]], at_theta0: dict[str, TaskMetrics]) -> dict[str, float | None]:
    """theta0's own accuracy as the estimate (what an estimator must beat), and how well the estimated change
    from theta0 tracks the true change (Pearson r over the (subset, task) rows)."""
    base = np.array([at_theta0[r["task"]].accuracy for r in rows])
    est_acc = np.array([r["est_accuracy"] for r in rows])
    true_acc = np.array([r["true_accuracy"] for r in rows])
    ra = [x for x in (_rel(b, t) for b, t in zip(base, true_acc, strict=False)) if x is not None]
    de, dt = est_acc - base, true_acc - base
    r = float(np.corrcoef(de, dt)[0, 1]) if len(rows) > 2 and de.std() > 0 and dt.std() > 0 else None
    return {"no_change_rel_err_accuracy": float(np.mean(ra)) if ra else None, "change_correlation": r}


def _costs(
    params: ValidateParams,
    rt: Runtime,
    sample: _Sample,
    timed: _TimedEstimate,
    linear: _LinearProxy,
    ft: _Finetunes,
    init_seconds: float,
) -> _Costs:
    """Both sides' seconds; amortised: the gradient passes scaled to all the tasks' rows and spread over every
    subset a full affinity run samples."""
    k = len(sample.local)
    full_subsets = len(sample_subsets(sample.n, sample.size, params.coverage, params.seed))
    grad_all_rows_est = timed.t_grad * len(sample.all_train) / max(len(sample.train_rows), 1)
    per_subset_est = grad_all_rows_est / full_subsets + timed.t_sub / k
    lin_seconds = timed.t_grad + linear.t_vgrad + linear.t_lin
    per_subset_lin = (
        grad_all_rows_est + linear.t_vgrad * len(rt.rows("val", params.max_val)) / max(len(sample.val_rows), 1)
    ) / full_subsets + linear.t_lin / k
    return _Costs(
        est_seconds=timed.est_seconds,
        ft_seconds=ft.seconds,
        lin_seconds=lin_seconds,
        per_subset_est=per_subset_est,
        per_subset_lin=per_subset_lin,
        full_subsets=full_subsets,
        init_seconds=init_seconds,
        k=k,
    )


def _summary(
    params: ValidateParams,
    rt: Runtime,
    workdir: Path,
    sample: _Sample,
    timed: _TimedEstimate,
    variants: dict[Variant, SubsetMetrics],
    backmaps: list[str],
    lams: list[float],
    linear: _LinearProxy,
    at_theta0: dict[str, TaskMetrics],
    ft: _Finetunes,
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """validate.json's content: the errors (main estimate, per lambda, back-map and variant, the linear proxy,
    the no-change baseline), the compute ratios and the rows."""
    per_backmap = {
        bm: {f"{lam:g}": _errors(variants[(params.output, bm, lam, 1.0)], ft.true, sample) for lam in lams}
        for bm in backmaps
    }
    per_variant = [
        {"output": o, "backmap": bm, "lam": lam, "step": st, **_errors(res, ft.true, sample)}
        for (o, bm, lam, st), res in variants.items()
    ]
    init_record = theta0_info(workdir / "theta0.safetensors")
    c = _costs(params, rt, sample, timed, linear, ft, float(init_record.get("seconds", 0.0)))
    # the proxy's loss is the choice cross-entropy, not comparable with the fine-tune's full-vocabulary NLL
    linear_errors = {k: v for k, v in _errors(linear.metrics, ft.true, sample).items() if k != "mean_rel_err_loss"}
    return json_safe(
        {
            "subsets": [[sample.val_rows.tasks[t] for t in s] for s in sample.local],
            "mean_rel_err_loss": _mean("rel_err_loss", rows),
            "mean_rel_err_accuracy": _mean("rel_err_accuracy", rows),
            "per_lambda": per_backmap[params.backmap],
            "per_backmap": per_backmap,
            "per_variant": per_variant,
            "output": params.output,
            "lam": params.lam,
            "lam_scale": params.lam_scale,
            "lam_effective": linear.lam0,
            "backmap": params.backmap,
            "estimation_seconds": round(c.est_seconds, 3),
            "gradient_seconds": round(timed.t_grad, 3),
            "solve_and_forward_seconds": round(timed.t_sub, 3),
            "finetune_seconds": round(c.ft_seconds, 3),
            "compute_ratio": c.ft_seconds / c.est_seconds if c.est_seconds > 0 else None,
            "compute_ratio_amortised": (c.ft_seconds / c.k) / c.per_subset_est if c.per_subset_est > 0 else None,
            "amortised_over_subsets": c.full_subsets,
            "linear_proxy": {
                "lam_effective": linear.lam0,
                **linear_errors,
                "note": "accuracy = share of rows with f0 + g.w > 0 (f > 0: the gold choice beats all others together)",
                "seconds": round(c.lin_seconds, 3),
                "compute_ratio": c.ft_seconds / c.lin_seconds if c.lin_seconds > 0 else None,
                "compute_ratio_amortised": (c.ft_seconds / c.k) / c.per_subset_lin if c.per_subset_lin > 0 else None,
            },
            "theta0": {
                **init_record,
                "val_accuracy": {k: m.accuracy for k, m in at_theta0.items()},
                **_no_change_baseline(rows, at_theta0),
            },
            "compute_ratio_with_init": c.ft_seconds / (c.est_seconds + c.init_seconds) if c.est_seconds > 0 else None,
            "compute_ratio_amortised_with_init": (
                (c.ft_seconds / c.k) / (c.per_subset_est + c.init_seconds / c.full_subsets)
                if c.per_subset_est > 0
                else None
            ),
            "finetunes": ft.info,
            "rows": rows,
            "params": params.model_dump(mode="json"),
            "batching": asdict(rt.batching),
            "ratio_definition": "compute_ratio = wall(fine-tunes of the K subsets) / wall(gradient pass over their tasks' "
            "train rows + solve + estimate forwards); model load excluded on both sides",
        }
    )
