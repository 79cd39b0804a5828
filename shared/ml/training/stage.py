"""Job stages of Stage 2 and of the whole pipeline.

run_training(params, workdir, progress): group adapters -> baselines -> boosting -> ensemble -> test
evaluation; writes adapters/<name>/ (PEFT folders), ensemble.json, ensemble_single.json (the single
all-task baseline as a one-member ensemble) and train_report.json into `workdir`.

pipeline_stages(params): [("affinity", fn), ("grouping", fn), ("training", fn)], each
fn(workdir, inputs, progress) -> summary with "artifacts" {logical name: path relative to workdir};
run_pipeline runs them in order, skipping a stage whose summary (stages/<name>.json) and artifacts
already exist. The training stage of the pipeline also writes report.json (with every stage's cost).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from shared.files import atomic_write_text, json_safe
from shared.ml.evaluate import TaskMetrics, metrics_from_scores
from shared.ml.models import Base
from shared.ml.progress import Progress, silent
from shared.ml.training.adapters import AdapterMeta, save_adapter_state
from shared.ml.training.boosting import BoostResult, accuracy_and_ce, boost_group
from shared.ml.training.costs import FLOP_FORMULA, Cost, ModelShape, StageClock, sum_costs
from shared.ml.training.dequant import resolve as resolve_dequantize
from shared.ml.training.ensemble import (
    AdapterPool,
    BaseIdentity,
    EnsembleManifest,
    Member,
    TaskWeights,
    combine,
    default_weights,
    fit_weights,
    write_manifest,
)
from shared.ml.training.many import AdapterSpec
from shared.ml.training.params import TrainingParams, read_groups_file
from shared.ml.training.pipeline_params import PipelineParams
from shared.ml.training.trainer import (
    TaskData,
    TrainedAdapter,
    mean,
    prepare_tasks,
    score_split,
    trainable_4bit,
)

BASE_MEMBER = "base"
COLUMNS = ("ensemble", "single", "zero_shot", "ensemble_no_boost", "ensemble_no_fit", "per_task")
PREDICTIONS_FILE = "predictions.json"  # per-row gold labels and every column's predicted label, per split
StageFn = Callable[[Path, dict[str, Path], Progress], dict[str, Any]]


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(data), indent=2) + "\n")


class _Run:
    """State of one run_training call: the base, prepared data, the adapter pool and a logits cache."""

    def __init__(self, params: TrainingParams, workdir: Path, progress: Progress) -> None:
        self.params = params
        self.workdir = workdir
        self.progress = progress
        self.base = Base.load(params.model, params.quantization)
        trainable_4bit(self.base.model)  # one numeric path for training, validation and evaluation
        self.clock = StageClock(self.base.device)
        self.shape = ModelShape.from_model(self.base.model, params.rank, tuple(params.targets))
        self.data: dict[str, TaskData] = prepare_tasks(self.base.tokenizer, params.all_tasks(), params)
        self.pool = AdapterPool(self.base)
        self.metas: dict[str, AdapterMeta] = {}
        self.logits: dict[tuple[str, str, str], torch.Tensor] = {}
        self.costs: dict[str, Cost] = {}

    def cost(self, key: str) -> Cost:
        return self.costs.setdefault(key, Cost())

    # ------------------------------------------------------------------ adapters

    def save(self, trained: TrainedAdapter, role: str) -> AdapterMeta:
        p = self.params
        meta = AdapterMeta(
            name=trained.name,
            **self.base.info.identity(),
            tasks=list(trained.tasks),
            seed=trained.seed,
            rank=p.rank,
            alpha=p.lora_alpha,
            targets=list(p.targets),
            hyperparameters=trained.hyperparameters,
            val_metrics={t: m.to_dict() for t, m in trained.val_metrics.items()},
            role=role,
        )
        saved = save_adapter_state(trained.state, trained.peft_config, self.workdir / "adapters" / trained.name, meta)
        self.metas[trained.name] = saved
        return saved

    def member_logits(self, member: str, task: str, split: str, cost_key: str) -> torch.Tensor:
        """Choice logits of a member (saved adapter, loaded and verified through the pool; or the base)."""
        key = (member, task, split)
        if key not in self.logits:
            if member == BASE_MEMBER:
                adapter = None
            else:
                adapter = member
                self.pool.ensure(member, self.workdir / "adapters" / member, self.metas[member].sha256)
            with self.pool.active(adapter) as model:
                scores = score_split(
                    model,
                    self.base,
                    self.data[task],
                    split,
                    self.params,
                    self.cost(cost_key),
                    self.shape,
                    lora=adapter is not None,
                )
            self.logits[key] = scores.choice_logits
        return self.logits[key]

    def labels(self, task: str, split: str) -> torch.Tensor:
        return torch.tensor([e.label for e in self.data[task].split(split)])

    def accuracy(self, logits: torch.Tensor, task: str, split: str) -> float:
        return accuracy_and_ce(logits, self.labels(task, split))[0]

    def metrics(self, logits: torch.Tensor, task: str, split: str) -> TaskMetrics:
        from shared.ml.evaluate import TaskScores

        labels = self.labels(task, split)
        nll = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")  # over the choices
        scores = TaskScores([e.id for e in self.data[task].split(split)], logits, labels, nll)
        return metrics_from_scores(scores, self.data[task].bound.num_choices)


def _train_all(run: _Run, specs: list[AdapterSpec]) -> dict[str, TrainedAdapter]:
    """Every adapter of `specs`: one fused train_many call, or fanned out over a job's workers (shards.py)."""
    from shared.ml.training.shards import train_adapters

    return train_adapters(run.base, specs, run.params, run.data, run.workdir, run.progress)


