"""Job stages of Stage 1. Each writes its files into `workdir` and returns a JSON-able summary with
"artifacts": {logical name: path relative to workdir}.

    run_affinity(params: AffinityParams, workdir, progress)            -> affinity.json, affinity.png, ...
    run_grouping(params: GroupingParams, workdir, progress)            -> groups.json, groups.png
    run_approx_error(params: ApproxErrorParams, workdir, progress)     -> approx_error.json, approx_error.csv
    run_validate_estimates(params: ValidateParams, workdir, progress)  -> validate.json, validate.csv

run_affinity is also available in pieces so a queue can fan it out over workers sharing `workdir`:
    prepare_affinity(params, workdir)                              (idempotent; theta0, spec, rows, subsets)
    run_gradient_batches(params, workdir, progress, first, last)   (batches [first, last) of the train split)
    run_estimate_shard(params, workdir, progress, start, end)      (subsets [start, end); merges gradients)
    finalize_affinity(params, workdir, progress)                   (table, matrices, affinity.json/png)
Every piece is resumable: finished batches / subsets are skipped when re-run on the same workdir.
When a sharder is installed (shared.ml.sharding; the job runner does it when fan-out is on), run_affinity
hands its gradient passes and its subset estimation to it as phases of `affinity_shard` pieces.
"""

from __future__ import annotations

import fcntl
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.files import atomic_save_npy, atomic_write_json, atomic_write_text, json_safe
from shared.ml.affinity import matrix as mx
from shared.ml.affinity.estimate import (
    delta_norms,
    evaluate_base,
    evaluate_subsets_forward,
    evaluate_subsets_linear,
    representer_deltas,
    subset_rows,
)
from shared.ml.affinity.grouping import group_auto, group_fixed
from shared.ml.affinity.initialise import load_runtime, theta0_info
from shared.ml.affinity.params import (
    AffinityParams,
    GroupingParams,
    effective_lambda,
)
from shared.ml.affinity.projection import ProjectionSpec
from shared.ml.affinity.run_files import check_or_write_params, csv_text, run_fingerprint
from shared.ml.affinity.runtime import Runtime, load_npy
from shared.ml.affinity.solver import solve_subsets
from shared.ml.affinity.store import gradient_batches, merge_gradients, plan_for, projection_starts
from shared.ml.affinity.structure import structure_test
from shared.ml.affinity.subsets import pair_counts, sample_subsets, subset_size
from shared.ml.evaluate import TaskMetrics
from shared.ml.progress import Progress, silent
from shared.ml.sharding import Phase, Sharder, current_sharder

FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------ helpers


