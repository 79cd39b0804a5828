"""Which arm `groups=auto` deploys when the structure test finds nothing (shared/ml/training/selection.py).

Direct tests on hand-written manifests and training reports: no model is loaded or trained.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.ml.training.ensemble import (
    BaseIdentity,
    EnsembleManifest,
    Member,
    TaskWeights,
    compute_fingerprint,
    load_manifest,
    write_manifest,
)
from shared.ml.training.selection import per_task_manifest, select_on_validation

BASE = BaseIdentity(base_model="tiny-llama", base_revision="r1", quantization="none")
RULE = "best mean validation accuracy among groups, single and per_task (ties: groups)"


def _manifest(name: str, version: int, member: str, digit: str) -> EnsembleManifest:
    """One member over both tasks with weight 1 (a group ensemble or the single adapter's)."""
    return EnsembleManifest(
        name=name,
        version=version,
        base=BASE,
        max_length=96,
        members=[
            Member(name=member, path=f"adapters/{member}", sha256=digit * 64, role="group", tasks=["boolq", "rte"])
        ],
        tasks={"boolq": TaskWeights(weights={member: 1.0}), "rte": TaskWeights(weights={member: 1.0})},
    )


def _groups() -> EnsembleManifest:
    return _manifest("study", 3, "g0", "a")


def _single() -> EnsembleManifest:
    return _manifest("study-single", 1, "single", "b")


def _adapters() -> dict[str, Any]:
    return {
        "task_boolq": {"path": "adapters/task_boolq", "sha256": "c" * 64},
        "task_rte": {"path": "adapters/task_rte", "sha256": "d" * 64},
    }


def _workdir(tmp_path: Path, average: dict[str, Any], report_name: str = "train_report.json") -> Path:
    write_manifest(_groups(), tmp_path / "ensemble.json")
    write_manifest(_single(), tmp_path / "ensemble_single.json")
    report = {
        "validation": {"average": average},
        "adapters": _adapters(),
        "ensemble": {"name": "study", "fingerprint": "old", "members": 1},
    }
    (tmp_path / report_name).write_text(json.dumps(report))
    return tmp_path


def _report(workdir: Path, name: str = "train_report.json") -> dict[str, Any]:
    return json.loads((workdir / name).read_text())


def test_selection_deploys_the_best_arm_and_records_why(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, {"ensemble": 0.61, "single": 0.70, "per_task": 0.64})
    groups_text = (workdir / "ensemble.json").read_text()

    record = select_on_validation(workdir, "p = 0.42")

    deployed = load_manifest(workdir / "ensemble.json")
    assert [m.name for m in deployed.members] == ["single"]
    assert deployed.name == "study"  # the deployed manifest keeps the ensemble's name
    assert deployed.fingerprint == compute_fingerprint(deployed)
    assert (workdir / "ensemble_groups.json").read_text() == groups_text  # the group ensemble stays beside it
    assert record == {
        "rule": RULE,
        "reason": "p = 0.42",
        "validation_accuracy": {"groups": 0.61, "single": 0.70, "per_task": 0.64},
        "chosen": "single",
        "fingerprint": deployed.fingerprint,
    }
    text = (workdir / "train_report.json").read_text()
    report = json.loads(text)
    assert text == json.dumps(report, indent=2)
    assert report["selection"] == record
    assert report["ensemble"] == {
        "name": "study",
        "fingerprint": deployed.fingerprint,
        "members": 1,
        "selected": "single",
    }
    assert report["adapters"] == _adapters()  # the rest of the report is kept
    assert sorted(p.name for p in workdir.iterdir()) == [
        "ensemble.json",
        "ensemble_groups.json",
        "ensemble_single.json",
        "train_report.json",
    ]


def test_selection_keeps_the_groups_on_a_tie_and_leaves_their_manifest(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, {"ensemble": 0.7, "single": 0.7, "per_task": 0.7})
    before = (workdir / "ensemble.json").read_text()

    record = select_on_validation(workdir, "tie")

    assert record["chosen"] == "groups"
    assert (workdir / "ensemble.json").read_text() == before
    assert record["fingerprint"] == load_manifest(workdir / "ensemble.json").fingerprint
    assert _report(workdir)["ensemble"]["selected"] == "groups"


def test_the_tie_rule_does_not_rest_on_the_order_of_the_candidates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shared.ml.training import selection

    # with the groups listed last, max() alone would return the first arm of the tie
    monkeypatch.setattr(selection, "CANDIDATES", {"single": "single", "per_task": "per_task", "ensemble": "groups"})
    workdir = _workdir(tmp_path, {"ensemble": 0.7, "single": 0.7, "per_task": 0.7})
    assert select_on_validation(workdir, "tie")["chosen"] == "groups"


def test_selection_keeps_the_groups_when_they_are_best(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, {"ensemble": 0.8, "single": 0.7, "per_task": 0.75})
    assert select_on_validation(workdir, "r")["chosen"] == "groups"
    assert load_manifest(workdir / "ensemble.json") == load_manifest(workdir / "ensemble_groups.json")


def test_selection_deploys_the_per_task_adapters(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, {"ensemble": 0.6, "single": 0.65, "per_task": 0.66})

    record = select_on_validation(workdir, "r")

    deployed = load_manifest(workdir / "ensemble.json")
    assert record["chosen"] == "per_task"
    assert deployed.name == "study"
    assert [m.name for m in deployed.members] == ["task_boolq", "task_rte"]
    assert deployed.fingerprint == compute_fingerprint(deployed) == record["fingerprint"]


def test_selection_skips_arms_without_a_validation_accuracy(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, {"ensemble": 0.5, "single": None})
    record = select_on_validation(workdir, "r")
    assert record["validation_accuracy"] == {"groups": 0.5}
    assert record["chosen"] == "groups"


def test_selection_needs_the_group_ensembles_accuracy(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, {"ensemble": None, "single": 0.9}, report_name="other.json")
    with pytest.raises(ValueError, match=r"^other\.json has no validation accuracy of the group ensemble$"):
        select_on_validation(workdir, "r", report_name="other.json")


def test_selection_reads_a_named_report(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, {"ensemble": 0.5, "single": 0.6}, report_name="other.json")
    assert select_on_validation(workdir, "r", report_name="other.json")["chosen"] == "single"
    assert _report(workdir, "other.json")["selection"]["chosen"] == "single"


def test_selection_run_again_keeps_the_first_group_manifest(tmp_path: Path) -> None:
    workdir = _workdir(tmp_path, {"ensemble": 0.6, "single": 0.7})
    groups_text = (workdir / "ensemble.json").read_text()
    select_on_validation(workdir, "first")

    # a second run must not copy the deployed single manifest over the saved group ensemble
    assert select_on_validation(workdir, "second")["chosen"] == "single"
    assert (workdir / "ensemble_groups.json").read_text() == groups_text


def test_per_task_manifest_has_one_adapter_per_task_with_weight_one() -> None:
    manifest = per_task_manifest(_groups(), {"adapters": _adapters()})
    assert manifest == EnsembleManifest(
        name="study-per-task",
        version=1,
        base=BASE,
        max_length=96,
        members=[
            Member(name="task_boolq", path="adapters/task_boolq", sha256="c" * 64, role="group", tasks=["boolq"]),
            Member(name="task_rte", path="adapters/task_rte", sha256="d" * 64, role="group", tasks=["rte"]),
        ],
        tasks={"boolq": TaskWeights(weights={"task_boolq": 1.0}), "rte": TaskWeights(weights={"task_rte": 1.0})},
        fingerprint=None,
    )