@dataclass(frozen=True)
class _Groups:
    """The run's tasks and groups: adapter names[i] is trained on groups[i]."""

    tasks: list[str]
    groups: list[list[str]]
    names: list[str]
    of: dict[str, str]  # task -> its group's adapter

    @classmethod
    def of_params(cls, params: TrainingParams, groups: list[list[str]]) -> _Groups:
        names = [f"group_{i}" for i in range(len(groups))]
        of = {t: names[i] for i, g in enumerate(groups) for t in g}
        return cls(tasks=params.all_tasks(), groups=groups, names=names, of=of)

    def pairs(self) -> list[tuple[str, list[str]]]:
        return list(zip(self.names, self.groups, strict=True))


@dataclass(frozen=True)
class _AdapterPlan:
    """Which adapters the run trains (specs) and which baselines are a group adapter already (reuse)."""

    specs: list[AdapterSpec]
    roles: dict[str, str]  # adapter -> role ("group", "single" or "task"), the group adapters first
    reuse: dict[str, str]  # baseline -> the group adapter it is
    per_task: dict[str, str]  # task -> its per-task baseline adapter
    single: str | None  # the single all-task baseline's name, None when it is off


@dataclass(frozen=True)
class _Boosting:
    """What boosting did per group, and the boosters it kept (in training order)."""

    results: dict[str, BoostResult]
    train_errors: dict[str, float]
    boosters: dict[str, list[str]]  # group -> its boosters' names
    skipped: dict[str, str]  # group -> why it was not boosted
    adapters: dict[str, TrainedAdapter]


@dataclass(frozen=True)
class _Weights:
    """The ensemble's members and weights per task: fitted on validation (when on) and the defaults."""

    member_names: list[str]
    booster_names: list[str]
    weights: dict[str, dict[str, float]]  # the ensemble's (fitted when fit_weights is on)
    no_boost: dict[str, dict[str, float]]  # the group adapter alone
    unfitted: dict[str, dict[str, float]]  # the default weights of the same members
    fitted: dict[str, dict[str, float]]  # empty when fit_weights is off


@dataclass(frozen=True)
class _Manifests:
    manifest: EnsembleManifest
    artifacts: dict[str, str]


@dataclass(frozen=True)
class _Evaluation:
    """Every column's accuracy, metrics and predictions per split and task."""

    splits: list[str]
    main_split: str
    table: dict[str, dict[str, dict[str, Any]]]
    metrics: dict[str, dict[str, dict[str, Any]]]
    predictions: dict[str, dict[str, dict[str, Any]]]
    averages: dict[str, dict[str, float]]


def run_training(
    params: TrainingParams,
    workdir: Path,
    progress: Progress = silent,
    *,
    stage_costs: dict[str, Any] | None = None,
    affinity: dict[str, Any] | None = None,
    report_name: str = "train_report.json",
) -> dict[str, Any]:
    """Stage 2 as a job stage. Returns a JSON-able summary with "artifacts"."""
    workdir = Path(workdir)
    params = params.resolved()
    groups = params.group_lists()
    workdir.mkdir(parents=True, exist_ok=True)
    run = _Run(params, workdir, progress)
    grp = _Groups.of_params(params, groups)
    plan = _plan_adapters(params, grp)
    trained = _train_adapters(run, grp, plan)
    boosting = _boost(run, grp, trained)
    trained = {**trained, **boosting.adapters}
    weights = _ensemble_weights(run, grp, boosting)
    manifests = _write_manifests(run, grp, weights, plan.single, report_name)
    evaluation = _evaluate(run, grp, plan, weights, manifests.manifest)
    cost = _cost_lines(run, manifests.manifest, evaluation.main_split, stage_costs, affinity)
    report = _report(run, grp, trained, boosting, weights, manifests.manifest, evaluation, cost)
    return _write_report(run, report, evaluation.predictions, manifests, report_name)


