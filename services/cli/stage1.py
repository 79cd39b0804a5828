"""Stage-1 CLI commands: affinity, group, approx-error, validate-estimates, validate-affinity.

Bad input (unknown task, bad option value, malformed affinity.json, more groups than tasks) prints an
error naming the wrong thing and exits with status 2 before anything is written. `affinity` computes in a
hidden sibling folder `.<OUT>.partial-affinity` (re-running the same command resumes it) and moves the
finished files into --out with affinity.json last, so --out never holds a half-written run.
"""

from __future__ import annotations

import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from services.cli.common import (
    AffinityMetric,
    Backmap,
    Device,
    GroupingMethod,
    Init,
    LamScale,
    Mode,
    Output,
    Precision,
    Quantization,
    check_out,
    fail,
    floats,
    groups_option,
    joined,
    model_default,
    run_into,
    task_list,
    validate,
)
from services.cli.tables import (
    print_affinity,
    print_approx_error,
    print_groups,
    print_validate,
    print_validate_affinity,
)
from shared.ml.affinity.params import (
    AffinityParams,
    ApproxErrorParams,
    GroupingParams,
    ValidateAffinityMetric,
    ValidateAffinityParams,
    ValidateParams,
)
from shared.ml.progress import ConsoleProgress

console = Console()


# ------------------------------------------------------------------------------------------ commands


# Option defaults come from the params models (the same job over HTTP gets the same values).
_AFF = partial(model_default, AffinityParams)
_GROUP = partial(model_default, GroupingParams)
_APPROX = partial(model_default, ApproxErrorParams)
_VAL = partial(model_default, ValidateParams)
_VA = partial(model_default, ValidateAffinityParams)

# options shared by the commands below
_TASKS = Annotated[str, typer.Option(help="Comma-separated task names (at least 2).")]
_QUANT = Annotated[Quantization, typer.Option(help="Base model weights: none or nf4 (4-bit).")]
_OUTPUT = Annotated[
    Output, typer.Option(help="differentiated f: choice (log-odds over the answer choices) or vocab (full vocabulary).")
]
_MODEL = Annotated[str, typer.Option(help="smollm2-135m, tiny-llama, or a local HF folder.")]
_LAM_SCALE = Annotated[LamScale, typer.Option(help="gradient (penalty = lam * mean ||g~||^2) or absolute.")]
_DEVICE = Annotated[Device, typer.Option(help="Where the model runs (auto: cuda when available).")]
_INIT = Annotated[
    Init, typer.Option(help="theta0: base (fresh LoRA, B = 0) or meta (LoRA first fine-tuned on all the tasks).")
]
_META_EPOCHS = Annotated[int, typer.Option(help="Epochs of the all-task fine-tune of --init meta.")]
_BATCH = Annotated[int | None, typer.Option(help="Rows per gradient-pass batch (default: 16 on a CPU, 512 on a GPU).")]
_BATCH_TOKENS = Annotated[
    int | None,
    typer.Option(
        help="Padded tokens per gradient-pass batch (default: none on a CPU; on a GPU sized from its memory and the model)."
    ),
]
_EVAL_BATCH = Annotated[
    int | None, typer.Option(help="Rows per estimation forward (default: 64 on a CPU, 512 on a GPU).")
]


