"""study.json, study.md and study.png from the trained arms of a study."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from shared.files import atomic_write_bytes
from shared.ml.plotting import save_png
from shared.ml.study.outcomes import HEADLINE, arm_costs, load_correct, validation_choice
from shared.ml.study.params import StudyParams
from shared.ml.study.stats import hierarchical_bootstrap, mcnemar, per_seed

# Differences reported with CIs: every arm against single, and affinity against each control.
VERSUS = ("single", "random", "per_task")


def build_study(params: StudyParams, workdir: Path, groups: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The study object (accuracies as fractions, FLOPs, paired differences with 95 % CIs)."""
    correct = load_correct(params, workdir, "test")
    arms: dict[str, Any] = {}
    for arm, runs in correct.items():
        seeds = per_seed(runs)
        arms[arm] = {
            "average": float(np.mean(seeds)),
            "per_seed": seeds,
            "per_task": {t: float(np.mean([np.mean(r[t]) for r in runs])) for t in params.tasks},
        }
    differences: dict[str, Any] = {}
    for k, arm in enumerate(sorted(correct)):
        if arm != "single" and "single" in correct:
            differences[f"{arm}-single"] = hierarchical_bootstrap(correct[arm], correct["single"], params.bootstrap, k)
    for other in VERSUS[1:]:
        if "affinity" in correct and other in correct:
            differences[f"affinity-{other}"] = hierarchical_bootstrap(
                correct["affinity"], correct[other], params.bootstrap, 100 + len(differences)
            )
    controls = [a for a in ("single", "per_task", "random") if a in arms]
    if "affinity" in correct and controls:
        best = max(controls, key=lambda a: arms[a]["average"])
        differences["affinity-best_control"] = {
            "control": best,
            **differences.get(
                f"affinity-{best}", hierarchical_bootstrap(correct["affinity"], correct[best], params.bootstrap, 999)
            ),
        }
    tests = {
        f"{arm}-single": mcnemar(correct[arm], correct["single"])
        for arm in (*HEADLINE, "chorus")
        if arm != "single" and arm in correct and "single" in correct
    }
    if "affinity" in correct and "random" in correct:
        tests["affinity-random"] = mcnemar(correct["affinity"], correct["random"])
    costs = arm_costs(params, workdir)
    return {
        "tasks": list(params.tasks),
        "seeds": list(params.seeds),
        "split": "test",
        "rows_per_task": {t: int(len(correct["single"][0][t])) for t in params.tasks} if "single" in correct else {},
        "arms": arms,
        "differences": differences,
        "mcnemar": tests,
        "flops": costs["flops"],
        "flops_vs_single": costs["vs_single"],
        "costs": costs["other"],
        "groups": {str(s): g for s, g in groups.items()},
        "validation_choice": validation_choice(params, workdir),
        "method": (
            "accuracy = mean over tasks (macro), then over seeds; CIs: paired bootstrap, seeds resampled, "
            "then test rows within each task; McNemar: exact, per task, discordant rows pooled over seeds; "
            "FLOPs: analytic (trainer's cost model), affinity includes Stage 1 and its meta fine-tune"
        ),
        "params": params.model_dump(mode="json"),
    }