def _plan_adapters(params: TrainingParams, grp: _Groups) -> _AdapterPlan:
    """1.+2. one adapter per group and the baselines, to be trained together in one fused run (the single
    all-task adapter is the group adapter when there is one group, a per-task adapter the group of that one
    task)."""
    single_name: str | None = "single" if params.baselines.single else None
    reuse: dict[str, str] = {}
    specs = [AdapterSpec(name, list(g)) for name, g in grp.pairs()]
    roles: dict[str, str] = {name: "group" for name in grp.names}
    if single_name:
        same = [n for n, g in grp.pairs() if sorted(g) == sorted(grp.tasks)]
        if same:
            reuse["single"] = same[0]
        else:
            specs.append(AdapterSpec("single", list(grp.tasks)))
        roles["single"] = "single"
    per_task: dict[str, str] = {}
    if params.baselines.per_task:
        for t in grp.tasks:
            name = f"task_{t}"
            same = [n for n, g in grp.pairs() if g == [t]]
            if same:
                reuse[name] = same[0]
            else:
                specs.append(AdapterSpec(name, [t]))
            roles[name] = "task"
            per_task[t] = name
    return _AdapterPlan(specs=specs, roles=roles, reuse=reuse, per_task=per_task, single=single_name)


def _train_adapters(run: _Run, grp: _Groups, plan: _AdapterPlan) -> dict[str, TrainedAdapter]:
    """Train the planned adapters and save the group adapters and the baselines (a reused one under its own
    name); their costs go to "groups", "single" and "per_task"."""
    trained: dict[str, TrainedAdapter] = {}
    with run.clock.stage("group_adapters"):
        fresh = _train_all(run, plan.specs)
        for name in grp.names:
            trained[name] = fresh[name]
            run.save(trained[name], "group")
            run.costs["groups"] = run.cost("groups").merge(trained[name].cost)
    with run.clock.stage("baselines"):
        for name, role in plan.roles.items():
            if role == "group":
                continue
            if name in plan.reuse:
                src = trained[plan.reuse[name]]
                trained[name] = TrainedAdapter(**{**src.__dict__, "name": name})
            else:
                trained[name] = fresh[name]
            run.save(trained[name], role)
            if role == "single":
                run.costs["single"] = trained[name].cost
            else:
                run.costs["per_task"] = run.cost("per_task").merge(trained[name].cost)
    return trained


def _boost(run: _Run, grp: _Groups, trained: dict[str, TrainedAdapter]) -> _Boosting:
    """3. boosting of hard groups, hardest first, within the FLOP budget; saves the boosters it keeps."""
    opts = run.params.boosting
    results: dict[str, BoostResult] = {}
    train_errors: dict[str, float] = {}
    boosters: dict[str, list[str]] = {}
    skipped: dict[str, str] = {}
    adapters: dict[str, TrainedAdapter] = {}
    n = len(grp.groups)
    with run.clock.stage("boosting"):
        if opts.enabled and opts.max_rounds > 0:
            # training error = 1 - mean over the group's tasks of the best epoch's training accuracy
            # (measured during that epoch's forward passes, so deciding costs no extra pass)
            for name, g in grp.pairs():
                acc = trained[name].train_accuracy()
                train_errors[name] = 1.0 - mean([acc.get(t, 0.0) for t in g])
            budget = None if opts.budget is None else opts.budget * run.cost("groups").total_flops
            b_epochs = opts.epochs or run.params.epochs
            order = sorted(range(n), key=lambda i: -train_errors[grp.names[i]])  # hardest first
            for k, i in enumerate(order):
                name, g = grp.names[i], grp.groups[i]
                run.progress("boosting", k, n, name)
                if train_errors[name] <= opts.error_threshold:
                    skipped[name] = "training error below the threshold"
                    continue
                round_flops = _round_flops(run, g, b_epochs)
                if budget is not None:
                    spent = run.cost("boosting").total_flops
                    if spent + _setup_flops(run, g) + round_flops > budget:
                        skipped[name] = "boosting budget"
                        continue
                result = _boost_group(run, name, g, b_epochs, budget, round_flops)
                run.costs["boosting"] = run.cost("boosting").merge(result.cost)
                results[name] = result
                for b in result.boosters:
                    adapters[b.name] = b
                    run.save(b, "booster")
                boosters[name] = [b.name for b in result.boosters]
            run.progress("boosting", n, n, "done")
    return _Boosting(results, train_errors, boosters, skipped, adapters)


