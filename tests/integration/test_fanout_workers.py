"""Fan-out with real Celery worker processes on PostgreSQL + Redis (no eager mode): two workers share one
affinity job (gradient shards and subset estimations), the result is bitwise the one of an unsharded run,
and a helper killed with SIGKILL mid-shard loses its shard to the other worker; the job finishes once."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from tests.integration.conftest import TERMINAL, Worker, auth, wait_for

pytestmark = pytest.mark.integration

# 4 tasks x 12 rows = 48 train rows = 12 batches of 4 (one projection group each) -> 6 gradient shards;
# 6 subsets of 2 tasks, one per forward -> 6 estimate shards.
PARAMS = {
    "model": "tiny-llama",
    "quantization": "none",
    "tasks": ["cb", "rte", "copa", "wic"],
    "max_train": 12,
    "max_val": 8,
    "dim": 16,
    "seed": 0,
    "subset_size": 2,
    "batch_size": 4,
    "project_rows": 4,
    "subsets_per_forward": 1,
    "device": "cpu",
    "mode": "forward",  # the subset estimations are a phase of their own only in forward mode
}
# A worker holds each claimed shard this long before running it (a test-only setting), so that a helper,
# which needs ~10-15 s on 2 busy cores to import the ML core and load the model before it claims, still
# finds shards to claim (the job's own worker alone needs ~6 x 4 s per phase).
SHARDS = 6
FANOUT_ENV = {"CHORUS_FANOUT_SHARDS": str(SHARDS), "CHORUS_FANOUT_SHARD_DELAY": "4"}


@pytest.fixture(scope="module")
def key(make_key, quiet_queue) -> str:  # type: ignore[no-untyped-def]
    return make_key(f"fanout-{uuid.uuid4().hex[:6]}", "submit")


@pytest.fixture(scope="module")
def pair(stack_env, quiet_queue, tmp_path_factory) -> Iterator[list[Worker]]:  # type: ignore[no-untyped-def]
    logs = tmp_path_factory.mktemp("fanout-workers")
    env = {**stack_env, **FANOUT_ENV}
    workers = [Worker(env, logs / f"worker-{i}.log", f"f{i}-{uuid.uuid4().hex[:4]}") for i in range(2)]
    try:
        for w in workers:
            w.wait_ready()
        yield workers
    finally:
        for w in workers:
            w.stop()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """The same affinity run in one piece, in this process (no sharder installed)."""
    from shared.ml.affinity.params import AffinityParams
    from shared.ml.affinity.stage import run_affinity

    out = tmp_path_factory.mktemp("unsharded") / "run"
    run_affinity(AffinityParams(**PARAMS), out)
    return out


def _job(api, key: str, job_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return api.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()


def _events(api, key: str, job_id: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    page = api.get(f"/v1/jobs/{job_id}/events", headers=auth(key), params={"limit": 1000}).json()
    assert not page["has_more"]
    return page["data"]


def _submit(api, key: str) -> str:  # type: ignore[no-untyped-def]
    r = api.post("/v1/jobs", headers=auth(key), json={"type": "affinity", "params": PARAMS})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _wait_done(api, key: str, job_id: str, timeout: float = 240) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return wait_for(
        lambda: (j := _job(api, key, job_id))["status"] in TERMINAL and j, timeout, 0.5, f"{job_id} to finish"
    )


def utcnow() -> Any:
    from shared.db.models import utcnow as now

    return now()


def _shards(job_id: str) -> list[Any]:
    from shared.db.models import JobShard
    from shared.db.session import session_scope

    with session_scope() as session:
        rows = list(
            session.scalars(select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.phase, JobShard.index))
        )
        session.expunge_all()
    return rows


def _lease_owner(job_id: str) -> str | None:
    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope() as session:
        job = session.get(Job, job_id)
        return job.lease_owner if job else None


def _pid(worker_token: str) -> int:
    return int(worker_token.split(":")[1])


def _worker_of(pid: int, workers: list[Worker]) -> Worker | None:
    try:
        group = os.getpgid(pid)
    except ProcessLookupError:
        return None
    return next((w for w in workers if w.proc.pid == group), None)


def _artifact(api, key: str, job: dict[str, Any], name: str) -> bytes:  # type: ignore[no-untyped-def]
    r = api.get(f"/v1/artifacts/{job['result_artifacts'][name]}/content", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.content


def _assert_same_as_reference(api, key: str, job: dict[str, Any], reference: Path) -> None:  # type: ignore[no-untyped-def]
    import io

    affinity = json.loads(_artifact(api, key, job, "affinity"))
    expected = json.loads((reference / "affinity.json").read_text())
    assert affinity["matrix"] == expected["matrix"]  # exactly, not approximately
    assert affinity["matrices"] == expected["matrices"] and affinity["per_subset"] == expected["per_subset"]
    grads = np.load(io.BytesIO(_artifact(api, key, job, "gradients")), allow_pickle=False)
    assert np.array_equal(grads, np.load(reference / "grads_train.npy"))
    weights = np.load(io.BytesIO(_artifact(api, key, job, "weights")), allow_pickle=False)
    assert np.array_equal(weights, np.load(reference / "weights.npy"))


def _assert_once(api, key: str, job: dict[str, Any]) -> list[str]:  # type: ignore[no-untyped-def]
    from shared.db.models import Artifact
    from shared.db.session import session_scope

    messages = [e["message"] for e in _events(api, key, job["id"])]
    assert Counter(messages)["job succeeded"] == 1
    assert sum(m.startswith("stage affinity finished") for m in messages) == 1
    with session_scope() as session:
        pairs = [(a.stage, a.name) for a in session.scalars(select(Artifact).where(Artifact.job_id == job["id"]))]
    assert len(pairs) == len(set(pairs)) and set(job["result_artifacts"].values())
    return messages


def test_two_workers_share_one_job_and_match_the_unsharded_run(api, key, pair, reference, make_key):  # type: ignore[no-untyped-def]
    job_id = _submit(api, key)
    started = time.monotonic()
    job = _wait_done(api, key, job_id)
    print(f"sharded affinity job on 2 workers: {time.monotonic() - started:.1f}s")
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 1
    rows = _shards(job_id)
    assert Counter(r.phase for r in rows) == {"gradients:train": SHARDS, "estimate": SHARDS}
    assert all(r.status == "done" and r.attempts == 1 for r in rows), [(r.phase, r.index, r.status) for r in rows]
    assert [(r.start, r.end) for r in rows if r.phase == "gradients:train"] == [
        (0, 2),
        (2, 4),
        (4, 6),
        (6, 8),
        (8, 10),
        (10, 12),
    ]
    assert [(r.start, r.end) for r in rows if r.phase == "estimate"] == [(k, k + 1) for k in range(6)]
    messages = _assert_once(api, key, job)
    parent = next(
        e["data"]["worker"]
        for e in _events(api, key, job_id)
        if (e.get("data") or {}).get("worker") and e["message"].startswith("attempt 1 started")
    )
    parent_id = ":".join(parent.split(":")[:2])  # host:pid of the job's own task
    claimed = Counter(r.claimed_by for r in rows)
    print("shards by worker:", dict(claimed))
    for m in messages:
        print("   ", m)
    # Both workers did shards: the job's own process and helper processes of the other worker (the job's
    # worker runs one task at a time, so a shard done while the job ran was done by the other worker).
    assert parent_id in claimed and len(claimed) >= 2, claimed
    helper_logs = [w.text() for w in pair if f"helper for {job_id}/" in w.text() and "done: shards [" in w.text()]
    assert helper_logs, "no helper task ran on the other worker"
    for label in ("gradients train", "estimate"):
        done = [m for m in messages if m.startswith(f"{label}: shard ")]
        assert [m.split(" done by ")[0] for m in done] == [f"{label}: shard {k}/{SHARDS}" for k in range(1, SHARDS + 1)]
        assert any(m.startswith(f"{label}: all {SHARDS} shards done (") for m in messages)
    _assert_same_as_reference(api, key, job, reference)
    # the same shards over the API, to the job's owner only
    listed = api.get(f"/v1/jobs/{job_id}/shards", headers=auth(key)).json()["data"]
    assert [s["phase"] for s in listed] == ["gradients:train"] * SHARDS + ["estimate"] * SHARDS  # run order
    assert sorted((s["phase"], s["index"], s["claimed_by"], s["status"]) for s in listed) == sorted(
        (r.phase, r.index, r.claimed_by, r.status) for r in rows
    )
    other = make_key(f"fanout-other-{uuid.uuid4().hex[:6]}", "submit")
    assert api.get(f"/v1/jobs/{job_id}/shards", headers=auth(other)).status_code == 404
    # the ML core never entered a worker parent
    assert all("parent is free of torch" in w.text() and "before forking" not in w.text() for w in pair)


def test_killed_helper_loses_its_shard_to_the_other_worker(api, key, pair, reference):  # type: ignore[no-untyped-def]
    alive = [w for w in pair if w.proc.poll() is None]
    assert len(alive) == 2
    job_id = _submit(api, key)
    victim: dict[str, Any] = {}

    def helper_mid_shard() -> bool:
        job = _job(api, key, job_id)
        assert job["status"] not in TERMINAL, job
        owner = _lease_owner(job_id)
        if not owner:
            return False
        for r in _shards(job_id):
            fresh = r.started_at is not None and (utcnow() - r.started_at).total_seconds() < 2  # 4 s delay: still held
            if r.status == "running" and fresh and r.claimed_by and _pid(r.claimed_by) != _pid(owner):
                worker = _worker_of(_pid(r.claimed_by), alive)
                if worker is not None and worker is not _worker_of(_pid(owner), alive):
                    victim.update(worker=worker, claimed_by=r.claimed_by, phase=r.phase, index=r.index, owner=owner)
                    return True
        return False

    wait_for(helper_mid_shard, 120, 0.2, "a helper to hold a shard")
    victim["worker"].kill9()
    killed_at = time.monotonic()
    job = _wait_done(api, key, job_id)
    print(
        f"killed the helper of shard {victim['phase']}/{victim['index']}; job done {time.monotonic() - killed_at:.1f}s later"
    )
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 1  # the job itself never lost its worker
    rows = {(r.phase, r.index): r for r in _shards(job_id)}
    redone = rows[(victim["phase"], victim["index"])]
    assert redone.status == "done" and redone.attempts == 2, (redone.status, redone.attempts)
    assert redone.claimed_by != victim["claimed_by"] and redone.claimed_by == ":".join(victim["owner"].split(":")[:2])
    assert all(r.status == "done" for r in rows.values())
    _assert_once(api, key, job)
    # one "shard done" event per shard; the killed helper's shard was finished by the job's own worker
    done = [
        e["data"]
        for e in _events(api, key, job_id)
        if (e.get("data") or {}).get("type") == "shard" and e["data"]["phase"] == victim["phase"]
    ]
    assert sorted(d["shard"] for d in done) == list(range(SHARDS))
    assert next(d for d in done if d["shard"] == victim["index"])["worker"] == redone.claimed_by
    _assert_same_as_reference(api, key, job, reference)


# Stage 2 fanned out: 6 singleton groups + the single baseline = 7 adapters = 2 canonical chunks of 4.
TRAIN_PARAMS = {
    "model": "tiny-llama",
    "quantization": "none",
    "groups": [["cb"], ["rte"], ["copa"], ["wic"], ["boolq"], ["mr"]],
    "max_train": 8,
    "max_val": 6,
    "max_test": 4,
    "epochs": 1,
    "batch_size": 4,
    "lr": 2e-3,
    "seed": 0,
    "boosting": {"enabled": False},
}


def test_a_training_jobs_adapters_fan_out_in_chunks_and_match_an_in_process_run(api, key, pair, tmp_path):  # type: ignore[no-untyped-def]
    from shared.ml.sharding import use_sharder
    from shared.ml.training import shards
    from shared.ml.training.params import TrainingParams
    from shared.ml.training.stage import run_training
    from tests.test_training_shards import PieceSharder

    r = api.post("/v1/jobs", headers=auth(key), json={"type": "training", "params": TRAIN_PARAMS})
    assert r.status_code == 201, r.text
    job = _wait_done(api, key, r.json()["id"])
    assert job["status"] == "succeeded", job
    rows = [s for s in _shards(job["id"]) if s.phase == "adapters"]
    assert [(s.start, s.end) for s in rows] == [(0, 4), (4, 7)]  # whole chunks of shards.CHUNK
    assert all(s.status == "done" and s.attempts == 1 for s in rows)
    report = json.loads(_artifact(api, key, job, "report"))
    # the same training in this process, cut into one piece: bitwise the same adapters
    with use_sharder(PieceSharder(1)):
        run_training(TrainingParams.model_validate(TRAIN_PARAMS), tmp_path / "ref")
    expected = json.loads((tmp_path / "ref" / "train_report.json").read_text())
    assert {n: a["sha256"] for n, a in report["adapters"].items()} == {
        n: a["sha256"] for n, a in expected["adapters"].items()
    }
    assert len(report["adapters"]) == 7 and shards.CHUNK == 4