def affinity_command(
    out: Annotated[
        Path, typer.Option(help="Output directory (affinity.json, affinity.png, per-subset CSV/JSON, ...).")
    ],
    model: _MODEL = _AFF("model"),
    tasks: _TASKS = "",
    max_train: Annotated[int | None, typer.Option(help="Training examples per task (stratified subsample).")] = _AFF(
        "max_train"
    ),
    max_val: Annotated[int | None, typer.Option(help="Validation examples per task.")] = _AFF("max_val"),
    dim: Annotated[int, typer.Option(help="Projection dimension d.")] = _AFF("dim"),
    seed: Annotated[int, typer.Option(help="Seed of LoRA init, subsamples, projection and subset sampling.")] = _AFF(
        "seed"
    ),
    rank: Annotated[int, typer.Option(help="LoRA rank (alpha = 8 * rank).")] = _AFF("rank"),
    lam: Annotated[float, typer.Option(help="L2 penalty lambda of the logistic regression (see --lam-scale).")] = _AFF(
        "lam"
    ),
    lam_scale: _LAM_SCALE = _AFF("lam_scale"),
    output: _OUTPUT = _AFF("output"),
    init: _INIT = _AFF("init"),
    meta_epochs: _META_EPOCHS = _AFF("meta_epochs"),
    subset_size: Annotated[
        int | None, typer.Option(help="Tasks per subset (default 3, or 0.3 n above 10 tasks).")
    ] = _AFF("subset_size"),
    coverage: Annotated[int, typer.Option(help="Every pair co-occurs in at least this many subsets.")] = _AFF(
        "coverage"
    ),
    mode: Annotated[
        Mode, typer.Option(help="forward (real forward at theta0 + Delta) or linear (first-order proxy f0 + g.w).")
    ] = _AFF("mode"),
    backmap: Annotated[
        Backmap, typer.Option(help="sketch (Delta = P w) or representer (Delta = sum_i c_i g_i, P^T Delta = w).")
    ] = _AFF("backmap"),
    metric: Annotated[
        AffinityMetric, typer.Option(help="accuracy, neg_loss or macro_f1 (the 'matrix' of affinity.json).")
    ] = _AFF("metric"),
    batch_size: _BATCH = _AFF("batch_size"),
    batch_tokens: _BATCH_TOKENS = _AFF("batch_tokens"),
    eval_batch_size: _EVAL_BATCH = _AFF("eval_batch_size"),
    max_length: Annotated[int, typer.Option(help="Max prompt tokens.")] = _AFF("max_length"),
    quantization: _QUANT = _AFF("quantization"),
    device: _DEVICE = _AFF("device"),
) -> None:
    """Estimate the task-affinity matrix (no fine-tuning): DIR/affinity.json and DIR/affinity.png."""
    from shared.ml.affinity.stage import run_affinity

    params = validate(
        AffinityParams,
        drop_none=True,
        data=dict(
            model=model,
            tasks=task_list(tasks),
            max_train=max_train,
            max_val=max_val,
            dim=dim,
            seed=seed,
            rank=rank,
            lam=lam,
            lam_scale=lam_scale,
            output=output,
            init=init,
            meta_epochs=meta_epochs,
            subset_size=subset_size,
            coverage=coverage,
            mode=mode,
            backmap=backmap,
            metric=metric,
            batch_size=batch_size,
            batch_tokens=batch_tokens,
            eval_batch_size=eval_batch_size,
            max_length=max_length,
            quantization=quantization,
            device=device,
        ),
    )
    with ConsoleProgress() as progress:
        summary = run_into(out, "affinity", "affinity.json", lambda wd: run_affinity(params, wd, progress))
    print_affinity(summary)
    console.print(f"wrote {out / 'affinity.json'}")


def group_command(
    affinity: Annotated[Path, typer.Option(help="Path of an affinity.json.")],
    groups: Annotated[str, typer.Option(help="Number of groups M, or 'auto'.")] = str(_GROUP("groups")),
    out: Annotated[Path | None, typer.Option(help="Output directory (default: the affinity file's folder).")] = None,
    method: Annotated[GroupingMethod, typer.Option(help="auto (SDP, spectral fallback), sdp or spectral.")] = _GROUP(
        "method"
    ),
    metric: Annotated[
        AffinityMetric | None, typer.Option(help="Use another matrix of the file: accuracy, neg_loss, macro_f1.")
    ] = _GROUP("metric"),
    seed: Annotated[int, typer.Option(help="Seed of the k-means rounding / spectral clustering.")] = _GROUP("seed"),
) -> None:
    """Group tasks by affinity: DIR/groups.json = {"groups": [[task, ...], ...], "method": ...}."""
    from shared.ml.affinity.stage import read_affinity, run_grouping
    from shared.ml.progress import silent

    value = groups_option(groups)
    try:
        data = read_affinity(affinity)
    except ValueError as exc:
        fail(f"--affinity: {exc}")
    n = len(data["tasks"])
    if isinstance(value, int) and value > n:
        fail(f"--groups: {value} groups requested but {affinity} has only {n} tasks")
    params = validate(
        GroupingParams,
        drop_none=True,
        data=dict(affinity=str(affinity.resolve()), groups=value, method=method, metric=metric, seed=seed),
    )
    target = (out or affinity.parent).expanduser()
    check_out(target)
    try:
        summary = run_grouping(params, target, silent)
    except ValueError as exc:
        fail(str(exc))
    print_groups(summary)
    console.print(f"wrote {target / 'groups.json'}")