def _boost_group(
    run: _Run, name: str, tasks: list[str], epochs: int, budget: float | None, round_flops: float
) -> BoostResult:
    """Boosting rounds of one group on its adapter's and the base's logits (train and validation rows)."""
    opts = run.params.boosting
    z_train = {t: run.member_logits(name, t, "train", "boosting") for t in tasks}
    group_val = {t: run.member_logits(name, t, "val", "boosting") for t in tasks}
    base_train = {t: run.member_logits(BASE_MEMBER, t, "train", "boosting") for t in tasks}
    base_val = {t: run.member_logits(BASE_MEMBER, t, "val", "boosting") for t in tasks}
    return boost_group(
        run.base,
        {t: run.data[t] for t in tasks},
        run.params,
        group=name,
        group_train=z_train,
        group_val=group_val,
        base_train=base_train,
        base_val=base_val,
        eta=opts.eta,
        max_rounds=opts.max_rounds,
        lr=opts.lr,
        epochs=epochs,
        progress=run.progress,
        max_flops=None if budget is None else budget - run.cost("boosting").total_flops,
        round_flops=round_flops,
    )


def _ensemble_weights(run: _Run, grp: _Groups, boosting: _Boosting) -> _Weights:
    """4. the ensemble's members (groups, boosters, the base when there are boosters) and their weights per task,
    fitted on validation when the params ask for it."""
    eta = run.params.boosting.eta
    booster_names = [b for g in grp.names for b in boosting.boosters.get(g, [])]
    has_base = bool(booster_names)
    member_names = grp.names + booster_names + ([BASE_MEMBER] if has_base else [])
    weights = default_weights(grp.pairs(), boosting.boosters, eta, member_names, BASE_MEMBER)
    no_boost = default_weights(grp.pairs(), {}, eta, member_names, BASE_MEMBER)
    fitted: dict[str, dict[str, float]] = {}
    with run.clock.stage("ensemble_weights"):
        if run.params.ensemble.fit_weights:
            for t in grp.tasks:
                g = grp.of[t]
                fitted[t] = _fit_task(run, t, g, boosting.boosters.get(g, []), grp.names, weights[t])
                weights[t] = {m: fitted[t].get(m, 0.0) for m in member_names}
    unfitted = default_weights(grp.pairs(), boosting.boosters, eta, member_names, BASE_MEMBER)
    return _Weights(member_names, booster_names, weights, no_boost, unfitted, fitted)


def _write_manifests(run: _Run, grp: _Groups, w: _Weights, single_name: str | None, report_name: str) -> _Manifests:
    """ensemble.json and (with the single baseline) ensemble_single.json; the artifacts so far."""
    params, workdir = run.params, run.workdir
    members = []
    for name in w.member_names:
        if name == BASE_MEMBER:
            members.append(Member(name=name, path=None, sha256=None, role="base", tasks=[]))
        else:
            meta = run.metas[name]
            role: Literal["group", "booster"] = "booster" if name in w.booster_names else "group"
            members.append(
                Member(name=name, path=f"adapters/{name}", sha256=meta.sha256, role=role, tasks=list(meta.tasks))
            )
    info = run.base.info
    manifest = EnsembleManifest(
        name=params.ensemble.name,
        version=1,
        base=BaseIdentity(**info.identity()),
        max_length=params.max_length,
        members=members,
        tasks={t: TaskWeights(weights=w.weights[t]) for t in grp.tasks},
    )
    manifest = write_manifest(manifest, workdir / "ensemble.json")
    artifacts = {"ensemble": "ensemble.json", "report": report_name}
    for name in run.metas:
        artifacts[f"adapter:{name}"] = f"adapters/{name}"
    if single_name:
        single = Member(
            name="single",
            path="adapters/single",
            sha256=run.metas["single"].sha256,
            role="group",
            tasks=list(grp.tasks),
        )
        single_manifest = EnsembleManifest(
            name=f"{params.ensemble.name}-single",
            version=1,
            base=BaseIdentity(**info.identity()),
            max_length=params.max_length,
            members=[single],
            tasks={t: TaskWeights(weights={"single": 1.0}) for t in grp.tasks},
        )
        write_manifest(single_manifest, workdir / "ensemble_single.json")
        artifacts["ensemble_single"] = "ensemble_single.json"
    return _Manifests(manifest, artifacts)


def _evaluate(run: _Run, grp: _Groups, plan: _AdapterPlan, w: _Weights, manifest: EnsembleManifest) -> _Evaluation:
    """5. evaluation: validation (for choosing settings) and test (reported); closes the adapter pool."""
    params = run.params
    splits = ["val"] + (["test"] if params.evaluate_test else [])
    table: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in splits}
    metrics: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in splits}
    predictions: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in splits}
    with run.clock.stage("evaluation"):
        units = [(s, t) for s in splits for t in grp.tasks]
        for k, (split, t) in enumerate(units):
            run.progress("evaluate", k, len(units), f"{t} {split}")
            cols = _columns(run, grp, plan, w, manifest, t, split)
            ms = {c: run.metrics(z, t, split) for c, z in cols.items()}
            table[split][t] = {c: m.accuracy for c, m in ms.items()}
            metrics[split][t] = {c: m.to_dict() for c, m in ms.items()}
            predictions[split][t] = {
                "labels": run.labels(t, split).tolist(),
                "columns": {c: z.argmax(-1).tolist() for c, z in cols.items()},
            }
        run.progress("evaluate", len(units), len(units), "done")
    run.pool.close()
    main_split = "test" if params.evaluate_test else "val"
    averages = {s: _averages(table[s]) for s in splits}
    return _Evaluation(splits, main_split, table, metrics, predictions, averages)


