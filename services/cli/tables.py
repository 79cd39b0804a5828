"""The tables the CLI prints for a finished run, the same whether it ran offline (`chorus pipeline`, `chorus
affinity`, ...) or as a job (`chorus results JOB`): each takes the stage's summary or report as written."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
# The accuracy columns of a training report, in this order when present.
ACCURACY_COLUMNS = ("zero_shot", "single", "per_task", "ensemble_no_boost", "ensemble")


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _flops(v: Any) -> str:
    return "-" if v is None else f"{v:.3g}"


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def _rel(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def report_title(report: dict[str, Any]) -> str:
    model = report.get("model") or {}
    return f"{model.get('name', '?')} ({model.get('quantization', '?')}): accuracy % on {report.get('split', 'test')}"


def print_report(report: dict[str, Any], title: str | None = None) -> None:
    """A training or pipeline report: the per-task accuracy table (test split) and the cost lines."""
    columns = [c for c in ACCURACY_COLUMNS if any(c in row for row in report["tasks"].values())]
    group_of = {t: g["name"] for g in report.get("groups", []) for t in g["tasks"]}
    table = Table("task", "group", *columns, title=title or report_title(report))
    for task, row in report["tasks"].items():
        table.add_row(escape(task), group_of.get(task, ""), *(_pct(row.get(c)) for c in columns))
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
        console.print(
            "groups: "
            + "; ".join(
                f"{g['name']}={','.join(g['tasks'])}"
                + (f" (+{len(g['boosters'])} boosters)" if g.get("boosters") else "")
                for g in groups
            ),
            highlight=False,
            markup=False,
        )
    selection = report.get("selection")
    if isinstance(selection, dict) and selection.get("chosen"):
        console.print(
            f"deployed: {selection['chosen']} (chosen on validation: {selection.get('reason', '')})",
            highlight=False,
            markup=False,
        )


def _peak_mib(cost: dict[str, Any]) -> int:
    peaks = [e.get("peak_memory_bytes", 0) for e in (cost.get("stages") or {}).values() if isinstance(e, dict)]
    return int(max(peaks, default=0) / 2**20)


def print_metrics_table(tasks: dict[str, dict[str, float]], title: str) -> None:
    """An evaluation report: accuracy, macro-F1 and loss per task."""
    table = Table("task", "n", "accuracy", "macro-F1", "loss", title=title)
    for name, m in tasks.items():
        table.add_row(
            escape(name), str(m["n"]), f"{100 * m['accuracy']:.1f}", f"{100 * m['macro_f1']:.1f}", f"{m['loss']:.3f}"
        )
    n = len(tasks)
    table.add_row(
        "average",
        "",
        f"{100 * sum(m['accuracy'] for m in tasks.values()) / n:.1f}",
        f"{100 * sum(m['macro_f1'] for m in tasks.values()) / n:.1f}",
        f"{sum(m['loss'] for m in tasks.values()) / n:.3f}",
        style="bold",
    )
    console.print(table)


def print_affinity(summary: dict[str, Any]) -> None:
    """An affinity summary: the matrix T and how it was made."""
    tasks = summary["tasks"]
    table = Table(
        "i \\ j", *tasks, title=escape(f"T[i, j] = estimated {summary['metric']} of i (mean over subsets with i, j)")
    )
    for name, row in zip(tasks, summary["matrix"], strict=True):
        table.add_row(escape(name), *("-" if v is None else f"{v:.3f}" for v in row))
    console.print(table)
    wall = summary.get("wall_seconds")
    console.print(f"{summary['subsets']} subsets" + ("" if wall is None else f"; wall time {wall:.1f} s"))


def print_groups(summary: dict[str, Any]) -> None:
    """A grouping summary: one line per group."""
    for i, g in enumerate(summary["groups"]):
        console.print(f"group {i + 1}: {', '.join(g)}", highlight=False, markup=False)
    console.print(f"{summary['m']} groups by {summary['method']}")


def print_approx_error(summary: dict[str, Any]) -> None:
    table = Table(
        "scale",
        "mean rel. error",
        "median rel. error",
        "p90",
        "mean sq. (ref.)",
        "0th-order mean",
        "||dW||/||W||",
        title="first-order approximation error on held-out examples",
    )
    for s in summary["per_scale"]:
        rwc = s.get("relative_weight_change")
        table.add_row(
            f"{s['scale']:g}",
            f"{100 * s['mean_rel_error']:.3f}%",
            f"{100 * s['median_rel_error']:.3f}%",
            f"{100 * s['p90_rel_error']:.3f}%",
            f"{100 * s['mean_sq_rel_error']:.4f}%",
            f"{100 * s['zeroth_order_mean_rel_error']:.3f}%",
            "-" if rwc is None else f"{rwc:.2e}",
        )
    console.print(table)
    console.print(f"wall time {summary['wall_seconds']:.1f} s")


def print_validate(summary: dict[str, Any], lam: float) -> None:
    """Estimated vs fine-tuned subsets (validate-estimates) at the penalty `lam`."""
    pct = _rel
    table = Table(
        "subset",
        "task",
        "est. loss",
        "true loss",
        "rel. err",
        "est. acc",
        "true acc",
        "rel. err",
        "ep",
        title=f"estimated vs fine-tuned (validation), lambda={lam:g}",
    )
    for r in summary["rows"]:
        table.add_row(
            r["tasks"],
            r["task"],
            f"{r['est_loss']:.4f}",
            f"{r['true_loss']:.4f}",
            pct(r["rel_err_loss"]),
            f"{r['est_accuracy']:.3f}",
            f"{r['true_accuracy']:.3f}",
            pct(r["rel_err_accuracy"]),
            str(r["ft_epoch"]),
        )
    console.print(table)
    console.print(
        f"mean relative error: loss {pct(summary['mean_rel_err_loss'])}, accuracy {pct(summary['mean_rel_err_accuracy'])}"
    )
    for v in summary["per_variant"]:
        console.print(
            f"  {v['output']:<6s} {v['backmap']:<11s} lambda={v['lam']:g} step x{v['step']:g}: rel. error loss "
            f"{pct(v['mean_rel_err_loss'])}, accuracy {pct(v['mean_rel_err_accuracy'])} "
            f"(mean est. acc {v['mean_est_accuracy']:.3f}, true {v['mean_true_accuracy']:.3f})"
        )
    lin = summary["linear_proxy"]
    console.print(
        f"  linear proxy (f0 + g.w > 0 on validation rows): accuracy rel. error {pct(lin['mean_rel_err_accuracy'])} "
        f"(mean est. acc {lin['mean_est_accuracy']:.3f}); compute ratio {lin['compute_ratio']:.1f}x, "
        f"amortised {lin['compute_ratio_amortised']:.1f}x"
    )
    th = summary["theta0"]
    console.print(
        f"theta0 = {th.get('init', 'base')}"
        + (f" ({th['epochs']} epoch(s) on all tasks, {th['seconds']:.1f} s)" if th.get("init") == "meta" else "")
        + "; its validation accuracy: "
        + ", ".join(f"{k} {v:.3f}" for k, v in th["val_accuracy"].items())
    )
    if th.get("no_change_rel_err_accuracy") is not None:
        r = th.get("change_correlation")
        console.print(
            f"  theta0's own accuracy as the estimate: rel. error {pct(th['no_change_rel_err_accuracy'])}; "
            f"correlation of estimated and true change from theta0: {'-' if r is None else f'{r:.2f}'}"
        )
    ratio = summary["compute_ratio"]
    amort = summary["compute_ratio_amortised"]
    console.print(
        f"compute ratio (fine-tune {summary['finetune_seconds']:.1f} s / estimation {summary['estimation_seconds']:.1f} s): "
        f"{ratio:.1f}x; amortised over a full affinity run: {amort:.1f}x"
        + (
            f"; counting the meta-initialisation: {summary['compute_ratio_with_init']:.1f}x "
            f"({summary['compute_ratio_amortised_with_init']:.1f}x amortised)"
            if th.get("init") == "meta"
            else ""
        )
    )


def print_validate_affinity(summary: dict[str, Any], metric: str, seeds: list[int]) -> None:
    """Stage 1 against fine-tuned subsets (validate-affinity)."""
    num = _num
    sp, tc, ari = summary["spearman_within_task"], summary["t_correlation"], summary["ari"]
    table = Table(
        "metric", "value", "reference", title=escape(f"Stage 1 vs fine-tuned subsets ({metric}, seeds {seeds})")
    )
    table.add_row("within-task Spearman", num(sp["value"]), f"95% CI [{num(sp['ci95'][0])}, {num(sp['ci95'][1])}]")
    table.add_row("pairwise order accuracy", num(summary["pairwise_order_accuracy"]), "pairs beyond 2x seed noise")
    table.add_row("change skill", num(summary["change_skill"]), "vs theta0 (0 = no-change predictor)")
    table.add_row(
        "T correlation", num(tc["value"]), f"Mantel p {num(tc['p'])}; ceiling {num(summary['t_true_reliability'])}"
    )
    table.add_row("ARI (groups)", num(ari["est_vs_true"]), f"random p95 {num(ari['random_p95'])}")
    console.print(table)
    c = summary["costs"]
    console.print(
        f"{summary['subsets']} subsets; Stage 1 {c['stage1_wall_seconds']:.1f} s, fine-tunes "
        f"{c['finetune_wall_seconds']:.1f} s (FLOP ratio {num(c['flop_ratio'])})"
    )


def print_job_results(job: dict[str, Any], fetch: Callable[[str], bytes]) -> bool:
    """The tables of a succeeded job, as its offline command prints them; `fetch(name)` returns the content of
    the job's artifact `name` (a key of result_artifacts). False when the job type has no table."""
    import json

    kind = job["type"]
    stages = (job.get("result") or {}).get("stages") or {}
    names = job.get("result_artifacts") or {}
    summary = stages.get(kind) or {}
    params = job.get("params") or {}
    if kind in ("pipeline", "training"):
        name = "pipeline_report" if "pipeline_report" in names else "report"
        print_report(json.loads(fetch(name)))
    elif kind == "evaluation":
        report = summary["report"]
        print_metrics_table(
            report["tasks"], f"{(report.get('model') or {}).get('name', '?')} on {report.get('split', '?')}"
        )
    elif kind == "affinity":
        print_affinity(summary)
    elif kind == "grouping":
        print_groups(summary)
    elif kind == "approximation_error":
        print_approx_error(summary)
    elif kind == "validate_estimates":
        from shared.ml.affinity.params import ValidateParams

        print_validate(summary, params.get("lam", ValidateParams.model_fields["lam"].default))
    elif kind == "validate_affinity":
        print_validate_affinity(summary, params.get("metric", "neg_loss"), params.get("seeds", []))
    elif kind == "study" and "table" in names:
        from rich.markdown import Markdown

        console.print(Markdown(fetch("table").decode()))
    else:
        return False
    return True


def print_artifacts(job: dict[str, Any], artifacts: list[dict[str, Any]]) -> None:
    """A job's artifacts under the names its result_artifacts gives them (unique within the job: a name two
    stages produce is "stage/name"), inputs under "inputs/<name>"."""
    by_id = {art_id: name for name, art_id in (job.get("result_artifacts") or {}).items()}
    table = Table("name", "stage", "artifact", "kind", "size", "sha256", title="artifacts")
    for a in sorted(artifacts, key=lambda a: by_id.get(a["id"], "~" + str(a["name"]))):
        name = by_id.get(a["id"]) or f"{a.get('stage') or 'inputs'}/{a['name']}"
        table.add_row(escape(name), a.get("stage") or "", a["id"], a["kind"], f"{a['size_bytes']:,}", a["sha256"][:16])
    console.print(table)
