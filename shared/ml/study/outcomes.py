"""What a study's trained arms produced, read back from its folder: per-row correctness of every reported arm,
FLOPs and costs per arm, and the arm validation favours (the inputs of study.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from shared.ml.study.params import StudyParams

PREDICTIONS = "predictions.json"
# Reported arms: name -> (run folder, prediction column). "_no_boost" is the group adapters alone with
# weight 1; "_no_fit" keeps the boosters with the default weights (the same trained adapters).
ARM_COLUMNS: dict[str, tuple[str, str]] = {
    "single": ("affinity", "single"),
    "per_task": ("per_task", "ensemble"),
    "per_task_no_boost": ("per_task", "ensemble_no_boost"),
    "per_task_no_fit": ("per_task", "ensemble_no_fit"),
    "random": ("random", "ensemble"),
    "random_no_boost": ("random", "ensemble_no_boost"),
    "random_no_fit": ("random", "ensemble_no_fit"),
    "affinity": ("affinity", "ensemble"),
    "affinity_no_boost": ("affinity", "ensemble_no_boost"),
    "affinity_no_fit": ("affinity", "ensemble_no_fit"),
    "zero_shot": ("affinity", "zero_shot"),
}
HEADLINE = ("single", "per_task", "random", "affinity")
# "chorus" is what the pipeline deploys: the affinity groups when T shows structure, else the arm that
# validation favours (single, per-task or groups); its column is read from the run's selection record.
SELECTED_COLUMN = {"groups": "ensemble", "single": "single", "per_task": "per_task"}


def _selection(folder: Path) -> dict[str, Any] | None:
    return json.loads((folder / "train_report.json").read_text()).get("selection")


def load_correct(params: StudyParams, workdir: Path, split: str = "test") -> dict[str, list[dict[str, np.ndarray]]]:
    """Per arm, per seed, per task: the boolean correctness of every row of `split`."""
    out: dict[str, list[dict[str, np.ndarray]]] = {arm: [] for arm in [*ARM_COLUMNS, "chorus"]}
    for s in params.seeds:
        preds = {
            run: json.loads((workdir / f"seed_{s}" / run / PREDICTIONS).read_text())[split]
            for run in ("affinity", "random", "per_task")
        }
        selection = _selection(workdir / f"seed_{s}" / "affinity")
        chosen = ("affinity", SELECTED_COLUMN[selection["chosen"]]) if selection else ("affinity", "ensemble")
        for arm, (run, column) in [*ARM_COLUMNS.items(), ("chorus", chosen)]:
            rows: dict[str, np.ndarray] = {}
            for t in params.tasks:
                entry = preds[run][t]
                cols = entry["columns"]
                col = column if column in cols else ("ensemble" if column.endswith("_no_fit") else None)
                if col is None or col not in cols:
                    break
                rows[t] = np.asarray(cols[col]) == np.asarray(entry["labels"])
            else:
                out[arm].append(rows)
    return {arm: v for arm, v in out.items() if len(v) == len(params.seeds)}


def arm_costs(params: StudyParams, workdir: Path) -> dict[str, Any]:
    """FLOPs per arm (mean over seeds), with and without Stage 1 (meta fine-tune included), members run
    per example at inference, and wall seconds of training."""
    per: dict[str, list[float]] = {}
    extra: dict[str, list[float]] = {}

    def add(store: dict[str, list[float]], key: str, value: Any) -> None:
        if isinstance(value, (int, float)):
            store.setdefault(key, []).append(float(value))

    for s in params.seeds:
        reports = {
            run: json.loads((workdir / f"seed_{s}" / run / "train_report.json").read_text())
            for run in ("affinity", "random", "per_task")
        }
        aff = reports["affinity"]["cost"]
        stage1 = aff.get("affinity_flops") or 0.0
        add(per, "single", (aff.get("single") or {}).get("total_flops"))
        for run in ("random", "per_task", "affinity"):
            cost = reports[run]["cost"]
            add(per, f"{run}_without_stage1", cost["ensemble_training"]["total_flops"])
            add(extra, f"{run}_members_per_example", cost["inference"]["mean_members_per_example"])
            add(
                extra,
                f"{run}_train_seconds",
                sum(
                    v.get("wall_seconds", 0.0)
                    for k, v in (cost.get("stages") or {}).items()
                    if k in ("group_adapters", "baselines", "boosting", "ensemble_weights")
                ),
            )
        add(per, "stage1", stage1)
        add(per, "affinity", aff["ensemble_training"]["total_flops"] + stage1)
        # the deployed arm: Stage 1 + groups; when the validation fallback ran, also the single and per-task
        # adapters it compared (trained only to choose between the arms)
        fallback = 0.0
        if reports["affinity"].get("selection"):
            fallback = sum((aff.get(k) or {}).get("total_flops", 0.0) for k in ("single", "per_task"))
        add(per, "chorus", aff["ensemble_training"]["total_flops"] + stage1 + fallback)
    flops = {k: float(np.mean(v)) for k, v in per.items()}
    for run in ("random", "per_task"):
        flops[run] = flops[f"{run}_without_stage1"]
    single = flops.get("single")
    ratios = {k: v / single for k, v in flops.items() if single}
    return {"flops": flops, "vs_single": ratios, "other": {k: float(np.mean(v)) for k, v in extra.items()}}


def validation_choice(params: StudyParams, workdir: Path) -> dict[str, Any]:
    """Which headline arm validation accuracy favours, per seed (what groups=auto's fallback would pick)."""
    val = load_correct(params, workdir, "val")
    picks = []
    for k, s in enumerate(params.seeds):
        scores = {arm: float(np.mean([np.mean(v) for v in val[arm][k].values()])) for arm in HEADLINE if arm in val}
        # ties go to the groups, as in the pipeline's fallback (selection.py)
        picks.append(
            {"seed": s, "choice": max(scores, key=lambda arm: (scores[arm], arm == "affinity")), "val_accuracy": scores}
        )
    return {"per_seed": picks}