def _columns(
    run: _Run, grp: _Groups, plan: _AdapterPlan, w: _Weights, manifest: EnsembleManifest, t: str, split: str
) -> dict[str, torch.Tensor]:
    """The choice logits of every report column (ensemble, ablations, baselines) on one task's split."""
    cols: dict[str, torch.Tensor] = {}
    zs = {m: run.member_logits(m, t, split, "evaluation") for m in manifest.active_members(t)}
    cols["ensemble"] = combine(w.weights[t], zs)
    zg = run.member_logits(grp.of[t], t, split, "evaluation")
    cols["ensemble_no_boost"] = combine(w.no_boost[t], {grp.of[t]: zg})
    if w.fitted:
        unfitted = w.unfitted[t]
        cols["ensemble_no_fit"] = combine(
            unfitted, {m: run.member_logits(m, t, split, "evaluation") for m in unfitted if unfitted[m]}
        )
    if plan.single:
        cols["single"] = run.member_logits("single", t, split, "evaluation")
    if run.params.zero_shot:
        cols["zero_shot"] = run.member_logits(BASE_MEMBER, t, split, "evaluation")
    if t in plan.per_task:
        cols["per_task"] = run.member_logits(plan.per_task[t], t, split, "evaluation")
    return cols


def _cost_lines(
    run: _Run,
    manifest: EnsembleManifest,
    main_split: str,
    stage_costs: dict[str, Any] | None,
    affinity: dict[str, Any] | None,
) -> dict[str, Any]:
    """6. cost lines: training FLOPs of the ensemble against the single adapter (with Stage 1's, reported or
    estimated), inference members per example, evaluation and every stage's clock."""
    params, info = run.params, run.base.info
    tasks = params.all_tasks()
    inference = {t: len(manifest.active_members(t)) for t in tasks}
    test_rows = {t: len(run.data[t].split(main_split)) for t in tasks}
    groups_cost = run.cost("groups")
    ensemble_parts = {"groups": groups_cost, "boosting": run.cost("boosting"), "weight_fit": run.cost("weight_fit")}
    affinity_flops = _stage_flops(stage_costs, "affinity")
    affinity_source = "reported by stage 1" if affinity_flops is not None else None
    if affinity_flops is None and affinity is not None:
        affinity_flops = _affinity_flops(run, affinity)
        affinity_source = None if affinity_flops is None else AFFINITY_FORMULA
    ens_total = sum_costs(list(ensemble_parts.values()))
    single_cost = run.costs.get("single")
    return {
        "formula": FLOP_FORMULA,
        "device": str(run.base.device),
        "compute_dtype": info.compute_dtype,
        "quantization": info.quantization,
        "dequantize": resolve_dequantize(params.dequantize, run.base.model),
        "model_shape": run.shape.__dict__,
        "single": single_cost.to_dict() if single_cost else None,
        "groups": groups_cost.to_dict(),
        "boosting": run.cost("boosting").to_dict(),
        "weight_fit": run.cost("weight_fit").to_dict(),
        "per_task": run.costs["per_task"].to_dict() if "per_task" in run.costs else None,
        "ensemble_training": ens_total.to_dict(),
        "affinity_flops": affinity_flops,
        "affinity_flops_source": affinity_source,
        "ensemble_vs_single_flops": (ens_total.total_flops / single_cost.total_flops) if single_cost else None,
        "ensemble_with_affinity_vs_single_flops": (
            (ens_total.total_flops + affinity_flops) / single_cost.total_flops
            if single_cost and affinity_flops is not None
            else None
        ),
        "ensemble_vs_single_train_tokens": (ens_total.train_tokens / single_cost.train_tokens) if single_cost else None,
        "inference": {
            "members_per_example": inference,
            "mean_members_per_example": float(np.average(list(inference.values()), weights=list(test_rows.values()))),
            "single_members_per_example": 1,
        },
        "evaluation": run.cost("evaluation").to_dict(),
        "stages": {**(stage_costs or {}), **run.clock.to_dict()},
    }