def markdown(study: dict[str, Any]) -> str:
    """A table a person reads: arm, accuracy, difference to single with CI, FLOPs, members per example."""
    flops, ratio, other = study["flops"], study["flops_vs_single"], study["costs"]
    lines = [
        f"# Study: {len(study['tasks'])} tasks, seeds {study['seeds']}",
        "",
        f"Tasks: {', '.join(study['tasks'])}. Test accuracy (macro over tasks), mean over seeds.",
        "",
        "| arm | accuracy | per seed | minus single [95 % CI] | FLOPs (x single) | members / example |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for arm, row in study["arms"].items():
        d = study["differences"].get(f"{arm}-single")
        diff = f"{100 * d['mean']:+.2f} [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}]" if d else "—"
        base = arm.removesuffix("_no_boost").removesuffix("_no_fit")
        f = flops.get(base)
        cost = f"{f:.3g} ({ratio.get(base, float('nan')):.2f}x)" if f else "—"
        members = other.get(f"{base}_members_per_example", 1.0 if base == "single" else None)
        seeds = ", ".join(f"{100 * x:.1f}" for x in row["per_seed"])
        lines.append(
            f"| {arm} | {100 * row['average']:.2f} | {seeds} | {diff} | {cost} | "
            f"{'—' if members is None else f'{members:.2f}'} |"
        )
    lines += ["", "| comparison | mean | 95 % CI | SD over seeds |", "| --- | --- | --- | --- |"]
    for name, d in study["differences"].items():
        if name.startswith("affinity-"):
            sd = d.get("sd_over_seeds")
            label = f"{name} ({d['control']})" if "control" in d else name
            lines.append(
                f"| {label} | {100 * d['mean']:+.2f} | [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] | "
                f"{'—' if sd is None else f'{100 * sd:.2f}'} |"
            )
    if "stage1" in flops:
        lines += [
            "",
            f"Stage 1 (gradients, solves, estimates, meta fine-tune): {flops['stage1']:.3g} FLOPs "
            f"= {ratio.get('stage1', float('nan')):.3f}x the single adapter's training.",
        ]
    if "chorus" in study["arms"]:
        lines += [
            "",
            "chorus = what the pipeline deploys (affinity groups when the permutation test finds structure "
            "in T, else the arm with the best validation accuracy).",
        ]
    choices = [c["choice"] for c in study["validation_choice"]["per_seed"]]
    lines += [
        "",
        f"Arm favoured by validation accuracy per seed: {', '.join(choices)}.",
        "",
        "Groups per seed: " + "; ".join(f"seed {s}: {g['affinity']}" for s, g in study["groups"].items()),
        "",
    ]
    return "\n".join(lines)


def chart(study: dict[str, Any], path: Path) -> None:
    """Per-task accuracy bars of the headline arms, and a forest plot of each arm minus single."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = study["tasks"]
    arms = [a for a in HEADLINE if a in study["arms"]]
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(max(10.0, 1.1 * len(tasks) + 6), 4.8),
        gridspec_kw={"width_ratios": [max(2, len(tasks) / 3), 1.4]},
    )
    width = 0.8 / max(1, len(arms))
    x = np.arange(len(tasks))
    for k, arm in enumerate(arms):
        left.bar(
            x + (k - (len(arms) - 1) / 2) * width,
            [100 * study["arms"][arm]["per_task"][t] for t in tasks],
            width,
            label=arm,
        )
    left.set_xticks(x, tasks, rotation=45, ha="right")
    left.set_ylabel("test accuracy (%)")
    left.set_title("per task (mean over seeds)")
    left.legend(fontsize=8)
    names = [n for n in study["differences"] if n.endswith("-single") and not n.startswith("zero_shot")] + [
        n for n in study["differences"] if n.startswith("affinity-") and not n.endswith("-single")
    ]
    for k, name in enumerate(names):
        d = study["differences"][name]
        lo, hi = 100 * d["ci95"][0], 100 * d["ci95"][1]
        right.errorbar(
            100 * d["mean"],
            k,
            xerr=[[100 * d["mean"] - lo], [hi - 100 * d["mean"]]],
            fmt="o",
            color="C3" if name.startswith("affinity") else "C0",
            capsize=3,
        )
    right.axvline(0, color="grey", lw=1)
    right.set_yticks(range(len(names)), names, fontsize=8)
    right.invert_yaxis()
    right.set_xlabel("difference in accuracy (points, 95 % CI)")
    right.set_title("paired differences")
    fig.tight_layout()
    save_png(fig, path)


def write_report(params: StudyParams, workdir: Path, groups: dict[int, dict[str, Any]]) -> dict[str, Any]:
    study = build_study(params, workdir, groups)
    atomic_write_bytes(workdir / "study.json", json.dumps(study, indent=2).encode())
    atomic_write_bytes(workdir / "study.md", markdown(study).encode())
    chart(study, workdir / "study.png")
    return study
