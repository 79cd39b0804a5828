"""Stage-1 CLI commands: affinity, group, approx-error, validate-estimates, validate-affinity.

Bad input (unknown task, bad option value, malformed affinity.json, more groups than tasks) prints an
error naming the wrong thing and exits with status 2 before anything is written. `affinity` computes in a
hidden sibling folder `.<OUT>.partial-affinity` (re-running the same command resumes it) and moves the
finished files into --out with affinity.json last, so --out never holds a half-written run.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table

from services.cli.common import (
    AffinityMetric, Backmap, Device, GroupingMethod, Init, LamScale, Mode, Output, Precision, Quantization, check_out,
    fail, floats, groups_option, run_into, task_list, validate,
)

console = Console()


# ------------------------------------------------------------------------------------------ commands


# options shared by the commands below
_TASKS = Annotated[str, typer.Option(help="Comma-separated task names (at least 2).")]
_QUANT = Annotated[Quantization, typer.Option(help="Base model weights: none or nf4 (4-bit).")]
_OUTPUT = Annotated[Output, typer.Option(help="differentiated f: choice (log-odds over the answer choices) or vocab (full vocabulary).")]
_MODEL = Annotated[str, typer.Option(help="smollm2-135m, tiny-llama, or a local HF folder.")]
_LAM_SCALE = Annotated[LamScale, typer.Option(help="gradient (penalty = lam * mean ||g~||^2) or absolute.")]
_DEVICE = Annotated[Device, typer.Option(help="Where the model runs (auto: cuda when available).")]
_INIT = Annotated[Init, typer.Option(help="theta0: base (fresh LoRA, B = 0) or meta (LoRA first fine-tuned on all the tasks).")]
_META_EPOCHS = Annotated[int, typer.Option(help="Epochs of the all-task fine-tune of --init meta.")]
_BATCH = Annotated[Optional[int], typer.Option(help="Rows per gradient-pass batch (default: 16 on a CPU, 512 on a GPU).")]
_BATCH_TOKENS = Annotated[Optional[int], typer.Option(
    help="Padded tokens per gradient-pass batch (default: none on a CPU; on a GPU sized from its memory and the model).")]
_EVAL_BATCH = Annotated[Optional[int], typer.Option(help="Rows per estimation forward (default: 64 on a CPU, 512 on a GPU).")]


def affinity_command(
    out: Annotated[Path, typer.Option(help="Output directory (affinity.json, affinity.png, per-subset CSV/JSON, ...).")],
    model: _MODEL = "smollm2-135m",
    tasks: _TASKS = "",
    max_train: Annotated[Optional[int], typer.Option(help="Training examples per task (stratified subsample).")] = 500,
    max_val: Annotated[Optional[int], typer.Option(help="Validation examples per task.")] = 200,
    dim: Annotated[int, typer.Option(help="Projection dimension d.")] = 400,
    seed: Annotated[int, typer.Option(help="Seed of LoRA init, subsamples, projection and subset sampling.")] = 0,
    rank: Annotated[int, typer.Option(help="LoRA rank (alpha = 8 * rank).")] = 4,
    lam: Annotated[Optional[float], typer.Option(help="L2 penalty lambda of the logistic regression (see --lam-scale).")] = None,
    lam_scale: _LAM_SCALE = "gradient",
    output: _OUTPUT = "choice",
    init: _INIT = "meta",
    meta_epochs: _META_EPOCHS = 1,
    subset_size: Annotated[Optional[int], typer.Option(help="Tasks per subset (default 3, or 0.3 n above 10 tasks).")] = None,
    coverage: Annotated[int, typer.Option(help="Every pair co-occurs in at least this many subsets.")] = 5,
    mode: Annotated[Mode, typer.Option(help="forward (real forward at theta0 + Delta) or linear (proxy).")] = "forward",
    backmap: Annotated[Backmap, typer.Option(help="sketch (Delta = P w) or representer (Delta = sum_i c_i g_i, P^T Delta = w).")] = "sketch",
    metric: Annotated[AffinityMetric, typer.Option(help="accuracy, neg_loss or macro_f1 (the 'matrix' of affinity.json).")] = "accuracy",
    batch_size: _BATCH = None,
    batch_tokens: _BATCH_TOKENS = None,
    eval_batch_size: _EVAL_BATCH = None,
    max_length: Annotated[int, typer.Option(help="Max prompt tokens.")] = 256,
    quantization: _QUANT = "none",
    device: _DEVICE = "auto",
) -> None:
    """Estimate the task-affinity matrix (no fine-tuning): DIR/affinity.json and DIR/affinity.png."""
    from shared.ml.affinity.params import AffinityParams
    from shared.ml.affinity.stage import run_affinity
    from shared.ml.progress import TqdmProgress

    params = validate(AffinityParams, drop_none=True, data=dict(
        model=model, tasks=task_list(tasks), max_train=max_train, max_val=max_val, dim=dim, seed=seed, rank=rank, lam=lam, lam_scale=lam_scale, output=output,
        init=init, meta_epochs=meta_epochs, subset_size=subset_size, coverage=coverage, mode=mode, backmap=backmap, metric=metric, batch_size=batch_size,
        batch_tokens=batch_tokens, eval_batch_size=eval_batch_size, max_length=max_length, quantization=quantization, device=device))
    summary = run_into(out, "affinity", "affinity.json", lambda wd: run_affinity(params, wd, TqdmProgress()))
    T = summary["matrix"]
    table = Table("i \\ j", *params.tasks, title=f"T[i, j] = estimated {params.metric} of i (mean over subsets with i, j)")
    for name, row in zip(params.tasks, T):
        table.add_row(name, *("-" if v is None else f"{v:.3f}" for v in row))
    console.print(table)
    console.print(f"{summary['subsets']} subsets; wall time {summary['wall_seconds']:.1f} s; wrote {out / 'affinity.json'}")


def group_command(
    affinity: Annotated[Path, typer.Option(help="Path of an affinity.json.")],
    groups: Annotated[str, typer.Option(help="Number of groups M, or 'auto'.")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: the affinity file's folder).")] = None,
    method: Annotated[GroupingMethod, typer.Option(help="auto (SDP, spectral fallback), sdp or spectral.")] = "auto",
    metric: Annotated[Optional[AffinityMetric], typer.Option(help="Use another matrix of the file: accuracy, neg_loss, macro_f1.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the k-means rounding / spectral clustering.")] = 0,
) -> None:
    """Group tasks by affinity: DIR/groups.json = {"groups": [[task, ...], ...], "method": ...}."""
    from shared.ml.affinity.params import GroupingParams
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
    params = validate(GroupingParams, drop_none=True, data=dict(affinity=str(affinity.resolve()), groups=value, method=method, metric=metric, seed=seed))
    target = (out or affinity.parent).expanduser()
    check_out(target)
    try:
        summary = run_grouping(params, target, silent)
    except ValueError as exc:
        fail(str(exc))
    for i, g in enumerate(summary["groups"]):
        console.print(f"group {i + 1}: {', '.join(g)}")
    console.print(f"{summary['m']} groups by {summary['method']}; wrote {target / 'groups.json'}")


def approx_error_command(
    model: _MODEL = "smollm2-135m",
    tasks: _TASKS = "",
    scales: Annotated[str, typer.Option(help="Comma-separated relative norms ||Delta|| / ||A0||.")] = "0.02,0.05,0.1",
    max_train: Annotated[Optional[int], typer.Option(help="Training examples per task (for the directions).")] = 100,
    max_val: Annotated[Optional[int], typer.Option(help="Held-out (validation) examples per task.")] = 50,
    dim: Annotated[int, typer.Option(help="Projection dimension d.")] = 400,
    seed: Annotated[int, typer.Option()] = 0,
    rank: Annotated[int, typer.Option()] = 4,
    directions: Annotated[int, typer.Option(help="Number of subset solutions used as directions.")] = 4,
    lam: Annotated[Optional[float], typer.Option(help="L2 penalty of the subset regressions (see --lam-scale).")] = None,
    lam_scale: _LAM_SCALE = "gradient",
    output: _OUTPUT = "choice",
    batch_size: _BATCH = None,
    batch_tokens: _BATCH_TOKENS = None,
    eval_batch_size: _EVAL_BATCH = None,
    max_length: Annotated[int, typer.Option()] = 256,
    quantization: _QUANT = "none",
    device: _DEVICE = "auto",
    precision: Annotated[Precision, typer.Option(help="Model dtype: fp32 (default: bf16 logits add noise), bf16 or auto.")] = "fp32",
    out: Annotated[Optional[Path], typer.Option(help="Keep approx_error.json/csv here (default: not kept).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the per-scale summary as JSON.")] = False,
) -> None:
    """First-order approximation error: f0 + g.w vs the true f at theta0 + Delta on held-out examples."""
    from shared.ml.affinity.params import ApproxErrorParams
    from shared.ml.affinity.stage import run_approx_error
    from shared.ml.progress import TqdmProgress

    params = validate(ApproxErrorParams, drop_none=True, data=dict(
        model=model, tasks=task_list(tasks), scales=floats(scales, "--scales"), max_train=max_train, max_val=max_val, dim=dim,
        seed=seed, rank=rank, directions=directions, lam=lam, lam_scale=lam_scale, output=output, batch_size=batch_size, batch_tokens=batch_tokens,
        eval_batch_size=eval_batch_size,
        max_length=max_length, quantization=quantization, device=device, precision=precision))
    if out is not None:
        summary = run_into(out, "approx", "approx_error.json", lambda wd: run_approx_error(params, wd, TqdmProgress()))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                summary = run_approx_error(params, Path(tmp) / "run", TqdmProgress())
            except ValueError as exc:
                fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary["per_scale"], indent=2))
        return
    table = Table("scale", "mean rel. error", "median rel. error", "p90", "mean sq. (ref.)", "0th-order mean", "||dW||/||W||",
                  title="first-order approximation error on held-out examples")
    for s in summary["per_scale"]:
        rwc = s.get("relative_weight_change")
        table.add_row(f"{s['scale']:g}", f"{100 * s['mean_rel_error']:.3f}%", f"{100 * s['median_rel_error']:.3f}%",
                      f"{100 * s['p90_rel_error']:.3f}%", f"{100 * s['mean_sq_rel_error']:.4f}%",
                      f"{100 * s['zeroth_order_mean_rel_error']:.3f}%", "-" if rwc is None else f"{rwc:.2e}")
    console.print(table)
    console.print(f"wall time {summary['wall_seconds']:.1f} s")


def validate_command(
    model: _MODEL = "smollm2-135m",
    tasks: _TASKS = "",
    subsets: Annotated[int, typer.Option(help="Number of sampled subsets K to fine-tune.")] = 8,
    max_train: Annotated[Optional[int], typer.Option(help="Training examples per task.")] = 500,
    max_val: Annotated[Optional[int], typer.Option(help="Validation examples per task.")] = 200,
    dim: Annotated[int, typer.Option()] = 400,
    seed: Annotated[int, typer.Option()] = 0,
    rank: Annotated[int, typer.Option()] = 4,
    lam: Annotated[Optional[float], typer.Option(help="L2 penalty lambda of the estimate (see --lam-scale).")] = None,
    lam_scale: _LAM_SCALE = "gradient",
    output: _OUTPUT = "choice",
    lams: Annotated[Optional[str], typer.Option(help="Extra lambdas to report, comma-separated.")] = None,
    outputs: Annotated[Optional[str], typer.Option(help="Extra outputs to report (vocab,choice), comma-separated.")] = None,
    step_scales: Annotated[Optional[str], typer.Option(help="Extra multipliers of the solved step to report, comma-separated.")] = None,
    init: _INIT = "meta",
    meta_epochs: _META_EPOCHS = 1,
    subset_size: Annotated[Optional[int], typer.Option()] = None,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 5,
    lr: Annotated[float, typer.Option(help="Fine-tuning learning rate (AdamW).")] = 5e-4,
    train_batch_size: Annotated[int, typer.Option()] = 8,
    select: Annotated[Literal["best", "last"], typer.Option(help="best (lowest mean val loss epoch) or last.")] = "best",
    backmap: Annotated[Backmap, typer.Option(help="Back-map of the timed estimate: sketch or representer.")] = "sketch",
    compare_backmaps: Annotated[bool, typer.Option(help="Also report the other back-map (untimed).")] = True,
    batch_size: _BATCH = None,
    batch_tokens: _BATCH_TOKENS = None,
    eval_batch_size: _EVAL_BATCH = None,
    max_length: Annotated[int, typer.Option()] = 256,
    quantization: _QUANT = "none",
    device: _DEVICE = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Keep validate.json/csv here (default: not kept).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Estimated vs really fine-tuned validation loss/accuracy on K subsets, and the compute ratio."""
    from shared.ml.affinity.params import ValidateParams
    from shared.ml.affinity.stage import run_validate_estimates
    from shared.ml.progress import TqdmProgress

    params = validate(ValidateParams, drop_none=True, data=dict(
        model=model, tasks=task_list(tasks), subsets=subsets, max_train=max_train, max_val=max_val, dim=dim, seed=seed, rank=rank,
        lam=lam, lam_scale=lam_scale, output=output, lams=floats(lams, "--lams") if lams else None, subset_size=subset_size, epochs=epochs, lr=lr,
        outputs=[o.strip() for o in outputs.split(",") if o.strip()] if outputs else None,
        step_scales=floats(step_scales, "--step-scales") if step_scales else None,
        init=init, meta_epochs=meta_epochs, train_batch_size=train_batch_size, select=select, backmap=backmap, compare_backmaps=compare_backmaps,
        batch_size=batch_size, batch_tokens=batch_tokens, eval_batch_size=eval_batch_size,
        max_length=max_length, quantization=quantization, device=device))
    if out is not None:
        summary = run_into(out, "validate", "validate.json", lambda wd: run_validate_estimates(params, wd, TqdmProgress()))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                summary = run_validate_estimates(params, Path(tmp) / "run", TqdmProgress())
            except ValueError as exc:
                fail(str(exc))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in summary.items() if k != "artifacts"}, indent=2))
        return

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.2f}%"

    table = Table("subset", "task", "est. loss", "true loss", "rel. err", "est. acc", "true acc", "rel. err", "ep",
                  title=f"estimated vs fine-tuned (validation), lambda={params.lam:g}")
    for r in summary["rows"]:
        table.add_row(r["tasks"], r["task"], f"{r['est_loss']:.4f}", f"{r['true_loss']:.4f}", pct(r["rel_err_loss"]),
                      f"{r['est_accuracy']:.3f}", f"{r['true_accuracy']:.3f}", pct(r["rel_err_accuracy"]), str(r["ft_epoch"]))
    console.print(table)
    console.print(f"mean relative error: loss {pct(summary['mean_rel_err_loss'])}, accuracy {pct(summary['mean_rel_err_accuracy'])}")
    for v in summary["per_variant"]:
        console.print(f"  {v['output']:<6s} {v['backmap']:<11s} lambda={v['lam']:g} step x{v['step']:g}: rel. error loss "
                      f"{pct(v['mean_rel_err_loss'])}, accuracy {pct(v['mean_rel_err_accuracy'])} "
                      f"(mean est. acc {v['mean_est_accuracy']:.3f}, true {v['mean_true_accuracy']:.3f})")
    lin = summary["linear_proxy"]
    console.print(f"  linear proxy (f0 + g.w > 0 on validation rows): accuracy rel. error {pct(lin['mean_rel_err_accuracy'])} "
                  f"(mean est. acc {lin['mean_est_accuracy']:.3f}); compute ratio {lin['compute_ratio']:.1f}x, "
                  f"amortised {lin['compute_ratio_amortised']:.1f}x")
    th = summary["theta0"]
    console.print(f"theta0 = {th.get('init', 'base')}"
                  + (f" ({th['epochs']} epoch(s) on all tasks, {th['seconds']:.1f} s)" if th.get("init") == "meta" else "")
                  + "; its validation accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in th["val_accuracy"].items()))
    if th.get("no_change_rel_err_accuracy") is not None:
        r = th.get("change_correlation")
        console.print(f"  theta0's own accuracy as the estimate: rel. error {pct(th['no_change_rel_err_accuracy'])}; "
                      f"correlation of estimated and true change from theta0: {'-' if r is None else f'{r:.2f}'}")
    ratio = summary["compute_ratio"]
    amort = summary["compute_ratio_amortised"]
    console.print(f"compute ratio (fine-tune {summary['finetune_seconds']:.1f} s / estimation {summary['estimation_seconds']:.1f} s): "
                  f"{ratio:.1f}x; amortised over a full affinity run: {amort:.1f}x"
                  + (f"; counting the meta-initialisation: {summary['compute_ratio_with_init']:.1f}x "
                     f"({summary['compute_ratio_amortised_with_init']:.1f}x amortised)" if th.get("init") == "meta" else ""))


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
    out: Annotated[Path, typer.Option(help="Output directory (validate_affinity.json/.csv, seed-<s>/ with Stage 1's files).")],
    model: _MODEL = "smollm2-135m",
    tasks: _TASKS = "",
    seeds: Annotated[str, typer.Option(help="Seeds: comma-separated (0,1) or a count S meaning 0..S-1.")] = "0,1",
    max_train: Annotated[Optional[int], typer.Option(help="Training examples per task (both sides).")] = 500,
    max_val: Annotated[Optional[int], typer.Option(help="Validation examples per task (both sides).")] = 1000,
    epochs: Annotated[int, typer.Option(help="Fine-tuning epochs of the true subsets (Stage-2 trainer).")] = 3,
    lr: Annotated[float, typer.Option(help="Fine-tuning learning rate.")] = 5e-4,
    batch_size: Annotated[int, typer.Option(help="Fine-tuning batch size.")] = 8,
    subset_size: Annotated[Optional[int], typer.Option(help="Tasks per subset (default 3, or 0.3 n above 10 tasks).")] = None,
    metric: Annotated[str, typer.Option(help="neg_loss (-choice cross-entropy), accuracy, margin or neg_vocab_loss.")] = "neg_loss",
    groups: Annotated[str, typer.Option(help="Number of groups M for the ARI, or 'auto' (chosen on T_true).")] = "auto",
    dim: Annotated[Optional[int], typer.Option(min=1, max=65536, help="Stage 1's projection dimension d (default 400).")] = None,
    init: Annotated[Optional[str], typer.Option(help="Stage 1's theta0: base or meta (default meta).")] = None,
    max_length: Annotated[int, typer.Option(help="Max prompt tokens.")] = 256,
    quantization: Annotated[str, typer.Option(help="none or nf4 (both sides; Stage 2 trains on nf4).")] = "nf4",
    device: _DEVICE = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the headline metrics as JSON.")] = False,
) -> None:
    """Stage 1's estimate vs Stage-2 fine-tunes of every subset: within-task order, T matrices, groups."""
    from shared.ml.affinity.params import ValidateAffinityParams
    from shared.ml.affinity.validate_affinity import run_validate_affinity
    from shared.ml.progress import TqdmProgress

    if init is not None and init not in ("base", "meta"):
        fail(f"--init: expected base or meta, got {init!r}")
    affinity = {k: v for k, v in (("dim", dim), ("init", init)) if v is not None}
    params = validate(ValidateAffinityParams, drop_none=True, data=dict(
        model=model, tasks=task_list(tasks), seeds=seeds_option(seeds), max_train=max_train, max_val=max_val, epochs=epochs,
        lr=lr, batch_size=batch_size, subset_size=subset_size, metric=metric, groups=groups_option(groups),
        max_length=max_length, quantization=quantization, device=device, affinity=affinity))
    summary = run_into(out, "validate-affinity", "validate_affinity.json",
                       lambda wd: run_validate_affinity(params, wd, TqdmProgress()))
    keys = ("spearman_within_task", "pairwise_order_accuracy", "change_skill", "t_correlation", "t_true_reliability", "ari")
    if as_json:
        typer.echo(json.dumps({k: summary[k] for k in keys}, indent=2))
        return

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    sp, tc, ari = summary["spearman_within_task"], summary["t_correlation"], summary["ari"]
    table = Table("metric", "value", "reference", title=f"Stage 1 vs fine-tuned subsets ({params.metric}, seeds {params.seeds})")
    table.add_row("within-task Spearman", num(sp["value"]), f"95% CI [{num(sp['ci95'][0])}, {num(sp['ci95'][1])}]")
    table.add_row("pairwise order accuracy", num(summary["pairwise_order_accuracy"]), "pairs beyond 2x seed noise")
    table.add_row("change skill", num(summary["change_skill"]), "vs theta0 (0 = no-change predictor)")
    table.add_row("T correlation", num(tc["value"]), f"Mantel p {num(tc['p'])}; ceiling {num(summary['t_true_reliability'])}")
    table.add_row("ARI (groups)", num(ari["est_vs_true"]), f"random p95 {num(ari['random_p95'])}")
    console.print(table)
    c = summary["costs"]
    console.print(f"{summary['subsets']} subsets; Stage 1 {c['stage1_wall_seconds']:.1f} s, fine-tunes {c['finetune_wall_seconds']:.1f} s "
                  f"(FLOP ratio {num(c['flop_ratio'])}); wrote {out / 'validate_affinity.json'}")


def register(app: typer.Typer) -> None:
    app.command("affinity")(affinity_command)
    app.command("group")(group_command)
    app.command("approx-error")(approx_error_command)
    app.command("validate-estimates")(validate_command)
    app.command("validate-affinity")(validate_affinity_command)