def approx_error_command(
    model: _MODEL = _APPROX("model"),
    tasks: _TASKS = "",
    scales: Annotated[str, typer.Option(help="Comma-separated relative norms ||Delta|| / ||A0||.")] = joined(
        _APPROX("scales")
    ),
    max_train: Annotated[int | None, typer.Option(help="Training examples per task (for the directions).")] = _APPROX(
        "max_train"
    ),
    max_val: Annotated[int | None, typer.Option(help="Held-out (validation) examples per task.")] = _APPROX("max_val"),
    dim: Annotated[int, typer.Option(help="Projection dimension d.")] = _APPROX("dim"),
    seed: Annotated[int, typer.Option(help="Seed of LoRA init, subsamples, projection and subsets.")] = _APPROX("seed"),
    rank: Annotated[int, typer.Option(help="LoRA rank (alpha = 8 * rank).")] = _APPROX("rank"),
    directions: Annotated[int, typer.Option(help="Number of subset solutions used as directions.")] = _APPROX(
        "directions"
    ),
    lam: Annotated[float, typer.Option(help="L2 penalty of the subset regressions (see --lam-scale).")] = _APPROX(
        "lam"
    ),
    lam_scale: _LAM_SCALE = _APPROX("lam_scale"),
    output: _OUTPUT = _APPROX("output"),
    batch_size: _BATCH = _APPROX("batch_size"),
    batch_tokens: _BATCH_TOKENS = _APPROX("batch_tokens"),
    eval_batch_size: _EVAL_BATCH = _APPROX("eval_batch_size"),
    max_length: Annotated[int, typer.Option(help="Max prompt tokens.")] = _APPROX("max_length"),
    quantization: _QUANT = _APPROX("quantization"),
    device: _DEVICE = _APPROX("device"),
    precision: Annotated[
        Precision, typer.Option(help="Model dtype: fp32 (bf16 logits add noise), bf16 or auto.")
    ] = _APPROX("precision"),
    out: Annotated[Path | None, typer.Option(help="Keep approx_error.json/csv here (default: not kept).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-scale summary as JSON.")] = False,
) -> None:
    """First-order approximation error: f0 + g.w vs the true f at theta0 + Delta on held-out examples."""
    from shared.ml.affinity.approx_error import run_approx_error

    params = validate(
        ApproxErrorParams,
        drop_none=True,
        data=dict(
            model=model,
            tasks=task_list(tasks),
            scales=floats(scales, "--scales"),
            max_train=max_train,
            max_val=max_val,
            dim=dim,
            seed=seed,
            rank=rank,
            directions=directions,
            lam=lam,
            lam_scale=lam_scale,
            output=output,
            batch_size=batch_size,
            batch_tokens=batch_tokens,
            eval_batch_size=eval_batch_size,
            max_length=max_length,
            quantization=quantization,
            device=device,
            precision=precision,
        ),
    )
    with ConsoleProgress() as progress:
        if out is not None:
            summary = run_into(out, "approx", "approx_error.json", lambda wd: run_approx_error(params, wd, progress))
        else:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    summary = run_approx_error(params, Path(tmp) / "run", progress)
                except ValueError as exc:
                    fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary["per_scale"], indent=2))
        return
    print_approx_error(summary)