def _group_rows(grp: _Groups, trained: dict[str, TrainedAdapter], boosting: _Boosting) -> list[dict[str, Any]]:
    """The report's line per group: its tasks, training error, boosting outcome and validation accuracy."""
    rows = []
    for name, g in grp.pairs():
        res = boosting.results.get(name)
        rows.append(
            {
                "name": name,
                "tasks": g,
                "train_error": boosting.train_errors.get(name),
                "boosted": res is not None,
                "boosters": boosting.boosters.get(name, []),
                "boosting": (res.stopped if res else boosting.skipped.get(name, "boosting off")),
                "val_accuracy": mean([trained[name].val_metrics[t].accuracy for t in g]),
                "val_accuracy_boosted": res.val_accuracy if res else None,
            }
        )
    return rows


def _report(
    run: _Run,
    grp: _Groups,
    trained: dict[str, TrainedAdapter],
    boosting: _Boosting,
    w: _Weights,
    manifest: EnsembleManifest,
    ev: _Evaluation,
    cost: dict[str, Any],
) -> dict[str, Any]:
    """train_report.json's content."""
    return {
        "split": ev.main_split,
        "tasks": ev.table[ev.main_split],
        "average": ev.averages[ev.main_split],
        "validation": {"tasks": ev.table["val"], "average": ev.averages["val"]},
        "metrics": ev.metrics,
        "groups": _group_rows(grp, trained, boosting),
        "cost": cost,
        "ensemble": {
            "path": "ensemble.json",
            "name": manifest.name,
            "fingerprint": manifest.fingerprint,
            "weights": w.weights,
            "fitted": bool(w.fitted),
        },
        "adapters": {
            n: t.summary() | {"sha256": run.metas[n].sha256, "path": f"adapters/{n}"} for n, t in trained.items()
        },
        "boosting": {n: r.summary() for n, r in boosting.results.items()},
        "model": run.base.info.to_dict(),
        "params": run.params.model_dump(mode="json"),
    }


def _write_report(
    run: _Run,
    report: dict[str, Any],
    predictions: dict[str, Any],
    manifests: _Manifests,
    report_name: str,
) -> dict[str, Any]:
    """predictions.json, results.png and the report; returns the stage summary."""
    from shared.ml.plotting import results_chart

    workdir = run.workdir
    write_json(workdir / PREDICTIONS_FILE, predictions)
    artifacts = {**manifests.artifacts, "predictions": PREDICTIONS_FILE}
    results_chart(report, workdir / "results.png")  # beside the heatmaps of a pipeline
    artifacts["results_chart"] = "results.png"
    write_json(workdir / report_name, report)
    cost = report["cost"]
    return {
        "report": {k: report[k] for k in ("tasks", "average", "groups", "split")},
        "cost": {k: cost[k] for k in ("ensemble_vs_single_flops", "inference")},
        "fingerprint": manifests.manifest.fingerprint,
        "artifacts": artifacts,
    }


def _forward_flops(run: _Run, tasks: list[str], split: str, lora: bool = True) -> float:
    lengths = [n for t in tasks for n in run.data[t].lengths(split, run.base.tokenizer, run.params.max_length)]
    return run.shape.forward_flops(sum(lengths), len(lengths), sum(n * n for n in lengths), lora=lora)


def _round_flops(run: _Run, tasks: list[str], epochs: int) -> float:
    """Estimated FLOPs of one boosting round: `epochs` training passes + validation passes, plus scoring
    the booster on the training rows for the next round's residuals."""
    lengths = [n for t in tasks for n in run.data[t].lengths("train", run.base.tokenizer, run.params.max_length)]
    tokens, rows, sq = sum(lengths), len(lengths), sum(n * n for n in lengths)
    train = run.shape.forward_flops(tokens, rows, sq) + run.shape.backward_flops(tokens, rows, sq)
    return epochs * (train + _forward_flops(run, tasks, "val")) + _forward_flops(run, tasks, "train")


def _setup_flops(run: _Run, tasks: list[str]) -> float:
    """Scoring passes boosting needs first: group adapter and base on the training and validation rows."""
    return sum(_forward_flops(run, tasks, s, lora) for s in ("train", "val") for lora in (True, False))


