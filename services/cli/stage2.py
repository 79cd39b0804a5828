"""Stage-2 CLI commands: `chorus train` (group adapters -> boosting -> ensemble) and `chorus pipeline`.

Bad input (unknown task or model, malformed groups.json, bad option value) prints an error naming the
wrong thing and exits with status 2 before anything is written. Both commands compute in a hidden
sibling folder `.<OUT>.partial-<kind>` (re-running the same command resumes a pipeline there) and move
the finished files into --out with the report last, so --out never holds a half-written run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from services.cli.common import (
    AffinityMetric, Candidates, GroupingMethod, Init, Mode, Output, Quantization, check_model, check_out, fail,
    groups_option, run_into, task_list, validate,
)

console = Console()


def _training_options(
    quantization: str, epochs: int, lr: float, batch_size: int, eval_batch_size: int, rank: int, alpha: float | None,
    max_train: int | None, max_val: int | None, max_test: int | None, patience: int, seed: int, max_length: int,
    single: bool, per_task: bool, boost: bool, boost_threshold: float, boost_rounds: int, eta: float,
    boost_lr: float | None, boost_epochs: int | None, boost_budget: float | None, fit_weights: bool,
    weight_candidates: str, name: str,
) -> dict[str, Any]:
    return {
        "quantization": quantization, "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "eval_batch_size": eval_batch_size, "rank": rank, "alpha": alpha, "max_train": max_train, "max_val": max_val,
        "max_test": max_test, "patience": patience, "seed": seed, "max_length": max_length,
        "baselines": {"single": single, "per_task": per_task},
        "boosting": {"enabled": boost, "error_threshold": boost_threshold, "max_rounds": boost_rounds, "eta": eta,
                     "lr": boost_lr, "epochs": boost_epochs, "budget": boost_budget},
        "ensemble": {"fit_weights": fit_weights, "candidates": weight_candidates, "name": name},
    }


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _flops(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def print_report(report: dict[str, Any], title: str) -> None:
    """The per-task accuracy table (test split) and the cost lines."""
    columns = [c for c in ("zero_shot", "single", "per_task", "ensemble_no_boost", "ensemble")
               if any(c in row for row in report["tasks"].values())]
    group_of = {t: g["name"] for g in report.get("groups", []) for t in g["tasks"]}
    table = Table("task", "group", *columns, title=title)
    for task, row in report["tasks"].items():
        table.add_row(task, group_of.get(task, ""), *(_pct(row.get(c)) for c in columns))
    table.add_row("average", "", *(_pct(report["average"].get(c)) for c in columns), style="bold")
    console.print(table)
    cost = report.get("cost", {})
    single = cost.get("single") or {}
    ens = cost.get("ensemble_training") or {}
    lines = Table("cost", "value", title="cost")
    lines.add_row("single adapter: training FLOPs (incl. validation passes)", _flops(single.get("total_flops")))
    lines.add_row("ensemble: group adapters + boosting + weight fit FLOPs", _flops(ens.get("total_flops")))
    ratio = cost.get("ensemble_vs_single_flops")
    lines.add_row("ensemble / single training compute", "-" if ratio is None else f"{ratio:.3f}x")
    if cost.get("ensemble_with_affinity_vs_single_flops") is not None:
        lines.add_row("incl. affinity estimation", f"{cost['ensemble_with_affinity_vs_single_flops']:.3f}x")
    inf = cost.get("inference") or {}
    if inf:
        lines.add_row("inference: members run per example (mean)", f"{inf.get('mean_members_per_example', 0):.2f}")
    lines.add_row("peak memory (MiB, max over stages)", str(_peak_mib(cost)))
    for stage, entry in (cost.get("stages") or {}).items():
        if isinstance(entry, dict) and "wall_seconds" in entry:
            lines.add_row(f"wall time: {stage}", f"{entry['wall_seconds']:.1f} s")
    console.print(lines)
    groups = report.get("groups") or []
    if groups:
        console.print("groups: " + "; ".join(
            f"{g['name']}={','.join(g['tasks'])}" + (f" (+{len(g['boosters'])} boosters)" if g.get("boosters") else "")
            for g in groups))


def _peak_mib(cost: dict[str, Any]) -> int:
    peaks = [e.get("peak_memory_bytes", 0) for e in (cost.get("stages") or {}).values() if isinstance(e, dict)]
    return int(max(peaks, default=0) / 2**20)


# ------------------------------------------------------------------------------------------ commands

_Q = Annotated[Quantization, typer.Option(help="Base model quantization: nf4 (QLoRA, double-quantized) or none.")]
_EPOCHS = Annotated[int, typer.Option(help="Training epochs per adapter (best epoch by mean val accuracy is kept).")]
_LR = Annotated[float, typer.Option(help="AdamW learning rate.")]
_BS = Annotated[int, typer.Option(help="Training batch size (one task per batch).")]
_EBS = Annotated[int, typer.Option(help="Scoring batch size.")]
_RANK = Annotated[int, typer.Option(help="LoRA rank.")]
_ALPHA = Annotated[Optional[float], typer.Option(help="LoRA alpha (default 8 * rank).")]
_MAXTR = Annotated[Optional[int], typer.Option(help="Training examples per task (stratified subsample).")]
_MAXVAL = Annotated[Optional[int], typer.Option(help="Validation examples per task.")]
_MAXTEST = Annotated[Optional[int], typer.Option(help="Test examples per task (default: all).")]
_PAT = Annotated[int, typer.Option(help="Early stopping: epochs without improvement (0 = off).")]
_SEED = Annotated[int, typer.Option(help="Seed of everything random.")]
_MAXLEN = Annotated[int, typer.Option(help="Max prompt tokens (the context is cut from the left).")]
_SINGLE = Annotated[bool, typer.Option("--single/--no-single", help="Train the single all-task baseline adapter.")]
_PERTASK = Annotated[bool, typer.Option("--per-task/--no-per-task", help="Also train one adapter per task.")]
_BOOST = Annotated[bool, typer.Option("--boost/--no-boost", help="Boost groups whose training error is above the threshold.")]
_BTH = Annotated[float, typer.Option(help="Training error above which a group is boosted.")]
_BR = Annotated[int, typer.Option(help="Maximum boosting rounds per group.")]
_ETA = Annotated[float, typer.Option(help="Boosting step eta.")]
_BLR = Annotated[Optional[float], typer.Option(help="Learning rate of weak learners.")]
_BEP = Annotated[Optional[int], typer.Option(help="Epochs of weak learners.")]
_BBUD = Annotated[Optional[float], typer.Option(
    help="Max boosting FLOPs as a fraction of the group adapters' training FLOPs (hardest groups first).")]
_FIT = Annotated[bool, typer.Option("--fit-weights/--default-weights", help="Fit per-task non-negative weights on validation data.")]
_CAND = Annotated[Candidates, typer.Option(help="Members a task's fitted weights may use: group or all.")]
_NAME = Annotated[str, typer.Option(help="Ensemble name in ensemble.json.")]
_JSON = Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of tables.")]


def train_command(
    groups: Annotated[Path, typer.Option(help="A groups.json ({\"groups\": [[task, ...], ...]}).")],
    out: Annotated[Path, typer.Option(help="Output directory: adapters/<name>/, ensemble.json, train_report.json.")],
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny-llama, or a local HF folder.")] = "smollm2-135m",
    quantization: _Q = "nf4", epochs: _EPOCHS = 3, lr: _LR = 5e-4, batch_size: _BS = 8, eval_batch_size: _EBS = 32,
    rank: _RANK = 4, alpha: _ALPHA = None, max_train: _MAXTR = 500, max_val: _MAXVAL = 200, max_test: _MAXTEST = None,
    patience: _PAT = 2, seed: _SEED = 0, max_length: _MAXLEN = 256, single: _SINGLE = True, per_task: _PERTASK = False,
    boost: _BOOST = True, boost_threshold: _BTH = 0.1, boost_rounds: _BR = 2, eta: _ETA = 1.0, boost_lr: _BLR = 2e-4,
    boost_epochs: _BEP = 1, boost_budget: _BBUD = None, fit_weights: _FIT = False, weight_candidates: _CAND = "group",
    name: _NAME = "chorus",
    as_json: _JSON = False,
) -> None:
    """Train one adapter per group (+ baselines, boosting), write the ensemble and evaluate it on test."""
    from shared.ml.progress import TqdmProgress
    from shared.ml.training.params import TrainingParams
    from shared.ml.training.stage import run_training

    out = check_out(out)
    data = _training_options(quantization, epochs, lr, batch_size, eval_batch_size, rank, alpha, max_train, max_val,
                             max_test, patience, seed, max_length, single, per_task, boost, boost_threshold,
                             boost_rounds, eta, boost_lr, boost_epochs, boost_budget, fit_weights, weight_candidates, name)
    data.update(model=model, groups=str(groups.expanduser()))
    params = validate(TrainingParams, data)
    check_model(model)
    run_into(out, "train", "train_report.json", lambda wd: run_training(params, wd, TqdmProgress()), keep_partial=False)
    report = json.loads((out / "train_report.json").read_text())
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    print_report(report, f"{report['model']['name']} ({params.quantization}): accuracy % on {report['split']}")
    console.print(f"wrote {out / 'ensemble.json'} (fingerprint {report['ensemble']['fingerprint'][:12]}...)")


def pipeline_command(
    out: Annotated[Path, typer.Option(help="Output directory: ensemble.json, adapters/, report.json, affinity/groups files.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated task names (at least 2).")] = "",
    groups: Annotated[str, typer.Option(help="Number of groups M, or 'auto'.")] = "auto",
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny-llama, or a local HF folder.")] = "smollm2-135m",
    quantization: _Q = "nf4", epochs: _EPOCHS = 3, lr: _LR = 5e-4, batch_size: _BS = 8, eval_batch_size: _EBS = 32,
    rank: _RANK = 4, alpha: _ALPHA = None, max_train: _MAXTR = 500, max_val: _MAXVAL = 200, max_test: _MAXTEST = None,
    patience: _PAT = 2, seed: _SEED = 0, max_length: _MAXLEN = 256, single: _SINGLE = True, per_task: _PERTASK = False,
    boost: _BOOST = True, boost_threshold: _BTH = 0.1, boost_rounds: _BR = 2, eta: _ETA = 1.0, boost_lr: _BLR = 2e-4,
    boost_epochs: _BEP = 1, boost_budget: _BBUD = None, fit_weights: _FIT = False, weight_candidates: _CAND = "group",
    name: _NAME = "chorus",
    dim: Annotated[Optional[int], typer.Option(help="Stage 1: projection dimension d.")] = None,
    lam: Annotated[Optional[float], typer.Option(help="Stage 1: L2 penalty of the logistic regressions.")] = None,
    subset_size: Annotated[Optional[int], typer.Option(help="Stage 1: tasks per sampled subset.")] = None,
    coverage: Annotated[Optional[int], typer.Option(help="Stage 1: min co-occurrences of every task pair.")] = None,
    mode: Annotated[Optional[Mode], typer.Option(help="Stage 1: forward or linear estimation.")] = None,
    metric: Annotated[Optional[AffinityMetric], typer.Option(help="Stage 1: accuracy, neg_loss or macro_f1.")] = None,
    output: Annotated[Optional[Output], typer.Option(help="Stage 1: differentiated f, vocab or choice.")] = None,
    init: Annotated[Optional[Init], typer.Option(help="Stage 1: theta0, base or meta (LoRA first fine-tuned on all tasks).")] = None,
    method: Annotated[Optional[GroupingMethod], typer.Option(help="Grouping: auto, sdp or spectral.")] = None,
    as_json: _JSON = False,
) -> None:
    """affinity -> grouping -> group adapters -> boosting -> ensemble -> evaluation, into --out."""
    from shared.ml.progress import TqdmProgress
    from shared.ml.training.params import PipelineParams
    from shared.ml.training.stage import run_pipeline

    out = check_out(out)
    tasks_ = task_list(tasks)
    training = _training_options(quantization, epochs, lr, batch_size, eval_batch_size, rank, alpha, max_train, max_val,
                                 max_test, patience, seed, max_length, single, per_task, boost, boost_threshold,
                                 boost_rounds, eta, boost_lr, boost_epochs, boost_budget, fit_weights, weight_candidates, name)
    shared = {k: training.pop(k) for k in ("quantization", "seed", "max_train", "max_val", "max_test", "max_length")}
    for key in ("alpha",):
        if training[key] is None:
            training.pop(key)
    affinity = {k: v for k, v in dict(dim=dim, lam=lam, subset_size=subset_size, coverage=coverage, mode=mode,
                                      metric=metric, output=output, init=init).items() if v is not None}
    grouping = {k: v for k, v in dict(method=method, metric=metric).items() if v is not None}
    params = validate(PipelineParams, dict(model=model, tasks=tasks_, groups=groups_option(groups), **shared,
                                            affinity=affinity, grouping=grouping, training=training))
    check_model(model)
    from shared.ml.training.stage import check_workdir

    partial = out.parent / f".{out.name}.partial-pipeline"
    try:
        check_workdir(params, partial)
    except ValueError as exc:
        fail(f"{exc} (or delete {partial})")
    run_into(out, "pipeline", "report.json", lambda wd: run_pipeline(params, wd, TqdmProgress()), keep_partial=True)
    report = json.loads((out / "report.json").read_text())
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    print_report(report, f"{report['model']['name']} ({params.quantization}): accuracy % on {report['split']}")
    console.print(f"wrote {out / 'report.json'} and {out / 'ensemble.json'}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("pipeline")(pipeline_command)
