"""Jobs end to end with real Celery worker processes on PostgreSQL + Redis (no eager mode):
submit -> run -> succeed; cancel mid-run and while queued; duplicate deliveries are no-ops; a pipeline
whose worker is killed with SIGKILL mid-stage resumes after its last finished stage, exactly once."""

from __future__ import annotations

import io
import json
import tarfile
import time
import uuid
import zipfile
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import select

from tests.integration.conftest import TERMINAL, auth, wait_for

pytestmark = pytest.mark.integration

# Long enough to be cancelled or killed mid-run (stops at the first progress report after the request).
LONG_EVAL = {"model": "tiny-llama", "tasks": ["sst2", "mr", "subj", "cr"], "max_examples": 400, "batch_size": 1}
PIPELINE = {
    "model": "tiny-llama",
    "quantization": "none",
    "tasks": ["cb", "rte", "copa"],
    "groups": 2,
    "seed": 0,
    "max_train": 16,
    "max_val": 8,
    "max_test": 8,
    "affinity": {"dim": 16},
    "training": {"epochs": 2},
}


@pytest.fixture(scope="module")
def key(make_key, quiet_queue) -> str:  # type: ignore[no-untyped-def]
    return make_key(f"worker-{uuid.uuid4().hex[:6]}", "submit,infer")


def _job(api, key: str, job_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return api.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()


def _events(api, key: str, job_id: str) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    out, after = [], None
    while True:
        page = api.get(
            f"/v1/jobs/{job_id}/events",
            headers=auth(key),
            params={"limit": 1000, **({"after": after} if after is not None else {})},
        ).json()
        out += page["data"]
        if not page["has_more"]:
            return out
        after = page["last_id"]


def _wait_done(api, key: str, job_id: str, timeout: float = 180) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return wait_for(
        lambda: (j := _job(api, key, job_id))["status"] in TERMINAL and j, timeout, 0.5, f"{job_id} to finish"
    )


def _submit(api, key: str, type_: str, params: dict[str, Any]) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    r = api.post("/v1/jobs", headers=auth(key), json={"type": type_, "params": params})
    assert r.status_code == 201, r.text
    return r.json()


def _db_job(job_id: str) -> Any:
    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def test_submit_run_succeed_and_duplicate_delivery_is_a_noop(api, key, workers):  # type: ignore[no-untyped-def]
    worker = workers.current()
    job = _submit(api, key, "evaluation", {"model": "tiny-llama", "tasks": ["cb", "rte"], "max_examples": 8})
    done = _wait_done(api, key, job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempt"] == 1 and done["progress"]["percent"] == 100.0
    assert [(s["name"], s["status"], s["attempts"]) for s in done["stages"]] == [("evaluation", "succeeded", 1)]
    report_id = done["result_artifacts"]["report"]
    art = api.get(f"/v1/artifacts/{report_id}", headers=auth(key)).json()
    assert art["media_type"] == "application/json" and art["filename"] == "report.json"
    content = api.get(f"/v1/artifacts/{report_id}/content", headers=auth(key))
    assert content.headers["x-content-sha256"] == art["sha256"]
    report = content.json()
    assert set(report["tasks"]) == {"cb", "rte"} and report["tasks"]["cb"]["n"] == 8
    assert done["result"]["stages"]["evaluation"]["report"]["tasks"] == report["tasks"]
    messages = [e["message"] for e in _events(api, key, job["id"])]
    assert messages[0] == "job created (evaluation)" and messages[-1] == "job succeeded"
    assert any(m.startswith("evaluate cb: ") for m in messages), messages
    # A redelivered message (broker visibility timeout, a retry) finds the job finished and does nothing.
    from services.worker.celery_app import enqueue

    enqueue(job["id"])
    wait_for(lambda: f"job {job['id']} not run: terminal succeeded" in worker.text(), 60, what="duplicate skipped")
    assert [e["message"] for e in _events(api, key, job["id"])] == messages
    # The ML core (torch) was imported only in the forked job process, never in the worker parent.
    assert "parent is free of torch" in worker.text() and "before forking" not in worker.text()


def test_cancel_mid_run_stops_within_seconds(api, key, workers):  # type: ignore[no-untyped-def]
    workers.current()
    job = _submit(api, key, "evaluation", LONG_EVAL)
    wait_for(
        lambda: any((e.get("data") or {}).get("type") == "progress" for e in _events(api, key, job["id"])),
        120,
        0.3,
        "the first progress report",
    )
    requested = time.monotonic()
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    stopped = wait_for(
        lambda: [e for e in _events(api, key, job["id"]) if "worker stopped stage" in e["message"]],
        60,
        0.2,
        "the worker to stop the stage",
    )
    latency = time.monotonic() - requested
    print(f"cancel -> stage stopped in {latency:.2f}s")
    final = _job(api, key, job["id"])
    assert final["status"] == "cancelled" and final["stages"][0]["status"] == "cancelled"
    progress_after = [
        e
        for e in _events(api, key, job["id"])
        if e["id"] > stopped[0]["id"] and (e.get("data") or {}).get("type") == "progress"
    ]
    assert progress_after == []
    assert _db_job(job["id"]).lease_owner is None
    # Finished jobs cannot be cancelled; the worker is free for the next job.
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)).json()["status"] == "cancelled"