def _timing(workdir: Path, phase: str, seconds: float) -> None:
    """Add `seconds` to timing.json[phase] (under a lock file: shards of one run may add at the same time)."""
    path = workdir / "timing.json"
    with (workdir / ".timing.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
            data[phase] = round(data.get(phase, 0.0) + seconds, 4)
            atomic_write_json(path, data)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _metrics_dict(m: TaskMetrics) -> dict[str, Any]:
    return json_safe({"loss": m.loss, "accuracy": m.accuracy, "macro_f1": m.macro_f1, "n": m.n})


# ------------------------------------------------------------------------------------------ affinity pieces


def prepare_affinity(params: AffinityParams, workdir: Path, progress: Progress = silent) -> Runtime:
    """Load the model with theta0 (made first: see initialise.py); write params, theta0, projection spec, rows
    and subsets (idempotent)."""
    workdir.mkdir(parents=True, exist_ok=True)
    check_or_write_params(params, workdir)
    rt = load_runtime(params, workdir / "theta0.safetensors", progress)
    spec_path = workdir / "projection_spec.json"
    if spec_path.exists():
        if ProjectionSpec.load(spec_path).to_dict() != rt.spec.to_dict():
            raise ValueError(f"{spec_path} does not match this model/adapter; use a fresh directory")
    else:
        atomic_write_text(spec_path, json.dumps(rt.spec.to_dict(), indent=2))
    if not (workdir / "model.json").exists():
        atomic_write_json(workdir / "model.json", rt.info.to_dict())
    rows = rt.rows("train", params.max_train)
    if not (workdir / "rows_train.csv").exists():
        rows.write_csv(workdir / "rows_train.csv")
    vrows = rt.rows("val", params.max_val)
    if not (workdir / "rows_val.csv").exists():
        vrows.write_csv(workdir / "rows_val.csv")
    if not (workdir / "subsets.json").exists():
        n = len(params.tasks)
        if params.subsets is not None:  # explicit subsets (each in task order), e.g. the ones a validation fixes
            subsets = [tuple(sorted(params.tasks.index(t) for t in s)) for s in params.subsets]
            size = max(len(s) for s in subsets)
        else:
            size = subset_size(params, n)
            subsets = sample_subsets(n, size, params.coverage, params.seed, params.enumerate_limit)
        counts = np.array(pair_counts(n, subsets))
        off = counts[~np.eye(n, dtype=bool)]
        atomic_write_json(
            workdir / "subsets.json",
            {
                "tasks": params.tasks,
                "size": size,
                "coverage_target": params.coverage,
                "min_pair_coverage": int(off.min()) if off.size else 0,
                "enumerated_all": len(subsets) == math.comb(n, size),
                "explicit": params.subsets is not None,
                "subsets": [[params.tasks[i] for i in s] for s in subsets],
                "indices": [list(s) for s in subsets],
            },
        )
    return rt


def _load_subsets(workdir: Path) -> list[list[int]]:
    return [list(s) for s in json.loads((workdir / "subsets.json").read_text())["indices"]]


def run_gradient_batches(
    params: AffinityParams,
    workdir: Path,
    progress: Progress = silent,
    first: int | None = None,
    last: int | None = None,
    split: str = "train",
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Projected gradients of batches [first, last) of the split's canonical batch plan (default: all);
    resumable, and bitwise the same gradients however the plan is cut (see store.gradient_batches)."""
    rt = runtime or prepare_affinity(params, workdir)
    rows = rt.rows(split, params.max_train if split == "train" else params.max_val)
    n_batches = len(plan_for(rt, rows))
    first = 0 if first is None else first
    last = n_batches if last is None else last
    t0 = time.perf_counter()
    info = gradient_batches(rt, rows, workdir, first, last, progress, f"gradients {split}", params.project_rows)
    _timing(workdir, f"gradients_{split}", time.perf_counter() - t0)
    return {"split": split, **info, "total_rows": len(rows)}


def _merged(rt: Runtime, params: AffinityParams, workdir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, Any]:
    rows = rt.rows(split, params.max_train if split == "train" else params.max_val)
    g, f = workdir / f"grads_{split}.npy", workdir / f"f0_{split}.npy"
    if not (g.exists() and f.exists()):
        merge_gradients(workdir, split, len(rows), rt.spec.dim)
    G = torch.from_numpy(load_npy(g).copy())
    F = torch.from_numpy(load_npy(f).copy())
    return G, F, rows


def _subset_file(workdir: Path, k: int) -> Path:
    return workdir / "estimates" / f"subset-{k:06d}.json"


def run_estimate_shard(
    params: AffinityParams,
    workdir: Path,
    progress: Progress = silent,
    start: int | None = None,
    end: int | None = None,
    runtime: Runtime | None = None,
) -> dict[str, Any]:
    """Solve and evaluate subsets [start, end) (default: all); subsets with a result file are skipped."""
    rt = runtime or prepare_affinity(params, workdir)
    subsets = _load_subsets(workdir)
    start = 0 if start is None else start
    end = len(subsets) if end is None else end
    if not 0 <= start < end <= len(subsets):
        raise ValueError(f"subset shard [{start}, {end}) is outside the {len(subsets)} subsets")
    chunk = params.subsets_per_forward
    # Subsets are evaluated in chunks at fixed positions (multiples of `chunk`), and a chunk with a missing
    # result is redone whole: the batched forwards, hence the results, are bitwise the same however the
    # subsets are cut into shards (aligned to `chunk`) and however often a shard was interrupted.
    groups = [list(range(max(c, start), min(c + chunk, end))) for c in range(start - start % chunk, end, chunk)]
    groups = [grp for grp in groups if not all(_subset_file(workdir, k).exists() for k in grp)]
    todo = [k for grp in groups for k in grp]
    if not todo:
        progress("estimate", 1, 1, "already done")
        return {"subsets": end - start, "computed": 0}
    G, f0, train_rows = _merged(rt, params, workdir, "train")
    lam = effective_lambda(params.lam, params.lam_scale, G)
    t0 = time.perf_counter()
    sol = solve_subsets(
        G, f0, [subset_rows(train_rows, subsets[k]) for k in todo], lam, rt.device, max_iter=params.solver_max_iter
    )
    solve_s = time.perf_counter() - t0
    _timing(workdir, "solve", solve_s)
    val_rows = rt.rows("val", params.max_val)
    if params.mode == "linear":
        Gv, fv, _ = _merged(rt, params, workdir, "val")
    a_norm = rt.a_norm()
    t1 = time.perf_counter()
    rep: dict[str, torch.Tensor] | None = None
    if params.mode == "forward" and params.backmap == "representer":
        rep = representer_deltas(rt, train_rows, [subsets[k] for k in todo], sol.w, G, f0, lam, progress, "representer")
    offsets = np.cumsum([0] + [len(grp) for grp in groups]).tolist()
    for c, ks in zip(offsets, groups, strict=False):
        W = sol.w[c : c + len(ks)]
        subs = [subsets[k] for k in ks]
        if params.mode == "forward":
            done_before = c

            def inner(stage: str, done: int, total: int, message: str = "", _c: int = done_before) -> None:
                progress("estimate", _c, len(todo), message)  # lets a job runner cancel between batches

            stacks = {name: v[c : c + len(ks)] for name, v in rep.items()} if rep is not None else None
            results, norms = evaluate_subsets_forward(
                rt, subs, W, val_rows, inner, "estimate", f"subsets {ks[0]}-{ks[-1]}", stacks
            )
        else:
            results = evaluate_subsets_linear(subs, W, Gv, fv, val_rows)
            norms = delta_norms(rt.projector.backmap(W))
        for j, k in enumerate(ks):
            i = c + j
            atomic_write_json(
                _subset_file(workdir, k),
                json_safe(
                    {
                        "subset": k,
                        "tasks": [params.tasks[t] for t in subsets[k]],
                        "mode": params.mode,
                        "lam": params.lam,
                        "lam_effective": lam,
                        "backmap": params.backmap if params.mode == "forward" else None,
                        "w": W[j].tolist(),
                        "w_norm": float(W[j].norm()),
                        "delta_norm": float(norms[j]),
                        "delta_rel": float(norms[j]) / a_norm if a_norm > 0 else None,
                        "train_loss": float(sol.train_loss[i]),
                        "objective": float(sol.objective[i]),
                        "iterations": int(sol.iterations[i]),
                        "converged": bool(sol.converged[i]),
                        "train_rows": int(len(subset_rows(train_rows, subsets[k]))),
                        "results": {name: _metrics_dict(m) for name, m in results[j].items()},
                    }
                ),
            )
        progress("estimate", c + len(ks), len(todo), f"subsets {start}-{end}")
    _timing(workdir, "estimate", time.perf_counter() - t1)
    return {"subsets": end - start, "computed": len(todo), "solve_seconds": round(solve_s, 3)}


def run_base_eval(
    params: AffinityParams, workdir: Path, progress: Progress = silent, runtime: Runtime | None = None
) -> dict:
    path = workdir / "base_metrics.json"
    if path.exists():
        return json.loads(path.read_text())
    rt = runtime or prepare_affinity(params, workdir)
    t0 = time.perf_counter()
    base = evaluate_base(rt, rt.rows("val", params.max_val), progress)
    _timing(workdir, "base_eval", time.perf_counter() - t0)
    data = {name: _metrics_dict(m) for name, m in base.items()}
    atomic_write_json(path, data)
    return data


TABLE_FIELDS = [
    "subset",
    "tasks",
    "task",
    "loss",
    "accuracy",
    "macro_f1",
    "n",
    "mode",
    "lam",
    "lam_effective",
    "w_norm",
    "delta_norm",
    "delta_rel",
    "train_loss",
    "objective",
    "iterations",
    "converged",
    "train_rows",
]


def _table(workdir: Path, n_subsets: int) -> tuple[list[dict[str, Any]], np.ndarray]:
    rows: list[dict[str, Any]] = []
    weights: list[list[float]] = []
    missing = [k for k in range(n_subsets) if not _subset_file(workdir, k).exists()]
    if missing:
        raise RuntimeError(
            f"{len(missing)} subsets have no estimate yet (first: {missing[0]}); run the estimate shards"
        )
    for k in range(n_subsets):
        data = json.loads(_subset_file(workdir, k).read_text())
        weights.append(data["w"])
        for task, m in data["results"].items():
            rows.append(
                {
                    "subset": k,
                    "tasks": "+".join(data["tasks"]),
                    "task": task,
                    **m,
                    "mode": data["mode"],
                    "lam": data["lam"],
                    "lam_effective": data.get("lam_effective"),
                    "w_norm": data["w_norm"],
                    "delta_norm": data["delta_norm"],
                    "delta_rel": data["delta_rel"],
                    "train_loss": data["train_loss"],
                    "objective": data["objective"],
                    "iterations": data["iterations"],
                    "converged": data["converged"],
                    "train_rows": data["train_rows"],
                }
            )
    return rows, np.asarray(weights, dtype=np.float32)


def finalize_affinity(params: AffinityParams, workdir: Path, progress: Progress = silent) -> dict[str, Any]:
    """Per-subset table (CSV + JSON), weights.npy, the affinity matrices, affinity.json and affinity.png."""
    sub = json.loads((workdir / "subsets.json").read_text())
    names = sub["subsets"]
    table, W = _table(workdir, len(names))
    atomic_save_npy(workdir / "weights.npy", W)
    atomic_write_text(workdir / "subset_results.csv", csv_text(table, TABLE_FIELDS))
    atomic_write_json(workdir / "subset_results.json", json_safe(table))
    matrices, counts = {}, None
    for metric in mx.METRICS:
        T, counts = mx.affinity_matrix(params.tasks, names, table, metric)
        matrices[metric] = T
    T = matrices[params.metric]
    assert counts is not None
    label = {"accuracy": "estimated accuracy", "neg_loss": "estimated -loss", "macro_f1": "estimated macro-F1"}[
        params.metric
    ]
    mx.heatmap(
        workdir / "affinity.png", params.tasks, T, f"T[i, j]: {label} of i over subsets with i and j", counts=counts
    )
    base = json.loads((workdir / "base_metrics.json").read_text()) if (workdir / "base_metrics.json").exists() else {}
    timing = json.loads((workdir / "timing.json").read_text()) if (workdir / "timing.json").exists() else {}
    artifacts = {
        "affinity": "affinity.json",
        "affinity_heatmap": "affinity.png",
        "subset_results_csv": "subset_results.csv",
        "subset_results": "subset_results.json",
        "subsets": "subsets.json",
        "weights": "weights.npy",
        "gradients": "grads_train.npy",
        "f0": "f0_train.npy",
        "rows": "rows_train.csv",
        "rows_val": "rows_val.csv",
        "theta0": "theta0.safetensors",
        "theta0_info": "theta0.json",
        "projection_spec": "projection_spec.json",
        "params": "params.json",
        "base_metrics": "base_metrics.json",
    }
    if params.mode == "linear":
        artifacts.update({"gradients_val": "grads_val.npy", "f0_val": "f0_val.npy"})
    doc = json_safe(
        {
            "version": FORMAT_VERSION,
            "tasks": params.tasks,
            "metric": params.metric,
            "matrix": mx.to_json_matrix(T),
            "matrix_symmetric": mx.to_json_matrix(mx.symmetrise(T)),
            "matrices": {m: mx.to_json_matrix(v) for m, v in matrices.items()},
            "counts": counts.tolist(),
            "subsets": names,
            "subset_size": sub["size"],
            "min_pair_coverage": sub["min_pair_coverage"],
            "per_subset": table,
            "base": base,
            "mode": params.mode,
            "init": params.init,
            "theta0": theta0_info(workdir / "theta0.safetensors"),
            "backmap": params.backmap,
            "lam": params.lam,
            "lam_scale": params.lam_scale,
            "lam_effective": table[0]["lam_effective"] if table else None,
            "dim": params.dim,
            "seed": params.seed,
            "model": json.loads((workdir / "model.json").read_text()),
            "params": params.model_dump(mode="json"),
            "timing_seconds": timing,
            "definition": "T[i][j] = mean over subsets containing i and j of task i's estimated validation "
            f"{params.metric} (higher is better) at theta0 + P w_S; diagonal = mean over subsets containing i",
            "artifacts": {k: v for k, v in artifacts.items() if k != "affinity"},
        }
    )
    atomic_write_json(workdir / "affinity.json", doc)
    if (workdir / "grads_train.npy").exists() and (params.mode != "linear" or (workdir / "grads_val.npy").exists()):
        shutil.rmtree(workdir / "gradients", ignore_errors=True)  # shards are merged; keep one copy
    (workdir / ".timing.lock").unlink(missing_ok=True)
    progress("finalize", 1, 1, "affinity.json")
    return {
        "tasks": params.tasks,
        "metric": params.metric,
        "matrix": doc["matrix"],
        "subsets": len(names),
        "timing_seconds": timing,
        "artifacts": artifacts,
    }


def _runtime_key(params: AffinityParams) -> str:
    batching = {k: getattr(params, k) for k in ("batch_size", "batch_tokens", "eval_batch_size")}
    return "affinity-runtime:" + json.dumps({**run_fingerprint(params), **batching}, sort_keys=True)


def affinity_prepare(args: dict[str, Any], workdir: Path, cache: dict[str, Any]) -> tuple[AffinityParams, Runtime]:
    """The params and the loaded runtime of a fanned-out affinity phase (cached per process)."""
    params = AffinityParams.model_validate(args["params"])
    key = _runtime_key(params)
    if key not in cache:
        cache[key] = prepare_affinity(params, Path(workdir))  # loads the model; the files exist already
    return params, cache[key]


def affinity_shard(
    args: dict[str, Any], workdir: Path, progress: Progress, start: int, end: int, cache: dict[str, Any]
) -> dict[str, Any]:
    """One piece of a fanned-out affinity phase, runnable in any process sharing `workdir` (see
    shared.ml.sharding): args = {"kind": "gradients" | "estimate", "split": ..., "params": AffinityParams};
    [start, end) are batches of the split's batch plan (gradients) or subsets (estimate)."""
    workdir = Path(workdir)
    params, rt = affinity_prepare(args, workdir, cache)
    if args["kind"] == "gradients":  # [start, end) are batches of the split's canonical plan
        return run_gradient_batches(params, workdir, progress, start, end, args["split"], rt)
    if args["kind"] == "estimate":
        return run_estimate_shard(params, workdir, progress, start, end, rt)
    raise ValueError(f"unknown affinity shard kind {args['kind']!r}")


_SHARD_FN = f"{__name__}:affinity_shard"
_PREPARE_FN = f"{__name__}:affinity_prepare"


def _gradient_pass(
    params: AffinityParams,
    workdir: Path,
    progress: Progress,
    rt: Runtime,
    split: str,
    sharder: Sharder | None,
    cache: dict[str, Any],
) -> None:
    rows = rt.rows(split, params.max_train if split == "train" else params.max_val)
    plan = plan_for(rt, rows)
    if sharder is None:
        run_gradient_batches(params, workdir, progress, 0, len(plan), split, rt)
    else:
        args = {"kind": "gradients", "split": split, "params": params.model_dump(mode="json")}
        # shards of whole projection groups, so every sketch projection sees the same rows as in the one-piece
        # pass: bitwise the same gradients
        phase = Phase(
            f"gradients:{split}",
            f"gradients {split}",
            len(plan),
            _SHARD_FN,
            args,
            unit="batches",
            starts=tuple(projection_starts(plan, params.project_rows)),
            prepare=_PREPARE_FN,
        )
        sharder.run(phase, workdir, progress, cache)
    merge_gradients(workdir, split, len(rows), rt.spec.dim)


def run_affinity(params: AffinityParams, workdir: Path, progress: Progress = silent) -> dict[str, Any]:
    """The whole affinity stage (resumable): gradients -> subsets -> estimates -> T. In one process, or
    with the gradient passes and the subset estimation fanned out when a sharder is installed."""
    workdir = Path(workdir)
    t0 = time.perf_counter()
    rt = prepare_affinity(params, workdir, progress)
    # the batch sizes this process chose, explicit for every piece (a helper on another GPU cuts the same batches)
    params = params.model_copy(update=rt.batching.params())
    _timing(workdir, "load_prepare", time.perf_counter() - t0)
    sharder = current_sharder()
    if sharder is not None and sharder.shards <= 1:
        sharder = None
    cache: dict[str, Any] = {_runtime_key(params): rt}
    if not (workdir / "grads_train.npy").exists():
        _gradient_pass(params, workdir, progress, rt, "train", sharder, cache)
    if params.mode == "linear" and not (workdir / "grads_val.npy").exists():
        _gradient_pass(params, workdir, progress, rt, "val", sharder, cache)
    run_base_eval(params, workdir, progress, rt)
    if sharder is None:
        run_estimate_shard(params, workdir, progress, None, None, rt)
    else:
        args = {"kind": "estimate", "params": params.model_dump(mode="json")}
        phase = Phase(
            "estimate",
            "estimate",
            len(_load_subsets(workdir)),
            _SHARD_FN,
            args,
            unit="subsets",
            align=params.subsets_per_forward,
            prepare=_PREPARE_FN,
        )
        sharder.run(phase, workdir, progress, cache)
    summary = finalize_affinity(params, workdir, progress)
    summary["wall_seconds"] = round(time.perf_counter() - t0, 3)
    return summary


# ------------------------------------------------------------------------------------------ grouping


def read_affinity(path: Path) -> dict[str, Any]:
    """affinity.json, validated: tasks (distinct strings), a square numeric matrix of matching size."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"affinity file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"affinity file {str(path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"affinity file {str(path)!r} must hold a JSON object with 'tasks' and 'matrix'")
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or len(tasks) < 1 or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"affinity file {str(path)!r}: 'tasks' must be a non-empty list of task names")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"affinity file {str(path)!r}: 'tasks' has duplicates")
    M = data.get("matrix")
    n = len(tasks)
    if not isinstance(M, list) or len(M) != n or not all(isinstance(r, list) and len(r) == n for r in M):
        raise ValueError(f"affinity file {str(path)!r}: 'matrix' must be a {n} x {n} list of lists (one row per task)")
    for r in M:
        for v in r:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"affinity file {str(path)!r}: 'matrix' holds a non-numeric entry {v!r}")
    if all(v is None for r in M for v in r):
        raise ValueError(f"affinity file {str(path)!r}: 'matrix' has no values")
    return data


def grouping_matrix(params: GroupingParams, data: dict[str, Any], where: str) -> tuple[list[str], str, np.ndarray]:
    """(tasks, metric, T) that a grouping job clusters, from a read affinity.json (`where` names the file in errors);
    ValueError when the file does not hold what the params ask for."""
    tasks: list[str] = data["tasks"]
    if params.tasks is not None and sorted(params.tasks) != sorted(tasks):
        raise ValueError(f"affinity file tasks {tasks} differ from the requested tasks {params.tasks}")
    metric = params.metric or data.get("metric", "accuracy")
    if params.metric and params.metric != data.get("metric"):
        mats = data.get("matrices") or {}
        if metric not in mats:
            raise ValueError(f"{where} has no {metric!r} matrix")
        T = mx.from_json_matrix(mats[metric])
    else:
        T = mx.from_json_matrix(data["matrix"])
    if isinstance(params.groups, int) and params.groups > len(tasks):
        raise ValueError(f"groups={params.groups} is more than the {len(tasks)} tasks in {where}")
    return tasks, metric, T


def run_grouping(params: GroupingParams, workdir: Path, progress: Progress = silent) -> dict[str, Any]:
    """Cluster the tasks of an affinity.json into groups; writes groups.json and groups.png."""
    workdir = Path(workdir)
    path = Path(params.affinity) if params.affinity else workdir / "affinity.json"
    if params.affinity and not path.is_absolute() and not path.exists() and (workdir / path).exists():
        path = workdir / path
    tasks, metric, T = grouping_matrix(params, read_affinity(path), f"affinity file {str(path)!r}")
    C = mx.clustering_matrix(T, centre=params.centre)
    progress("grouping", 0, 1, "clustering")
    structure = structure_test(T, params.permutations, params.structure_alpha, params.seed)
    if params.groups == "auto":
        result = group_auto(C, params.method, params.seed, params.m_max, params.sdp_max_n)
    else:
        result = group_fixed(C, int(params.groups), params.method, params.seed, params.sdp_max_n)
    # With no structure above noise, auto's partition is only a candidate: the pipeline also trains the
    # single and per-task arms and deploys whichever validation favours.
    fallback = params.groups == "auto" and not structure["significant"]
    groups = [[tasks[i] for i in g] for g in result.groups]
    workdir.mkdir(parents=True, exist_ok=True)
    mx.heatmap(
        workdir / "groups.png", tasks, T, f"affinity ({metric}) with {result.m} groups ({result.method})", groups
    )
    doc = json_safe(
        {
            "groups": groups,
            "method": result.method,
            "m": result.m,
            "requested": params.groups,
            "metric": metric,
            "objective": result.objective,
            "details": result.details,
            "tasks": tasks,
            "structure": structure,
            "selection": "validation" if fallback else "groups",
            "affinity": str(path),
            "params": params.model_dump(mode="json"),
        }
    )
    atomic_write_json(workdir / "groups.json", doc)
    progress("grouping", 1, 1, f"{result.m} groups")
    return {
        "groups": groups,
        "method": result.method,
        "m": result.m,
        "structure_p": structure["p"],
        "selection": "validation" if fallback else "groups",
        "artifacts": {"groups": "groups.json", "groups_heatmap": "groups.png"},
    }
