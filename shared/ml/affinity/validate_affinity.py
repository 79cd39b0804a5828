"""Stage 1's affinity estimate validated against the truth it stands for (job stage `run_validate_affinity`).

For each seed: (a) Stage 1 (`run_affinity`) on the tasks with a fixed list of subsets (the same for every
seed), its estimates then re-read per row from theta0 + P w_S (weights.npy) so every target metric, theta0's
included, comes from the answer-choice logits; (b) every subset fine-tuned the way Stage 2 trains a group
adapter (`train_many`, a fresh seeded LoRA, the seed's TrainingParams) and each of its tasks scored on the
same validation rows. Estimates of each seed are compared with the seed-averaged truth (agreement.py):
within-task order (Spearman, pairwise order accuracy), change from theta0, the T matrices and the groups.

Workdir: seed-<s>/affinity/ (Stage 1's files), seed-<s>/estimates.json and seed-<s>/truth.json (per-seed
results; a re-run with the same params reuses them), validate_affinity.json and validate_affinity.csv.
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.files import atomic_write_json, atomic_write_text, json_safe
from shared.ml.affinity import agreement as ag
from shared.ml.affinity import matrix as mx
from shared.ml.affinity.params import ValidateAffinityParams
from shared.ml.affinity.run_files import check_or_write_params, csv_text
from shared.ml.affinity.runtime import load_npy
from shared.ml.affinity.subsets import default_subset_size, pair_counts, sample_subsets
from shared.ml.progress import Progress, silent

FORMAT_VERSION = 1
METRICS = ("neg_loss", "accuracy", "margin", "neg_vocab_loss")
# params that do not change the per-seed results (a re-run may change them and reuse seed-<s>/)
_REUSABLE = {
    "device",
    "seeds",
    "metric",
    "groups",
    "noise_factor",
    "bootstrap",
    "permutations",
    "random_partitions",
    "stats_seed",
    "variants",
}
DEFINITIONS = {
    "neg_loss": "-mean cross-entropy of the gold label over the task's answer-choice logits (validation rows)",
    "accuracy": "share of validation rows whose highest answer-choice logit is the gold one",
    "margin": "mean over validation rows of the gold choice logit minus the highest other choice logit",
    "neg_vocab_loss": "-mean answer-token cross-entropy over the full vocabulary (the 'loss' both stages report)",
    "spearman_within_task": "Spearman of est vs true over (seed, subset, task) points after subtracting each task's "
    "mean over its subsets (est per seed, true averaged over seeds); 95% CI: bootstrap over "
    "subsets resampled within tasks",
    "pairwise_order_accuracy": "over subset pairs sharing a task whose seed-mean true gap exceeds noise_factor x the "
    "task's seed noise (SD across seeds, pooled over its subsets): share ordered alike by "
    "each seed's estimate (ties 1/2)",
    "change_skill": "1 - MSE(est - ref, true - ref) / MSE(0, true - ref) over (seed, subset, task), ref = the task's "
    "performance at Stage 1's theta0 of that seed, true change averaged over seeds",
    "t_correlation": "Pearson of the off-diagonal entries of the row-centred (off-diagonal row mean) T_est of each seed "
    "and the seed-mean T_true, averaged over seeds; p: one-sided Mantel test permuting T_true's task "
    "labels jointly on rows and columns",
    "t_true_reliability": "the same correlation between the T_true of two seeds (mean over seed pairs): the ceiling "
    "of a single-seed t_correlation",
    "ari": "adjusted Rand index between the groups of each seed's T_est and of the seed-mean T_true (same m, "
    "grouping.group_fixed on the row-centred symmetrised T), mean over seeds; random_p95: 95th percentile of "
    "the ARI between T_true's groups and random partitions with its group sizes",
}


# ------------------------------------------------------------------------------------------ subsets


def plan_subsets(
    n: int, size: int, enumerate_limit: int = 20, min_subsets: int = 40, coverage: int = 5, seed: int = 0
) -> tuple[list[tuple[int, ...]], dict[str, Any]]:
    """Every s-subset when C(n, s) <= enumerate_limit; else distinct pair-covering subsets (subsets.sample_subsets),
    the coverage raised until there are at least `min_subsets` (or all C(n, s) of them)."""
    if not 2 <= size < n:
        raise ValueError(f"subset size must be between 2 and {n - 1} for {n} tasks, got {size}")
    total = math.comb(n, size)
    if total <= enumerate_limit:
        return list(itertools.combinations(range(n), size)), {"rule": "all", "coverage": None}
    k = coverage
    while True:
        drawn = list(dict.fromkeys(sample_subsets(n, size, k, seed, enumerate_limit)))
        if len(drawn) >= min(min_subsets, total):
            return drawn, {"rule": "sampled", "coverage": k}
        k += 1


# ------------------------------------------------------------------------------------------ scoring


def choice_metrics(choice_logits: torch.Tensor, labels: torch.Tensor, nll: torch.Tensor) -> dict[str, float]:
    """Every target metric of one task's rows from its answer-choice logits [N, C], gold labels and vocab NLL."""
    logits = choice_logits.double()
    labels = labels.long()
    gold = logits.gather(1, labels[:, None])[:, 0]
    ce = torch.logsumexp(logits, -1) - gold
    others = logits.masked_fill(torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
    return {
        "neg_loss": -float(ce.mean()),
        "accuracy": float((logits.argmax(-1) == labels).double().mean()),
        "margin": float((gold - others.max(-1).values).mean()),
        "neg_vocab_loss": -float(nll.double().mean()),
        "n": int(len(labels)),
    }


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _rescore_estimates(
    rt: Any, subsets: list[tuple[int, ...]], W: torch.Tensor, max_val: int | None, progress: Progress
) -> tuple[list[dict[str, dict[str, float]]], dict[str, dict[str, float]]]:
    """Per subset {task: metrics} at theta0 + P w_S, and {task: metrics} at theta0 (one more, zero, slot)."""
    from shared.ml.affinity.estimate import multiplexed_forward, stack_deltas

    val_rows = rt.rows("val", max_val)
    stacks = stack_deltas(rt.projector, W)
    stacks = {k: torch.cat([v, torch.zeros_like(v[:1])]) for k, v in stacks.items()}  # slot K = theta0
    K = len(subsets)
    est: list[dict[str, dict[str, float]]] = [{} for _ in subsets]
    theta0: dict[str, dict[str, float]] = {}
    pad = rt.tokenizer.pad_token_id or 0
    for t, name in enumerate(val_rows.tasks):
        members = [k for k in range(K) if t in subsets[k]] + [K]
        examples = [val_rows.items[i] for i in val_rows.task_rows(t)]
        items = [(ex, slot) for slot in range(len(members)) for ex in examples]
        out = multiplexed_forward(
            rt.model,
            rt.sites,
            {k: v[members] for k, v in stacks.items()},
            items,
            rt.bound[name].choice_token_ids,
            rt.batching.eval_rows,
            pad,
            rt.device,
            progress,
            "re-read estimates",
            name,
            max_tokens=rt.batching.eval_tokens,
        )
        labels = torch.tensor([ex.label for ex in examples])
        n = len(examples)
        for slot, k in enumerate(members):
            part = slice(slot * n, (slot + 1) * n)
            m = choice_metrics(out.choice_logits[part], labels, out.nll[part])
            if k == K:
                theta0[name] = m
            else:
                est[k][name] = m
    return est, theta0


def _lengths(rows: Any) -> tuple[int, int, int]:
    lengths = [len(it.input_ids) for it in rows.items]
    return sum(lengths), len(lengths), sum(x * x for x in lengths)


def _stage1_flops(rt: Any, aff: Any, subsets: list[tuple[int, ...]], theta0_record: dict[str, Any]) -> dict[str, float]:
    """Analytic FLOPs of the Stage-1 run (training/costs.py's model): gradient pass over the training rows,
    theta0's all-task fine-tune (init=meta), the base evaluation and one forward per subset and task."""
    from shared.ml.training.costs import ModelShape

    shape = ModelShape.from_model(rt.model, aff.rank, tuple(aff.targets))
    train, val = rt.rows("train", aff.max_train), rt.rows("val", aff.max_val)
    tr = _lengths(train)
    train_pass = shape.forward_flops(*tr) + shape.backward_flops(*tr)
    per_task = [_lengths(rt.rows("val", aff.max_val, [name])) for name in val.tasks]
    if aff.mode == "linear":  # one gradient pass over the validation rows instead of a forward per subset
        vl = _lengths(val)
        forwards = shape.forward_flops(*vl) + shape.backward_flops(*vl)
    else:
        forwards = sum(shape.forward_flops(*per_task[t]) for s in subsets for t in s)
    meta = int(theta0_record.get("epochs", 0)) * train_pass if theta0_record.get("init") == "meta" else 0.0
    base_eval = shape.forward_flops(*_lengths(val))
    return {
        "gradients": train_pass,
        "theta0_finetune": meta,
        "base_eval": base_eval,
        "estimate_forwards": forwards,
        "total": train_pass + meta + base_eval + forwards,
    }


def _linear_estimates(
    rt: Any, aff_dir: Path, doc: dict[str, Any], subsets: list[tuple[int, ...]], max_val: int | None
) -> tuple[list[dict[str, dict[str, float]]], dict[str, dict[str, float]]]:
    """Mode linear: Stage 1's own first-order estimates z = f0 + g . w (choice log-odds, so softplus(-z) is the
    choice cross-entropy); theta0's metrics from f0 alone (the proxy at w = 0). margin/vocab loss do not exist."""
    nan = float("nan")
    est: list[dict[str, dict[str, float]]] = [{} for _ in subsets]
    for r in doc["per_subset"]:
        est[r["subset"]][r["task"]] = {
            "neg_loss": -r["loss"],
            "accuracy": r["accuracy"],
            "margin": nan,
            "neg_vocab_loss": nan,
            "n": r["n"],
        }
    f0 = torch.from_numpy(load_npy(aff_dir / "f0_val.npy").copy()).double()
    val_rows = rt.rows("val", max_val)
    theta0 = {}
    for t, name in enumerate(val_rows.tasks):
        z = f0[torch.as_tensor(val_rows.task_rows(t))]
        theta0[name] = {
            "neg_loss": -float(torch.nn.functional.softplus(-z).mean()),
            "accuracy": float((z > 0).double().mean()),
            "margin": nan,
            "neg_vocab_loss": nan,
            "n": int(len(z)),
        }
    return est, theta0


def estimate_seed(
    params: ValidateAffinityParams,
    seed: int,
    subsets: list[tuple[int, ...]],
    workdir: Path,
    progress: Progress = silent,
    variant: str | None = None,
) -> dict[str, Any]:
    """Stage 1 of one seed on the fixed subsets, re-read per task; cached in workdir/estimates.json (a variant:
    workdir/variant-<name>/estimates.json beside its Stage-1 files)."""
    from shared.ml.affinity.stage import prepare_affinity, run_affinity

    home = workdir if variant is None else workdir / f"variant-{variant}"
    path = home / "estimates.json"
    names = [[params.tasks[i] for i in s] for s in subsets]
    aff = params.affinity_params(seed, names, variant)
    if path.exists():
        record = json.loads(path.read_text())
        if variant is None or record.get("affinity_params") == aff.model_dump(mode="json"):
            return record
        raise ValueError(f"{home} holds variant {variant!r} with other settings; remove it or rename the variant")
    aff_dir = home / "affinity"
    summary = run_affinity(aff, aff_dir, progress)
    doc = json.loads((aff_dir / "affinity.json").read_text())
    if doc["subsets"] != names:
        raise RuntimeError(f"{aff_dir} holds other subsets than the validation planned; remove it")
    rt = prepare_affinity(aff, aff_dir)
    try:
        t0 = time.perf_counter()
        if aff.mode == "linear":
            est, theta0 = _linear_estimates(rt, aff_dir, doc, subsets, aff.max_val)
        else:
            W = torch.from_numpy(load_npy(aff_dir / "weights.npy").copy())
            est, theta0 = _rescore_estimates(rt, subsets, W, aff.max_val, progress)
        reread = time.perf_counter() - t0
        flops = _stage1_flops(rt, aff, subsets, doc.get("theta0") or {})
    finally:
        del rt
        _free()
    # the re-read must reproduce Stage 1's own table (accuracy; vocab loss in mode forward)
    gaps = [
        (
            abs(r["accuracy"] - est[r["subset"]][r["task"]]["accuracy"]),
            abs(r["loss"] + est[r["subset"]][r["task"]]["neg_vocab_loss"]) if aff.mode == "forward" else 0.0,
        )
        for r in doc["per_subset"]
    ]
    record = {
        "seed": seed,
        "variant": variant,
        "affinity_params": aff.model_dump(mode="json"),
        "subsets": names,
        "estimates": est,
        "theta0": theta0,
        "init": doc.get("init"),
        "mode": aff.mode,
        "theta0_record": doc.get("theta0"),
        "stage1": {
            "wall_seconds": summary.get("wall_seconds"),
            "timing_seconds": doc.get("timing_seconds"),
            "flops": flops,
        },
        "reread_seconds": round(reread, 3),
        "reread_vs_stage1": {
            "max_abs_accuracy": max(g[0] for g in gaps),
            "max_abs_vocab_loss": max(g[1] for g in gaps),
        },
    }
    atomic_write_json(path, json_safe(record))
    return record


def truth_seed(
    params: ValidateAffinityParams,
    seed: int,
    subsets: list[tuple[int, ...]],
    workdir: Path,
    progress: Progress = silent,
) -> dict[str, Any]:
    """Every subset (and, optionally, all tasks) fine-tuned by the Stage-2 trainer with the seed's TrainingParams,
    each task scored on its validation rows; cached in workdir/truth.json."""
    from shared.ml.models import Base
    from shared.ml.training.costs import Cost, ModelShape, sum_costs, synchronize
    from shared.ml.training.many import AdapterSpec, train_many
    from shared.ml.training.trainer import load_state, lora_alpha, prepare_tasks, score_split, temporary_adapter

    path = workdir / "truth.json"
    if path.exists():
        return json.loads(path.read_text())
    tp = params.training_params(seed)
    specs = [AdapterSpec(f"subset-{k}", [params.tasks[i] for i in s]) for k, s in enumerate(subsets)]
    base = Base.load(params.model, params.quantization, None if params.device == "auto" else params.device)
    try:
        data = prepare_tasks(base.tokenizer, params.tasks, tp)
        synchronize(base.device)
        t0 = time.perf_counter()
        trained = train_many(base, specs, tp, data, progress)
        synchronize(base.device)
        wall = time.perf_counter() - t0
        if params.all_task_reference:  # trained apart, so the subsets' wall time is theirs alone
            trained += train_many(base, [AdapterSpec("all-tasks", list(params.tasks))], tp, data, progress)
        shape = ModelShape.from_model(base.model, tp.rank, tuple(tp.targets))
        score_cost = Cost()
        t1 = time.perf_counter()
        adapters: list[dict[str, Any]] = []
        # one scoring adapter, loaded with each trained state in turn
        with temporary_adapter(
            base, "validate-score", tp.rank, lora_alpha(tp), tp.targets, tp.dropout, seed, init_state=trained[0].state
        ) as model:
            model.eval()
            for a in trained:
                load_state(model, "validate-score", a.state)
                metrics = {}
                for t in a.tasks:
                    sc = score_split(model, base, data[t], "val", tp, score_cost, shape, stage=f"score {a.name} {t}")
                    metrics[t] = {
                        **choice_metrics(sc.choice_logits, sc.labels, sc.token_nll),
                        "trainer_accuracy": a.val_metrics[t].accuracy,
                        "trainer_loss": a.val_metrics[t].loss,
                    }
                adapters.append(
                    {
                        "name": a.name,
                        "tasks": list(a.tasks),
                        "metrics": metrics,
                        "best_epoch": a.best_epoch,
                        "cost": a.cost.to_dict(),
                    }
                )
        score_seconds = time.perf_counter() - t1
        subset_cost = sum_costs([a.cost for a in trained[: len(subsets)]])
    finally:
        del base
        _free()
    gaps = [abs(m["accuracy"] - m["trainer_accuracy"]) for a in adapters for m in a["metrics"].values()]
    record = {
        "seed": seed,
        "training_params": tp.model_dump(mode="json"),
        "adapters": adapters[: len(subsets)],
        "all_tasks": adapters[len(subsets)] if params.all_task_reference else None,
        "finetune": {"wall_seconds": round(wall, 3), "subsets_cost": subset_cost.to_dict()},
        "rescore": {
            "wall_seconds": round(score_seconds, 3),
            "cost": score_cost.to_dict(),
            "max_abs_accuracy_vs_trainer": max(gaps) if gaps else None,
        },
    }
    atomic_write_json(path, json_safe(record))
    return record


# ------------------------------------------------------------------------------------------ statistics


def _tables(
    params: ValidateAffinityParams, subsets: list[tuple[int, ...]], est: list[dict], truth: list[dict], metric: str
) -> dict[str, np.ndarray]:
    S, K, n = len(est), len(subsets), len(params.tasks)
    out = {key: np.full((S, K, n), np.nan) for key in ("est", "true")}
    out["theta0"] = np.full((S, n), np.nan)
    out["all_tasks"] = np.full((S, n), np.nan)
    for s, (e, tr) in enumerate(zip(est, truth, strict=False)):
        for k, sub in enumerate(subsets):
            for i in sub:
                name = params.tasks[i]
                out["est"][s, k, i] = e["estimates"][k][name][metric]
                out["true"][s, k, i] = tr["adapters"][k]["metrics"][name][metric]
        for i, name in enumerate(params.tasks):
            out["theta0"][s, i] = e["theta0"][name][metric]
            if tr.get("all_tasks"):
                out["all_tasks"][s, i] = tr["all_tasks"]["metrics"][name][metric]
    return out


def _groups(T_true: np.ndarray, T_ests: list[np.ndarray], params: ValidateAffinityParams) -> dict[str, Any]:
    from shared.ml.affinity.grouping import group_auto, group_fixed

    C_true = mx.clustering_matrix(T_true)
    if params.groups == "auto":
        true = group_auto(C_true, seed=params.stats_seed)
    else:
        true = group_fixed(C_true, int(params.groups), seed=params.stats_seed)
    ests = [group_fixed(mx.clustering_matrix(T), true.m, seed=params.stats_seed) for T in T_ests]
    return {"m": true.m, "true": true.groups, "est": [g.groups for g in ests], "method": true.method}


def agreement_report(
    params: ValidateAffinityParams, subsets: list[tuple[int, ...]], est: list[dict], truth: list[dict]
) -> dict[str, Any]:
    """The contract metrics and their detail from the per-seed records."""
    n, K = len(params.tasks), len(subsets)
    member = np.zeros((K, n), dtype=bool)
    for k, s in enumerate(subsets):
        member[k, list(s)] = True
    tb = _tables(params, subsets, est, truth, params.metric)
    E, Tr, ref = tb["est"], tb["true"], tb["theta0"]
    sp = ag.within_task_spearman(E, Tr, member, params.bootstrap, params.stats_seed)
    order = ag.pairwise_order(E, Tr, member, params.noise_factor)
    est_change = np.where(member[None], E - ref[:, None, :], np.nan)
    true_change = ag.seed_mean(Tr - ref[:, None, :], member)
    skill = ag.change_skill(est_change, np.broadcast_to(true_change, est_change.shape))
    true_mean = ag.seed_mean(Tr, member)
    T_true = ag.affinity_from_table(true_mean, member)
    T_true_seeds = [ag.affinity_from_table(Tr[s], member) for s in range(len(truth))]
    T_ests = [ag.affinity_from_table(E[s], member) for s in range(len(est))]
    mantel = ag.mantel(T_ests, T_true, params.permutations, params.stats_seed)
    pairs = list(itertools.combinations(range(len(truth)), 2))
    reliability = (
        float(np.mean([ag.offdiag_corr(T_true_seeds[a], T_true_seeds[b]) for a, b in pairs])) if pairs else None
    )
    groups = _groups(T_true, T_ests, params)
    ari = ag.ari_vs_random(groups["true"], groups["est"], n, params.random_partitions, params.stats_seed)
    T_est_mean = ag.affinity_from_table(ag.seed_mean(E, member), member)
    group_names = {
        "true": [[params.tasks[i] for i in g] for g in groups["true"]],
        "est_per_seed": {
            str(s): [[params.tasks[i] for i in g] for g in gs]
            for s, gs in zip(params.seeds, groups["est"], strict=False)
        },
    }

    def mse(pred: np.ndarray) -> float:
        d = np.where(member[None], pred - true_mean[None], np.nan)
        return float(np.nanmean(d**2))

    no_change = {
        "reference": "theta0 of Stage 1 (init=" + str(est[0].get("init")) + ")",
        "mse_estimate": mse(E),
        "mse_theta0": mse(np.broadcast_to(ref[:, None, :], E.shape)),
        "mse_all_task_finetune": mse(np.broadcast_to(tb["all_tasks"][:, None, :], E.shape))
        if np.isfinite(tb["all_tasks"]).any()
        else None,
        "theta0": {str(s): dict(zip(params.tasks, ref[i].tolist(), strict=False)) for i, s in enumerate(params.seeds)},
        "all_task_finetune": {
            str(s): dict(zip(params.tasks, tb["all_tasks"][i].tolist(), strict=False))
            for i, s in enumerate(params.seeds)
        },
        "change_skill_vs_all_task_reference": ag.change_skill(
            np.where(member[None], E - tb["all_tasks"][:, None, :], np.nan),
            np.broadcast_to(ag.seed_mean(Tr - tb["all_tasks"][:, None, :], member), E.shape),
        )
        if np.isfinite(tb["all_tasks"]).any()
        else None,
    }
    return {
        "spearman_within_task": {"value": sp["value"], "ci95": sp["ci95"]},
        "pairwise_order_accuracy": order["value"],
        "change_skill": skill,
        "t_correlation": {"value": mantel["value"], "p": mantel["p"]},
        "t_true_reliability": reliability,
        "ari": {"est_vs_true": ari["value"], "random_p95": ari["random_p95"]},
        "detail": {
            "spearman_per_task": {params.tasks[i]: v for i, v in sp["per_task"].items()},
            "spearman_points": sp["points"],
            "bootstrap": sp["bootstrap"],
            "pairwise_order": {k: v for k, v in order.items() if k != "value"}
            | {"seed_noise": dict(zip(params.tasks, order["seed_noise"], strict=False))},
            "change_reference": no_change["reference"],
            "no_change": no_change,
            "t_correlation_per_seed": {
                str(s): ag.offdiag_corr(T, T_true) for s, T in zip(params.seeds, T_ests, strict=False)
            },
            "t_correlation_seed_mean_estimate": ag.offdiag_corr(T_est_mean, T_true),
            "permutations": params.permutations,
            "ari_per_seed": dict(zip((str(s) for s in params.seeds), ari["per_estimate"], strict=False)),
            "ari_random_mean": ari["random_mean"],
            "random_partitions": params.random_partitions,
            "groups": {"m": groups["m"], "method": groups["method"], **group_names},
            "matrices": {
                "T_est_per_seed": {str(s): mx.to_json_matrix(T) for s, T in zip(params.seeds, T_ests, strict=False)},
                "T_est_seed_mean": mx.to_json_matrix(T_est_mean),
                "T_true": mx.to_json_matrix(T_true),
                "T_true_per_seed": {
                    str(s): mx.to_json_matrix(T) for s, T in zip(params.seeds, T_true_seeds, strict=False)
                },
            },
        },
    }


def _rows(
    params: ValidateAffinityParams, subsets: list[tuple[int, ...]], est: list[dict], truth: list[dict]
) -> list[dict]:
    rows = []
    for e, tr in zip(est, truth, strict=False):
        for k, s in enumerate(subsets):
            for i in s:
                name = params.tasks[i]
                row: dict[str, Any] = {
                    "seed": e["seed"],
                    "subset": k,
                    "tasks": "+".join(params.tasks[j] for j in s),
                    "task": name,
                }
                for m in METRICS:
                    row[f"est_{m}"] = e["estimates"][k][name][m]
                    row[f"true_{m}"] = tr["adapters"][k]["metrics"][name][m]
                    row[f"theta0_{m}"] = e["theta0"][name][m]
                row["true_best_epoch"] = tr["adapters"][k]["best_epoch"]
                rows.append(row)
    return rows


def _stage1_vs_all_task(est: list[dict], truth: list[dict]) -> float | None:
    """Stage 1's FLOPs over the all-task reference fine-tune's (the single adapter), summed over seeds."""
    ref = [((t.get("all_tasks") or {}).get("cost") or {}).get("total_flops") for t in truth]
    flops: list[float] = [x for x in ref if isinstance(x, (int, float)) and x > 0]
    if len(flops) != len(ref):
        return None
    return sum(e["stage1"]["flops"]["total"] for e in est) / sum(flops)


def variant_report(
    params: ValidateAffinityParams, subsets: list[tuple[int, ...]], est: list[dict], truth: list[dict]
) -> dict[str, Any]:
    """One estimator's contract metrics against the fine-tunes, with its Stage-1 cost."""
    report = agreement_report(params, subsets, est, truth)
    detail = report.pop("detail")
    flops = [e["stage1"]["flops"]["total"] for e in est]
    return {
        **report,
        "change_mse": {k: detail["no_change"][k] for k in ("mse_estimate", "mse_theta0")},
        "t_correlation_seed_mean_estimate": detail["t_correlation_seed_mean_estimate"],
        "groups_est_per_seed": detail["groups"]["est_per_seed"],
        "stage1_flops": float(np.mean(flops)),
        "stage1_vs_all_task_flops": _stage1_vs_all_task(est, truth),
        "stage1_wall_seconds": float(np.mean([e["stage1"]["wall_seconds"] or 0.0 for e in est])),
        "affinity_params": {k: v for k, v in est[0]["affinity_params"].items() if k not in ("tasks", "subsets", "seed")}
        if est[0].get("affinity_params")
        else None,
    }


def _costs(est: list[dict], truth: list[dict]) -> dict[str, Any]:
    s1_flops = sum(e["stage1"]["flops"]["total"] for e in est)
    s1_wall = sum(e["stage1"]["wall_seconds"] or 0.0 for e in est)
    ft_flops = sum(t["finetune"]["subsets_cost"]["total_flops"] for t in truth)
    ft_wall = sum(t["finetune"]["wall_seconds"] for t in truth)
    return {
        "stage1": {str(e["seed"]): e["stage1"] for e in est},
        "finetunes": {str(t["seed"]): t["finetune"] for t in truth},
        "all_task_reference": {str(t["seed"]): (t["all_tasks"] or {}).get("cost") for t in truth},
        "reread_seconds": {str(e["seed"]): e["reread_seconds"] for e in est},
        "rescore": {str(t["seed"]): t["rescore"] for t in truth},
        "stage1_flops": s1_flops,
        "finetune_flops": ft_flops,
        "stage1_wall_seconds": s1_wall,
        "finetune_wall_seconds": ft_wall,
        "flop_ratio": ft_flops / s1_flops if s1_flops else None,
        "wall_ratio": ft_wall / s1_wall if s1_wall else None,
        "stage1_vs_all_task_flops": _stage1_vs_all_task(est, truth),
        "note": "stage1 = run_affinity (wall includes model load and theta0; FLOPs analytic, training/costs.py model); "
        "finetunes = train_many over the subsets (wall of the call; FLOPs from the trainer's Cost: training steps "
        "+ per-epoch validation). Neither counts the re-reads/re-scores this validation adds.",
    }


def run_validate_affinity(params: ValidateAffinityParams, workdir: Path, progress: Progress = silent) -> dict[str, Any]:
    """Job stage: Stage 1 vs Stage-2 fine-tunes of every subset, over the seeds; writes validate_affinity.json/.csv."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    check_or_write_params(params, workdir, _REUSABLE, "validation", rewrite=True)
    t0 = time.perf_counter()
    n = len(params.tasks)
    size = params.subset_size or default_subset_size(n)
    subsets, plan = plan_subsets(
        n, size, params.enumerate_limit, params.min_subsets, params.coverage, params.subset_seed
    )
    est, truth = [], []
    for s in params.seeds:
        seed_dir = workdir / f"seed-{s}"
        est.append(estimate_seed(params, s, subsets, seed_dir, progress))
        truth.append(truth_seed(params, s, subsets, seed_dir, progress))
    variants = {}
    for name in params.variants:
        v_est = [estimate_seed(params, s, subsets, workdir / f"seed-{s}", progress, name) for s in params.seeds]
        variants[name] = variant_report(params, subsets, v_est, truth)
    report = agreement_report(params, subsets, est, truth)
    rows = _rows(params, subsets, est, truth)
    counts = np.array(pair_counts(n, subsets))
    detail = report.pop("detail")
    doc = json_safe(
        {
            **report,
            "version": FORMAT_VERSION,
            "metric": params.metric,
            "tasks": params.tasks,
            "seeds": params.seeds,
            "subsets": [[params.tasks[i] for i in s] for s in subsets],
            "subset_plan": {
                **plan,
                "size": size,
                "count": len(subsets),
                "min_pair_coverage": int(counts[~np.eye(n, dtype=bool)].min()),
            },
            **detail,
            "consistency": {
                "estimate_reread_vs_stage1": {str(e["seed"]): e["reread_vs_stage1"] for e in est},
                "rescore_vs_trainer": {str(t["seed"]): t["rescore"]["max_abs_accuracy_vs_trainer"] for t in truth},
            },
            "costs": _costs(est, truth),
            "variants": variants,
            "table": rows,
            "definitions": {k: v for k, v in DEFINITIONS.items() if k not in METRICS or k == params.metric},
            "params": params.model_dump(mode="json"),
            "wall_seconds": round(time.perf_counter() - t0, 3),
        }
    )
    atomic_write_text(workdir / "validate_affinity.csv", csv_text(rows, list(rows[0])))
    atomic_write_json(workdir / "validate_affinity.json", doc)
    progress("validate-affinity", 1, 1, "validate_affinity.json")
    keys = (
        "spearman_within_task",
        "pairwise_order_accuracy",
        "change_skill",
        "t_correlation",
        "t_true_reliability",
        "ari",
    )
    artifacts = {"validate_affinity": "validate_affinity.json", "table": "validate_affinity.csv"}
    artifacts.update({f"affinity_seed{s}": f"seed-{s}/affinity/affinity.json" for s in params.seeds})
    return {
        **{k: doc[k] for k in keys},
        "metric": params.metric,
        "subsets": len(subsets),
        "groups": doc["groups"],
        "costs": {
            k: doc["costs"][k] for k in ("flop_ratio", "wall_ratio", "stage1_wall_seconds", "finetune_wall_seconds")
        },
        "wall_seconds": doc["wall_seconds"],
        "artifacts": artifacts,
    }