def _averages(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    cols = sorted({c for r in rows.values() for c in r})
    return {c: mean([r[c] for r in rows.values() if c in r]) for c in cols}


AFFINITY_FORMULA = (
    "estimate from the same FLOP model: one forward+backward pass over every training row (gradients at "
    "theta0; the d-dim projection is negligible) + one forward over the validation rows of each subset's "
    "tasks per subset (mode forward; mode linear: a gradient pass over the validation rows instead) + one "
    "forward over all validation rows (base metrics); init=meta adds its all-task fine-tune (meta_epochs "
    "forward+backward passes over every training row)"
)


def _affinity_flops(run: _Run, doc: dict[str, Any]) -> float | None:
    """Analytic FLOPs of Stage 1 for the rows this run trains on (same subsamples: same seed and sizes)."""
    tasks = doc.get("tasks") or []
    if not tasks or any(t not in run.data for t in tasks):
        return None
    sh = run.shape
    # Stage 1 may run on fewer rows per task than training (affinity.max_train / max_val): count only those
    caps = {"train": (doc.get("params") or {}).get("max_train"), "val": (doc.get("params") or {}).get("max_val")}

    def lengths(split: str, names: list[str]) -> list[int]:
        cap = caps.get(split)
        return [
            n
            for t in names
            for n in run.data[t].lengths(split, run.base.tokenizer, run.params.max_length)[: cap or None]
        ]

    def fwd(split: str, names: list[str]) -> float:
        ls = lengths(split, names)
        return sh.forward_flops(sum(ls), len(ls), sum(n * n for n in ls))

    def train_pass(split: str) -> float:
        ls = lengths(split, tasks)
        tokens, rows, sq = sum(ls), len(ls), sum(n * n for n in ls)
        return sh.forward_flops(tokens, rows, sq) + sh.backward_flops(tokens, rows, sq)

    total = train_pass("train") + fwd("val", list(tasks))
    if doc.get("init") == "meta":
        total += int((doc.get("theta0") or {}).get("epochs", 1)) * train_pass("train")
    if doc.get("mode", "forward") == "linear":
        return total + train_pass("val")
    for subset in doc.get("subsets") or []:
        names = [t for t in subset if t in run.data] if isinstance(subset, list) else []
        total += fwd("val", names) if names else 0.0
    return total


def _stage_flops(stage_costs: dict[str, Any] | None, name: str) -> float | None:
    entry = (stage_costs or {}).get(name) or {}
    for key in ("total_flops", "flops"):
        if isinstance(entry.get(key), (int, float)):
            return float(entry[key])
    return None


def _fit_task(
    run: _Run, task: str, group: str, boosters: list[str], group_names: list[str], default: dict[str, float]
) -> dict[str, float]:
    """Non-negative weights for one task on its validation split (never the test split)."""
    key = "weight_fit"
    terms: dict[str, torch.Tensor] = {group: run.member_logits(group, task, "val", key)}
    if boosters:
        zbase = run.member_logits(BASE_MEMBER, task, "val", key)
        for b in boosters:
            terms[b] = run.member_logits(b, task, "val", key) - zbase
    if run.params.ensemble.candidates == "all":
        for other in group_names:
            if other != group:
                terms[other] = run.member_logits(other, task, "val", key)
    init = {n: default.get(n, 0.0) for n in terms}
    coef = fit_weights(terms, run.labels(task, "val"), init, l2=run.params.ensemble.l2)
    out = dict(coef)
    if boosters:
        out[BASE_MEMBER] = -sum(coef[b] for b in boosters)
    return out


# ------------------------------------------------------------------------------------ the pipeline


def _stage1() -> tuple[Callable[..., dict[str, Any]], Callable[..., dict[str, Any]]]:
    for module in ("shared.ml.affinity", "shared.ml.affinity.stage", "shared.ml.affinity.stages"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        if hasattr(mod, "run_affinity") and hasattr(mod, "run_grouping"):
            return mod.run_affinity, mod.run_grouping
    raise RuntimeError("Stage 1 (run_affinity / run_grouping in shared.ml.affinity) is not available")


def _summary_path(workdir: Path, stage: str) -> Path:
    return workdir / "stages" / f"{stage}.json"


def _measured(stage: str, fn: Callable[[], dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """Run a stage, record its wall time / peak memory, write stages/<stage>.json last."""
    device = torch.device("cuda") if torch.cuda.is_available() else None
    clock = StageClock(device)
    with clock.stage(stage):
        summary = dict(fn())
    summary.setdefault("artifacts", {})
    summary["stage_cost"] = clock.to_dict()[stage]
    write_json(_summary_path(workdir, stage), summary)
    return summary


def _stage_costs(workdir: Path, inputs: dict[str, Path]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for stage in ("affinity", "grouping"):
        path = _summary_path(workdir, stage)
        if path.exists():
            summary = json.loads(path.read_text())
            entry = dict(summary.get("stage_cost") or {})
            cost = summary.get("cost")
            if isinstance(cost, dict):
                for key in ("total_flops", "flops"):
                    if isinstance(cost.get(key), (int, float)):
                        entry["total_flops"] = cost[key]
            out[stage] = entry
    return out


def pipeline_stages(params: PipelineParams) -> list[tuple[str, StageFn]]:
    """The resumable stages of a pipeline job, in order."""

    def affinity(workdir: Path, inputs: dict[str, Path], progress: Progress) -> dict[str, Any]:
        run_affinity, _ = _stage1()
        return _measured("affinity", lambda: run_affinity(params.affinity_params(), workdir, progress), workdir)

    def grouping(workdir: Path, inputs: dict[str, Path], progress: Progress) -> dict[str, Any]:
        _, run_grouping = _stage1()
        gp = params.grouping_params()
        if "affinity" in inputs and getattr(gp, "affinity", None) is None and "affinity" in type(gp).model_fields:
            gp = gp.model_copy(update={"affinity": str(inputs["affinity"])})
        return _measured("grouping", lambda: run_grouping(gp, workdir, progress), workdir)

    def training(workdir: Path, inputs: dict[str, Path], progress: Progress) -> dict[str, Any]:
        groups_path = Path(inputs.get("groups") or (workdir / "groups.json"))
        if not groups_path.is_absolute():
            groups_path = workdir / groups_path
        groups = read_groups_file(groups_path)
        tp = params.training_params(groups).model_copy(update={"groups_source": str(groups_path)})
        grouping_doc = json.loads(groups_path.read_text())
        fallback = grouping_doc.get("selection") == "validation"
        if fallback:  # no structure in T: train the other arms too and let validation choose
            tp = tp.model_copy(update={"baselines": tp.baselines.model_copy(update={"single": True, "per_task": True})})

        def body() -> dict[str, Any]:
            affinity_path = Path(inputs.get("affinity") or (workdir / "affinity.json"))
            doc = json.loads(affinity_path.read_text()) if affinity_path.is_file() else None
            summary = run_training(tp, workdir, progress, stage_costs=_stage_costs(workdir, inputs), affinity=doc)
            if fallback:
                from shared.ml.training.selection import select_on_validation

                summary["selection"] = select_on_validation(workdir, grouping_doc["structure"]["reason"])
                summary["fingerprint"] = summary["selection"]["fingerprint"]
            _write_pipeline_report(workdir, params)
            summary["artifacts"]["pipeline_report"] = "report.json"
            return summary

        return _measured("training", body, workdir)

    return [("affinity", affinity), ("grouping", grouping), ("training", training)]


def _write_pipeline_report(workdir: Path, params: PipelineParams) -> dict[str, Any]:
    """report.json = train_report's task table + averages + every stage's cost + the groups."""
    train = json.loads((workdir / "train_report.json").read_text())
    groups_file = workdir / "groups.json"
    grouping = json.loads(groups_file.read_text()) if groups_file.exists() else {}
    report = {
        "tasks": train["tasks"],
        "average": train["average"],
        "split": train["split"],
        "validation": train["validation"],
        "cost": train["cost"],
        "groups": train["groups"],
        "grouping": {k: v for k, v in grouping.items() if k != "groups"} if isinstance(grouping, dict) else {},
        "ensemble": train["ensemble"],
        "boosting": train["boosting"],
        "metrics": train["metrics"],
        "selection": train.get("selection"),
        "model": train["model"],
        "params": params.model_dump(mode="json"),
    }
    write_json(workdir / "report.json", report)
    return report


def _stage_done(workdir: Path, stage: str) -> dict[str, Any] | None:
    path = _summary_path(workdir, stage)
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for rel in (summary.get("artifacts") or {}).values():
        if not (workdir / rel).exists():
            return None
    return summary


def check_workdir(params: PipelineParams, workdir: Path) -> None:
    """A workdir is reused only by the same params (resume); anything else is an error."""
    recorded = workdir / "pipeline_params.json"
    if recorded.exists():
        old = json.loads(recorded.read_text())
        new = params.model_dump(mode="json")
        if old != new:
            diffs = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(
                f"{workdir} holds a pipeline run with different parameters ({', '.join(diffs)}); "
                "use another output folder (or remove it) to start a new run"
            )


def run_pipeline(params: PipelineParams, workdir: Path, progress: Progress = silent) -> dict[str, Any]:
    """affinity -> grouping -> training, skipping stages already completed in `workdir`."""
    workdir = Path(workdir)
    check_workdir(params, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workdir / "pipeline_params.json", params.model_dump(mode="json"))
    inputs: dict[str, Path] = {}
    summaries: dict[str, Any] = {}
    rerun = False  # once a stage runs, every later stage runs again (its inputs may have changed)
    for name, fn in pipeline_stages(params):
        summary = None if rerun else _stage_done(workdir, name)
        if summary is None:
            summary = fn(workdir, dict(inputs), progress)
            rerun = True
        else:
            summary = {**summary, "skipped": True}
        for logical, rel in (summary.get("artifacts") or {}).items():
            inputs[logical] = workdir / rel
        summaries[name] = summary
    return {"stages": summaries, "artifacts": {k: str(v.relative_to(workdir)) for k, v in inputs.items()}}
