"""Choosing the deployed arm on validation data when the affinity matrix shows no group structure.

`groups=auto` runs a permutation test on T (shared/ml/affinity/structure.py). When the structure is not
above noise, the pipeline also trains one adapter per task, and this module deploys whichever of the
group ensemble, the single all-task adapter and the per-task adapters has the best mean VALIDATION
accuracy (never test): ensemble.json becomes that arm's manifest; the group ensemble stays beside it as
ensemble_groups.json, and the report says which arm was chosen and why.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from shared.ml.training.ensemble import EnsembleManifest, Member, TaskWeights, load_manifest, write_manifest

# report column -> arm name
CANDIDATES = {"ensemble": "groups", "single": "single", "per_task": "per_task"}


def per_task_manifest(groups_manifest: EnsembleManifest, report: dict[str, Any]) -> EnsembleManifest:
    """One member per task (the adapters `task_<t>` that the training run saved), weight 1 on its task."""
    members, weights = [], {}
    for task in groups_manifest.tasks:
        name = f"task_{task}"
        entry = report["adapters"][name]
        members.append(Member(name=name, path=entry["path"], sha256=entry["sha256"], role="group", tasks=[task]))
        weights[task] = TaskWeights(weights={name: 1.0})
    return EnsembleManifest(
        name=f"{groups_manifest.name}-per-task",
        version=1,
        base=groups_manifest.base,
        max_length=groups_manifest.max_length,
        members=members,
        tasks=weights,
    )


def select_on_validation(workdir: Path, reason: str, report_name: str = "train_report.json") -> dict[str, Any]:
    """Deploy the arm with the best mean validation accuracy; returns the selection record (also written
    into the training report under "selection")."""
    workdir = Path(workdir)
    report_path = workdir / report_name
    report = json.loads(report_path.read_text())
    averages = report["validation"]["average"]
    scores = {arm: averages[col] for col, arm in CANDIDATES.items() if averages.get(col) is not None}
    if "groups" not in scores:
        raise ValueError(f"{report_name} has no validation accuracy of the group ensemble")
    best = max(scores, key=lambda arm: (scores[arm], arm == "groups"))  # ties keep the groups
    groups_manifest = load_manifest(workdir / "ensemble.json")
    if not (workdir / "ensemble_groups.json").exists():
        shutil.copyfile(workdir / "ensemble.json", workdir / "ensemble_groups.json")
    if best == "single":
        chosen = load_manifest(workdir / "ensemble_single.json")
        write_manifest(
            chosen.model_copy(update={"name": groups_manifest.name, "fingerprint": None}), workdir / "ensemble.json"
        )
    elif best == "per_task":
        write_manifest(
            per_task_manifest(groups_manifest, report).model_copy(update={"name": groups_manifest.name}),
            workdir / "ensemble.json",
        )
    deployed = load_manifest(workdir / "ensemble.json")
    record = {
        "rule": "best mean validation accuracy among groups, single and per_task (ties: groups)",
        "reason": reason,
        "validation_accuracy": scores,
        "chosen": best,
        "fingerprint": deployed.fingerprint,
    }
    report["selection"] = record
    report["ensemble"] = {**report["ensemble"], "fingerprint": deployed.fingerprint, "selected": best}
    tmp = report_path.with_name(f".{report_path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(report_path)
    return record
