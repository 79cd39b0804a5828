"""Stage-2 CLI commands: `chorus train` (group adapters -> boosting -> ensemble) and `chorus pipeline`.

Bad input (unknown task or model, malformed groups.json, bad option value) prints an error naming the
wrong thing and exits with status 2 before anything is written. Both commands compute in a hidden
sibling folder `.<OUT>.partial-<kind>` (re-running the same command resumes a pipeline there) and move
the finished files into --out with the report last, so --out never holds a half-written run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from services.cli.common import (
    AffinityMetric,
    Candidates,
    GroupingMethod,
    Init,
    Mode,
    Output,
    Quantization,
    check_model,
    check_out,
    fail,
    groups_option,
    model_default,
    run_into,
    task_list,
    validate,
)
from services.cli.tables import print_report
from shared.ml.progress import ConsoleProgress
from shared.ml.training.params import TrainingParams
from shared.ml.training.pipeline_params import PipelineParams

console = Console()


def _training_options(
    quantization: str,
    epochs: int,
    lr: float,
    batch_size: int,
    eval_batch_size: int,
    rank: int,
    alpha: float | None,
    max_train: int | None,
    max_val: int | None,
    max_test: int | None,
    patience: int | None,
    seed: int,
    max_length: int,
    single: bool,
    per_task: bool,
    boost: bool,
    boost_threshold: float,
    boost_rounds: int,
    eta: float,
    boost_lr: float | None,
    boost_epochs: int | None,
    boost_budget: float | None,
    fit_weights: bool,
    weight_candidates: str,
    name: str,
) -> dict[str, Any]:
    return {
        "quantization": quantization,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size,
        "rank": rank,
        "alpha": alpha,
        "max_train": max_train,
        "max_val": max_val,
        "max_test": max_test,
        "patience": patience,
        "seed": seed,
        "max_length": max_length,
        "baselines": {"single": single, "per_task": per_task},
        "boosting": {
            "enabled": boost,
            "error_threshold": boost_threshold,
            "max_rounds": boost_rounds,
            "eta": eta,
            "lr": boost_lr,
            "epochs": boost_epochs,
            "budget": boost_budget,
        },
        "ensemble": {"fit_weights": fit_weights, "candidates": weight_candidates, "name": name},
    }


# ------------------------------------------------------------------------------------------ commands

# Option defaults come from the params models (the same job over HTTP gets the same values).
_TRAIN = partial(model_default, TrainingParams)
_PIPE = partial(model_default, PipelineParams)

_Q = Annotated[Quantization, typer.Option(help="Base model quantization: nf4 (QLoRA, double-quantized) or none.")]
_EPOCHS = Annotated[int, typer.Option(help="Training epochs per adapter (best epoch by mean val accuracy is kept).")]
_LR = Annotated[float, typer.Option(help="AdamW learning rate.")]
_BS = Annotated[int, typer.Option(help="Training batch size (one task per batch).")]
_EBS = Annotated[int, typer.Option(help="Scoring batch size.")]
_RANK = Annotated[int, typer.Option(help="LoRA rank.")]
_ALPHA = Annotated[float | None, typer.Option(help="LoRA alpha (default 8 * rank).")]
_MAXTR = Annotated[int | None, typer.Option(help="Training examples per task (stratified subsample).")]
_MAXVAL = Annotated[int | None, typer.Option(help="Validation examples per task.")]
_MAXTEST = Annotated[int | None, typer.Option(help="Test examples per task (default: all).")]
_PAT = Annotated[int | None, typer.Option(help="Early stopping: epochs without improvement (0 = off).")]
_SEED = Annotated[int, typer.Option(help="Seed of everything random.")]
_MAXLEN = Annotated[int, typer.Option(help="Max prompt tokens (the context is cut from the left).")]
_SINGLE = Annotated[bool, typer.Option("--single/--no-single", help="Train the single all-task baseline adapter.")]
_PERTASK = Annotated[bool, typer.Option("--per-task/--no-per-task", help="Also train one adapter per task.")]
_BOOST = Annotated[
    bool, typer.Option("--boost/--no-boost", help="Boost groups whose training error is above the threshold.")
]
_BTH = Annotated[float, typer.Option(help="Training error above which a group is boosted.")]
_BR = Annotated[int, typer.Option(help="Maximum boosting rounds per group.")]
_ETA = Annotated[float, typer.Option(help="Boosting step eta.")]
_BLR = Annotated[float | None, typer.Option(help="Learning rate of weak learners.")]
_BEP = Annotated[int | None, typer.Option(help="Epochs of weak learners.")]
_BBUD = Annotated[
    float | None,
    typer.Option(help="Max boosting FLOPs as a fraction of the group adapters' training FLOPs (hardest groups first)."),
]
_FIT = Annotated[
    bool, typer.Option("--fit-weights/--default-weights", help="Fit per-task non-negative weights on validation data.")
]
_CAND = Annotated[Candidates, typer.Option(help="Members a task's fitted weights may use: group or all.")]
_NAME = Annotated[str, typer.Option(help="Ensemble name in ensemble.json.")]
_JSON = Annotated[bool, typer.Option("--json", help="Print the report as JSON instead of tables.")]


def train_command(
    groups: Annotated[Path, typer.Option(help='A groups.json ({"groups": [[task, ...], ...]}).')],
    out: Annotated[Path, typer.Option(help="Output directory: adapters/<name>/, ensemble.json, train_report.json.")],
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny-llama, or a local HF folder.")] = _TRAIN("model"),
    quantization: _Q = _TRAIN("quantization"),
    epochs: _EPOCHS = _TRAIN("epochs"),
    lr: _LR = _TRAIN("lr"),
    batch_size: _BS = _TRAIN("batch_size"),
    eval_batch_size: _EBS = _TRAIN("eval_batch_size"),
    rank: _RANK = _TRAIN("rank"),
    alpha: _ALPHA = _TRAIN("alpha"),
    max_train: _MAXTR = _TRAIN("max_train"),
    max_val: _MAXVAL = _TRAIN("max_val"),
    max_test: _MAXTEST = _TRAIN("max_test"),
    patience: _PAT = _TRAIN("patience"),
    seed: _SEED = _TRAIN("seed"),
    max_length: _MAXLEN = _TRAIN("max_length"),
    single: _SINGLE = _TRAIN("baselines.single"),
    per_task: _PERTASK = _TRAIN("baselines.per_task"),
    boost: _BOOST = _TRAIN("boosting.enabled"),
    boost_threshold: _BTH = _TRAIN("boosting.error_threshold"),
    boost_rounds: _BR = _TRAIN("boosting.max_rounds"),
    eta: _ETA = _TRAIN("boosting.eta"),
    boost_lr: _BLR = _TRAIN("boosting.lr"),
    boost_epochs: _BEP = _TRAIN("boosting.epochs"),
    boost_budget: _BBUD = _TRAIN("boosting.budget"),
    fit_weights: _FIT = _TRAIN("ensemble.fit_weights"),
    weight_candidates: _CAND = _TRAIN("ensemble.candidates"),
    name: _NAME = _TRAIN("ensemble.name"),
    as_json: _JSON = False,
) -> None:
    """Train one adapter per group (+ baselines, boosting), write the ensemble and evaluate it on test."""
    from shared.ml.training.stage import run_training

    out = check_out(out)
    data = _training_options(
        quantization,
        epochs,
        lr,
        batch_size,
        eval_batch_size,
        rank,
        alpha,
        max_train,
        max_val,
        max_test,
        patience,
        seed,
        max_length,
        single,
        per_task,
        boost,
        boost_threshold,
        boost_rounds,
        eta,
        boost_lr,
        boost_epochs,
        boost_budget,
        fit_weights,
        weight_candidates,
        name,
    )
    data.update(model=model, groups=str(groups.expanduser()))
    params = validate(TrainingParams, data)
    check_model(model)
    with ConsoleProgress() as progress:
        run_into(out, "train", "train_report.json", lambda wd: run_training(params, wd, progress), keep_partial=False)
    report = json.loads((out / "train_report.json").read_text())
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    print_report(report)
    console.print(f"wrote {out / 'ensemble.json'} (fingerprint {report['ensemble']['fingerprint'][:12]}...)")


def pipeline_command(
    out: Annotated[
        Path, typer.Option(help="Output directory: ensemble.json, adapters/, report.json, affinity/groups files.")
    ],
    tasks: Annotated[str, typer.Option(help="Comma-separated task names (at least 2).")] = "",
    groups: Annotated[str, typer.Option(help="Number of groups M, or 'auto'.")] = str(_PIPE("groups")),
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny-llama, or a local HF folder.")] = _PIPE("model"),
    quantization: _Q = _PIPE("quantization"),
    epochs: _EPOCHS = _TRAIN("epochs"),
    lr: _LR = _TRAIN("lr"),
    batch_size: _BS = _TRAIN("batch_size"),
    eval_batch_size: _EBS = _TRAIN("eval_batch_size"),
    rank: _RANK = _TRAIN("rank"),
    alpha: _ALPHA = _TRAIN("alpha"),
    max_train: _MAXTR = _PIPE("max_train"),
    max_val: _MAXVAL = _PIPE("max_val"),
    max_test: _MAXTEST = _PIPE("max_test"),
    patience: _PAT = _TRAIN("patience"),
    seed: _SEED = _PIPE("seed"),
    max_length: _MAXLEN = _PIPE("max_length"),
    single: _SINGLE = _TRAIN("baselines.single"),
    per_task: _PERTASK = _TRAIN("baselines.per_task"),
    boost: _BOOST = _TRAIN("boosting.enabled"),
    boost_threshold: _BTH = _TRAIN("boosting.error_threshold"),
    boost_rounds: _BR = _TRAIN("boosting.max_rounds"),
    eta: _ETA = _TRAIN("boosting.eta"),
    boost_lr: _BLR = _TRAIN("boosting.lr"),
    boost_epochs: _BEP = _TRAIN("boosting.epochs"),
    boost_budget: _BBUD = _TRAIN("boosting.budget"),
    fit_weights: _FIT = _TRAIN("ensemble.fit_weights"),
    weight_candidates: _CAND = _TRAIN("ensemble.candidates"),
    name: _NAME = _TRAIN("ensemble.name"),
    dim: Annotated[int | None, typer.Option(help="Stage 1: projection dimension d.")] = None,
    lam: Annotated[float | None, typer.Option(help="Stage 1: L2 penalty of the logistic regressions.")] = None,
    subset_size: Annotated[int | None, typer.Option(help="Stage 1: tasks per sampled subset.")] = None,
    coverage: Annotated[int | None, typer.Option(help="Stage 1: min co-occurrences of every task pair.")] = None,
    mode: Annotated[Mode | None, typer.Option(help="Stage 1: forward or linear estimation.")] = None,
    metric: Annotated[AffinityMetric | None, typer.Option(help="Stage 1: accuracy, neg_loss or macro_f1.")] = None,
    output: Annotated[Output | None, typer.Option(help="Stage 1: differentiated f, vocab or choice.")] = None,
    init: Annotated[
        Init | None, typer.Option(help="Stage 1: theta0, base or meta (LoRA first fine-tuned on all tasks).")
    ] = None,
    method: Annotated[GroupingMethod | None, typer.Option(help="Grouping: auto, sdp or spectral.")] = None,
    as_json: _JSON = False,
) -> None:
    """affinity -> grouping -> group adapters -> boosting -> ensemble -> evaluation, into --out."""
    out = check_out(out)
    tasks_ = task_list(tasks)
    training = _training_options(
        quantization,
        epochs,
        lr,
        batch_size,
        eval_batch_size,
        rank,
        alpha,
        max_train,
        max_val,
        max_test,
        patience,
        seed,
        max_length,
        single,
        per_task,
        boost,
        boost_threshold,
        boost_rounds,
        eta,
        boost_lr,
        boost_epochs,
        boost_budget,
        fit_weights,
        weight_candidates,
        name,
    )
    stage1 = _Stage1Options(dim, lam, subset_size, coverage, mode, metric, output, init, method)
    params = _pipeline_params(model, tasks_, groups, training, stage1)
    check_model(model)
    _run_pipeline(out, params, as_json)


@dataclass(frozen=True)
class _Stage1Options:
    """The pipeline's affinity and grouping options; None: the params model's default."""

    dim: int | None
    lam: float | None
    subset_size: int | None
    coverage: int | None
    mode: Mode | None
    metric: AffinityMetric | None
    output: Output | None
    init: Init | None
    method: GroupingMethod | None

    def affinity(self) -> dict[str, Any]:
        """The `affinity` section: the options that were set."""
        return {
            k: v
            for k, v in dict(
                dim=self.dim,
                lam=self.lam,
                subset_size=self.subset_size,
                coverage=self.coverage,
                mode=self.mode,
                metric=self.metric,
                output=self.output,
                init=self.init,
            ).items()
            if v is not None
        }

    def grouping(self) -> dict[str, Any]:
        """The `grouping` section: the options that were set."""
        return {k: v for k, v in dict(method=self.method, metric=self.metric).items() if v is not None}


def _pipeline_params(
    model: str, tasks: list[str], groups: str, training: dict[str, Any], stage1: _Stage1Options
) -> PipelineParams:
    """PipelineParams from the options (exits with status 2 on a bad value); the options shared by all
    stages move from `training` to the top level."""
    shared = {k: training.pop(k) for k in ("quantization", "seed", "max_train", "max_val", "max_test", "max_length")}
    for key in ("alpha",):
        if training[key] is None:
            training.pop(key)
    affinity = stage1.affinity()
    grouping = stage1.grouping()
    return validate(
        PipelineParams,
        dict(
            model=model,
            tasks=tasks,
            groups=groups_option(groups),
            **shared,
            affinity=affinity,
            grouping=grouping,
            training=training,
        ),
    )


def _run_pipeline(out: Path, params: PipelineParams, as_json: bool) -> None:
    """Run (or resume) the pipeline in its hidden work folder, publish it into `out` and print the report."""
    from shared.ml.training.stage import check_workdir, run_pipeline

    workdir = out.parent / f".{out.name}.partial-pipeline"
    try:
        check_workdir(params, workdir)
    except ValueError as exc:
        fail(f"{exc} (or delete {workdir})")
    with ConsoleProgress() as progress:
        run_into(out, "pipeline", "report.json", lambda wd: run_pipeline(params, wd, progress), keep_partial=True)
    report = json.loads((out / "report.json").read_text())
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    print_report(report)
    console.print(f"wrote {out / 'report.json'} and {out / 'ensemble.json'}")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("pipeline")(pipeline_command)