def test_cancel_queued_job_never_runs(api, key, workers):  # type: ignore[no-untyped-def]
    worker = workers.current()
    running = _submit(api, key, "evaluation", LONG_EVAL)
    queued = _submit(api, key, "evaluation", {**LONG_EVAL, "seed": 1})
    wait_for(lambda: _job(api, key, running["id"])["status"] == "running", 60, what="the first job to start")
    assert api.post(f"/v1/jobs/{queued['id']}/cancel", headers=auth(key)).json()["status"] == "cancelled"
    api.post(f"/v1/jobs/{running['id']}/cancel", headers=auth(key))
    task_id = _db_job(queued["id"]).task_id
    wait_for(
        lambda: task_id in worker.text() and ("revoked" in worker.text() or f"{queued['id']} not run" in worker.text()),
        90,
        0.5,
        "the worker to drop the cancelled message",
    )
    final = _job(api, key, queued["id"])
    assert final["status"] == "cancelled" and final["attempt"] == 0 and final["started_at"] is None
    finished = api.post(f"/v1/jobs/{running['id']}/cancel", headers=auth(key))
    assert finished.json()["status"] == "cancelled"


def test_grouping_job_on_an_inline_affinity_matrix(api, key, workers):  # type: ignore[no-untyped-def]
    workers.current()
    tasks = ["cb", "rte", "copa", "wic"]
    matrix = [[0.9, 0.8, 0.1, 0.2], [0.8, 0.9, 0.2, 0.1], [0.1, 0.2, 0.9, 0.8], [0.2, 0.1, 0.8, 0.9]]
    job = _submit(api, key, "grouping", {"affinity": {"tasks": tasks, "matrix": matrix}, "groups": 2, "method": "sdp"})
    done = _wait_done(api, key, job["id"])
    assert done["status"] == "succeeded", done
    groups = api.get(f"/v1/artifacts/{done['result_artifacts']['groups']}/content", headers=auth(key)).json()
    assert sorted(sorted(g) for g in groups["groups"]) == [["cb", "rte"], ["copa", "wic"]]
    heatmap = api.get(f"/v1/artifacts/{done['result_artifacts']['groups_heatmap']}/content", headers=auth(key))
    assert heatmap.headers["content-type"] == "image/png" and heatmap.content[:8] == b"\x89PNG\r\n\x1a\n"
    bad = _submit(api, key, "grouping", {"affinity": {"tasks": tasks, "matrix": [[1.0]]}, "groups": 2})
    failed = _wait_done(api, key, bad["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_params", failed
    assert "matrix" in failed["error"]["message"]


@pytest.fixture(scope="module")
def pipeline_run(api, key, workers) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """A pipeline whose worker is killed (SIGKILL, parent and child) during the training stage and
    restarted; returns the finished job and what happened."""
    first = workers.current()
    job = _submit(api, key, "pipeline", PIPELINE)

    def training_running() -> bool:
        j = _job(api, key, job["id"])
        stages = {s["name"]: s["status"] for s in j["stages"]}
        assert j["status"] not in TERMINAL, j
        return stages.get("grouping") == "succeeded" and stages.get("training") == "running"

    wait_for(training_running, 240, 0.2, "the training stage to start")
    time.sleep(1.0)  # well inside the stage
    killed_at = time.monotonic()
    first.kill9()
    killed_owner = _db_job(job["id"]).lease_owner
    second = workers.start()
    done = _wait_done(api, key, job["id"], timeout=300)
    return {
        "job": done,
        "killed_owner": killed_owner,
        "recovered_in": time.monotonic() - killed_at,
        "first_log": first.text(),
        "second_log": second.text(),
    }


def test_killed_worker_job_resumes_after_last_finished_stage_exactly_once(api, key, pipeline_run):  # type: ignore[no-untyped-def]
    job = pipeline_run["job"]
    assert job["status"] == "succeeded", job
    print(f"pipeline recovered and finished {pipeline_run['recovered_in']:.1f}s after kill -9")
    assert job["attempt"] == 2
    assert [(s["name"], s["status"], s["attempts"]) for s in job["stages"]] == [
        ("affinity", "succeeded", 1),
        ("grouping", "succeeded", 1),
        ("training", "succeeded", 2),
    ]
    messages = [e["message"] for e in _events(api, key, job["id"])]
    assert Counter(messages)["job succeeded"] == 1
    for stage in ("affinity", "grouping", "training"):
        assert sum(m.startswith(f"stage {stage} finished") for m in messages) == 1, stage
    assert any(m.startswith("resuming after finished stage(s): affinity, grouping") for m in messages), messages
    assert any(pipeline_run["killed_owner"] in m and "requeued" in m for m in messages), messages
    # No duplicate artifacts: one row per (stage, name), and every stored object is referenced once by content.
    from shared.db.models import Adapter, Artifact, Ensemble
    from shared.db.session import session_scope
    from shared.storage import ArtifactStore

    with session_scope() as session:
        arts = session.scalars(select(Artifact).where(Artifact.job_id == job["id"])).all()
        adapters = session.scalars(select(Adapter).where(Adapter.job_id == job["id"])).all()
        ensembles = session.scalars(select(Ensemble).where(Ensemble.job_id == job["id"])).all()
        pairs = [(a.stage, a.name) for a in arts]
        paths = {a.path for a in arts}
    assert len(pairs) == len(set(pairs))
    assert set(job["result_artifacts"].values()) == {a.id for a in arts}
    store = ArtifactStore()
    assert all(store.resolve(p).exists() for p in paths)
    names = sorted(a.name for a in adapters)
    assert "group_0" in names and "group_1" in names and len(names) == len(set(names))
    assert sorted(e.name for e in ensembles) == ["chorus", "chorus-single"]
    main = next(e for e in ensembles if e.name == "chorus")
    assert set(main.members.values()) <= {a.id for a in adapters} and main.members


def test_pipeline_outputs_are_downloadable_and_owner_scoped(api, key, make_key, pipeline_run):  # type: ignore[no-untyped-def]
    job = pipeline_run["job"]
    arts = job["result_artifacts"]
    assert {"affinity", "groups", "ensemble", "pipeline_report", "affinity_heatmap", "groups_heatmap"} <= set(arts)
    affinity = api.get(f"/v1/artifacts/{arts['affinity']}/content", headers=auth(key)).json()
    assert affinity["tasks"] == PIPELINE["tasks"] and len(affinity["matrix"]) == 3
    report = api.get(f"/v1/artifacts/{arts['pipeline_report']}/content", headers=auth(key)).json()
    assert set(report["tasks"]) == set(PIPELINE["tasks"]) and report["split"] == "test"
    # the report's accuracy columns re-score from the job's predictions artifact (per-row labels and predictions)
    name = next(n for n in arts if n.split("/")[-1] == "predictions")
    preds = api.get(f"/v1/artifacts/{arts[name]}/content", headers=auth(key)).json()["test"]
    for task, row in report["tasks"].items():
        labels = preds[task]["labels"]
        assert len(labels) == PIPELINE["max_test"] and set(row) == set(preds[task]["columns"]) >= {"ensemble", "single"}
        for col, pred in preds[task]["columns"].items():
            assert row[col] == pytest.approx(sum(p == y for p, y in zip(pred, labels, strict=True)) / len(labels)), (
                task,
                col,
            )
    adapters = api.get("/v1/adapters", headers=auth(key), params={"job_id": job["id"]}).json()["data"]
    group0 = next(a for a in adapters if a["name"] == "group_0")
    tgz = api.get(f"/v1/adapters/{group0['id']}/content", headers=auth(key))
    assert tgz.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(tgz.content), mode="r:gz") as tar:
        members = set(tar.getnames())
    assert {"group_0/adapter_config.json", "group_0/adapter_model.safetensors"} <= members, members
    assert not any(m.endswith((".bin", ".pt", ".pth", ".pkl")) for m in members)
    again = api.get(f"/v1/adapters/{group0['id']}/content", headers=auth(key))
    assert again.content == tgz.content  # deterministic archive
    zipped = api.get(f"/v1/adapters/{group0['id']}/content", headers=auth(key), params={"format": "zip"})
    assert "group_0/adapter_config.json" in zipfile.ZipFile(io.BytesIO(zipped.content)).namelist()
    ensembles = api.get("/v1/ensembles", headers=auth(key), params={"job_id": job["id"]}).json()["data"]
    chorus = next(e for e in ensembles if e["name"] == "chorus")
    manifest = api.get(f"/v1/ensembles/{chorus['id']}/content", headers=auth(key))
    assert json.loads(manifest.content)["name"] == "chorus"
    # Owner isolation for adapters, ensembles and pipeline artifacts too.
    other = make_key(f"other-{uuid.uuid4().hex[:6]}")
    for url in [
        f"/v1/adapters/{group0['id']}",
        f"/v1/adapters/{group0['id']}/content",
        f"/v1/ensembles/{chorus['id']}",
        f"/v1/ensembles/{chorus['id']}/content",
        f"/v1/artifacts/{arts['groups']}/content",
        f"/v1/jobs/{job['id']}",
    ]:
        assert api.get(url, headers=auth(key)).status_code == 200, url
        assert api.get(url, headers=auth(other)).status_code == 404, url
    assert api.get("/v1/adapters", headers=auth(other)).json()["data"] == []
    assert api.get("/v1/ensembles", headers=auth(other)).json()["data"] == []
    training = api.post(
        "/v1/jobs", headers=auth(other), json={"type": "training", "params": {"groups": arts["groups"]}}
    )
    assert training.status_code == 422 and training.json()["error"]["param"] == "params.groups"