def validate_command(
    model: _MODEL = _VAL("model"),
    tasks: _TASKS = "",
    subsets: Annotated[int, typer.Option(help="Number of sampled subsets K to fine-tune.")] = _VAL("subsets"),
    max_train: Annotated[int | None, typer.Option(help="Training examples per task.")] = _VAL("max_train"),
    max_val: Annotated[int | None, typer.Option(help="Validation examples per task.")] = _VAL("max_val"),
    dim: Annotated[int, typer.Option(help="Projection dimension d.")] = _VAL("dim"),
    seed: Annotated[int, typer.Option(help="Seed of LoRA init, subsamples, projection and subsets.")] = _VAL("seed"),
    rank: Annotated[int, typer.Option(help="LoRA rank (alpha = 8 * rank).")] = _VAL("rank"),
    lam: Annotated[float, typer.Option(help="L2 penalty lambda of the estimate (see --lam-scale).")] = _VAL("lam"),
    lam_scale: _LAM_SCALE = _VAL("lam_scale"),
    output: _OUTPUT = _VAL("output"),
    lams: Annotated[str | None, typer.Option(help="Extra lambdas to report, comma-separated.")] = None,
    outputs: Annotated[
        str | None, typer.Option(help="Extra outputs to report (vocab,choice), comma-separated.")
    ] = None,
    step_scales: Annotated[
        str | None, typer.Option(help="Extra multipliers of the solved step to report, comma-separated.")
    ] = None,
    init: _INIT = _VAL("init"),
    meta_epochs: _META_EPOCHS = _VAL("meta_epochs"),
    subset_size: Annotated[int | None, typer.Option(help="Tasks per subset (1 = single-task fine-tunes).")] = _VAL(
        "subset_size"
    ),
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = _VAL("epochs"),
    lr: Annotated[float, typer.Option(help="Fine-tuning learning rate (AdamW).")] = _VAL("lr"),
    train_batch_size: Annotated[int, typer.Option(help="Fine-tuning batch size.")] = _VAL("train_batch_size"),
    select: Annotated[Literal["best", "last"], typer.Option(help="best (lowest mean val loss epoch) or last.")] = _VAL(
        "select"
    ),
    backmap: Annotated[Backmap, typer.Option(help="Back-map of the timed estimate: sketch or representer.")] = _VAL(
        "backmap"
    ),
    compare_backmaps: Annotated[bool, typer.Option(help="Also report the other back-map (untimed).")] = _VAL(
        "compare_backmaps"
    ),
    batch_size: _BATCH = _VAL("batch_size"),
    batch_tokens: _BATCH_TOKENS = _VAL("batch_tokens"),
    eval_batch_size: _EVAL_BATCH = _VAL("eval_batch_size"),
    max_length: Annotated[int, typer.Option(help="Max prompt tokens.")] = _VAL("max_length"),
    quantization: _QUANT = _VAL("quantization"),
    device: _DEVICE = _VAL("device"),
    out: Annotated[Path | None, typer.Option(help="Keep validate.json/csv here (default: not kept).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Estimated vs really fine-tuned validation loss/accuracy on K subsets, and the compute ratio."""
    from shared.ml.affinity.validate import run_validate_estimates

    params = validate(
        ValidateParams,
        drop_none=True,
        data=dict(
            model=model,
            tasks=task_list(tasks),
            subsets=subsets,
            max_train=max_train,
            max_val=max_val,
            dim=dim,
            seed=seed,
            rank=rank,
            lam=lam,
            lam_scale=lam_scale,
            output=output,
            lams=floats(lams, "--lams") if lams else None,
            subset_size=subset_size,
            epochs=epochs,
            lr=lr,
            outputs=[o.strip() for o in outputs.split(",") if o.strip()] if outputs else None,
            step_scales=floats(step_scales, "--step-scales") if step_scales else None,
            init=init,
            meta_epochs=meta_epochs,
            train_batch_size=train_batch_size,
            select=select,
            backmap=backmap,
            compare_backmaps=compare_backmaps,
            batch_size=batch_size,
            batch_tokens=batch_tokens,
            eval_batch_size=eval_batch_size,
            max_length=max_length,
            quantization=quantization,
            device=device,
        ),
    )
    with ConsoleProgress() as progress:
        if out is not None:
            summary = run_into(
                out, "validate", "validate.json", lambda wd: run_validate_estimates(params, wd, progress)
            )
        else:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    summary = run_validate_estimates(params, Path(tmp) / "run", progress)
                except ValueError as exc:
                    fail(str(exc))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "artifacts"}, indent=2))
        return
    print_validate(summary, params.lam)


