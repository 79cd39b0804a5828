"""The study's arms as fan-out phases (a job runner's sharder): run here by an in-process sharder that executes
each piece like a separate worker would; the arms, their predictions and the study equal the plain run's."""

from __future__ import annotations

import json

from shared.ml.sharding import use_sharder
from shared.ml.study.params import StudyParams
from shared.ml.study.run import run_study
from tests.test_study import study_out  # noqa: F401  (the plain run, shared fixture)
from tests.test_training_shards import PieceSharder


def test_fanned_out_study_trains_the_same_arms_in_two_phases(study_out, tmp_path):  # noqa: F811
    plain, _ = study_out
    params = StudyParams.model_validate(json.loads((plain / "study_params.json").read_text()))
    sharder = PieceSharder(2)
    with use_sharder(sharder):
        run_study(params, tmp_path / "fanned")
    # phase 1: the affinity and per-task arms of the one seed (2 arms, 2 pieces); phase 2: its random arm
    assert sharder.pieces == [(0, 1), (1, 2), (0, 1)]
    assert [r["trained"] for r in sharder.results] == [["seed 0 affinity"], ["seed 0 per_task"], ["seed 0 random"]]
    for arm in ("affinity", "per_task", "random"):
        ours = json.loads((tmp_path / "fanned" / "seed_0" / arm / "predictions.json").read_text())
        theirs = json.loads((plain / "seed_0" / arm / "predictions.json").read_text())
        assert ours == theirs, arm
    a, b = (json.loads((d / "study.json").read_text()) for d in (plain, tmp_path / "fanned"))
    assert a["arms"] == b["arms"] and a["differences"] == b["differences"] and a["flops"] == b["flops"]
    # pieces re-run after their workers died find their arms finished and train nothing
    again = PieceSharder(1)
    with use_sharder(again):
        run_study(params, tmp_path / "fanned")
    assert again.pieces == [(0, 2), (0, 1)] and [r["trained"] for r in again.results] == [[], []]


def test_a_pool_of_arm_processes_trains_the_same_arms(study_out, tmp_path, monkeypatch):  # noqa: F811
    """workers=2: the arms run in two spawned processes (each told its GPU share) and equal the in-process run."""
    plain, _ = study_out
    blob = json.loads((plain / "study_params.json").read_text())
    params = StudyParams.model_validate({**blob, "workers": 2})
    monkeypatch.delenv("CHORUS_GPU_MEMORY_SHARE", raising=False)
    run_study(params, tmp_path / "pooled")
    for arm in ("affinity", "per_task", "random"):
        ours = json.loads((tmp_path / "pooled" / "seed_0" / arm / "predictions.json").read_text())
        theirs = json.loads((plain / "seed_0" / arm / "predictions.json").read_text())
        assert ours == theirs, arm
    a, b = (json.loads((d / "study.json").read_text()) for d in (plain, tmp_path / "pooled"))
    assert a["arms"] == b["arms"] and a["differences"] == b["differences"]