def seeds_option(text: str) -> list[int]:
    """--seeds: comma-separated seeds ("0,1", "3,"), or a count S meaning seeds 0..S-1 ("2")."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts if p]
    except ValueError:
        fail(f"--seeds: expected a number of seeds or comma-separated seeds, got {text!r}")
    if not values:
        fail("--seeds: give a number of seeds or comma-separated seeds")
    if "," not in text:
        if values[0] < 1:
            fail(f"--seeds: a number of seeds must be >= 1, got {values[0]}")
        return list(range(values[0]))
    if len(set(values)) != len(values) or min(values) < 0:
        fail(f"--seeds: seeds must be distinct non-negative integers, got {values}")
    return values


def validate_affinity_command(
    out: Annotated[
        Path, typer.Option(help="Output directory (validate_affinity.json/.csv, seed-<s>/ with Stage 1's files).")
    ],
    model: _MODEL = _VA("model"),
    tasks: _TASKS = "",
    seeds: Annotated[str, typer.Option(help="Seeds: comma-separated (0,1) or a count S meaning 0..S-1.")] = joined(
        _VA("seeds")
    ),
    max_train: Annotated[int | None, typer.Option(help="Training examples per task (both sides).")] = _VA("max_train"),
    max_val: Annotated[int | None, typer.Option(help="Validation examples per task (both sides).")] = _VA("max_val"),
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs of the true subsets (Stage-2 trainer).")] = _VA(
        "epochs"
    ),
    lr: Annotated[float, typer.Option(help="Fine-tuning learning rate.")] = _VA("lr"),
    batch_size: Annotated[int, typer.Option(help="Fine-tuning batch size.")] = _VA("batch_size"),
    subset_size: Annotated[
        int | None, typer.Option(help="Tasks per subset (default 3, or 0.3 n above 10 tasks).")
    ] = _VA("subset_size"),
    metric: Annotated[
        ValidateAffinityMetric,
        typer.Option(help="neg_loss (-choice cross-entropy), accuracy, margin or neg_vocab_loss."),
    ] = _VA("metric"),
    groups: Annotated[str, typer.Option(help="Number of groups M for the ARI, or 'auto' (chosen on T_true).")] = str(
        _VA("groups")
    ),
    dim: Annotated[
        int | None, typer.Option(min=1, max=65536, help=f"Stage 1's projection dimension d (default {_AFF('dim')}).")
    ] = None,
    init: Annotated[Init | None, typer.Option(help=f"Stage 1's theta0: base or meta (default {_AFF('init')}).")] = None,
    max_length: Annotated[int, typer.Option(help="Max prompt tokens.")] = _VA("max_length"),
    quantization: Annotated[
        Quantization, typer.Option(help="Base weights of both sides (Stage 2 trains on nf4).")
    ] = _VA("quantization"),
    device: _DEVICE = _VA("device"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the headline metrics as JSON.")] = False,
) -> None:
    """Stage 1's estimate vs Stage-2 fine-tunes of every subset: within-task order, T matrices, groups."""
    from shared.ml.affinity.validate_affinity import run_validate_affinity

    affinity = {k: v for k, v in (("dim", dim), ("init", init)) if v is not None}
    params = validate(
        ValidateAffinityParams,
        drop_none=True,
        data=dict(
            model=model,
            tasks=task_list(tasks),
            seeds=seeds_option(seeds),
            max_train=max_train,
            max_val=max_val,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            subset_size=subset_size,
            metric=metric,
            groups=groups_option(groups),
            max_length=max_length,
            quantization=quantization,
            device=device,
            affinity=affinity,
        ),
    )
    with ConsoleProgress() as progress:
        summary = run_into(
            out, "validate-affinity", "validate_affinity.json", lambda wd: run_validate_affinity(params, wd, progress)
        )
    keys = (
        "spearman_within_task",
        "pairwise_order_accuracy",
        "change_skill",
        "t_correlation",
        "t_true_reliability",
        "ari",
    )
    if as_json:
        typer.echo(json.dumps({k: summary[k] for k in keys}, indent=2))
        return
    print_validate_affinity(summary, params.metric, params.seeds)
    console.print(f"wrote {out / 'validate_affinity.json'}")


def register(app: typer.Typer) -> None:
    app.command("affinity")(affinity_command)
    app.command("group")(group_command)
    app.command("approx-error")(approx_error_command)
    app.command("validate-estimates")(validate_command)
    app.command("validate-affinity")(validate_affinity_command)
