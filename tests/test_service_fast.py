"""The job service in the fast loop, on the embedded defaults (SQLite job database, kombu's SQLAlchemy broker
on SQLite): the real API (create_app), the runner in-process, a real `chorus worker` subprocess, the reaper,
the Python client over HTTP to a uvicorn server, job time limits, the JSON body cap and the per-owner quota.

Jobs run in-process are sent to a queue no worker reads (`parked`), so the worker subprocess of the later
tests only ever sees the jobs meant for it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.bad_input_apps import auth, embedded_home, job_api, store_state
from tests.integration.conftest import TERMINAL, Worker, wait_for

# Short leases and sweeps so a lost worker is noticed in seconds; everything else is the production code.
SERVICE_ENV = {
    "CHORUS_LEASE_SECONDS": "3",
    "CHORUS_REAP_INTERVAL": "1",
    "CHORUS_PROGRESS_INTERVAL": "0.2",
    "CHORUS_EVENT_INTERVAL": "0.5",
    "CHORUS_CANCEL_GRACE_SECONDS": "30",
    "CHORUS_AUTH_CACHE_SECONDS": "0",
    "CHORUS_QUEUE": "chorus",
}
TASKS4 = ["cb", "rte", "copa", "wic"]
AFFINITY = {
    "tasks": TASKS4,
    "matrix": [[0.9, 0.8, 0.1, 0.2], [0.8, 0.9, 0.2, 0.1], [0.1, 0.2, 0.9, 0.8], [0.2, 0.1, 0.8, 0.9]],
}
GROUPING = {"affinity": AFFINITY, "groups": 2, "method": "sdp"}
SMALL_EVAL = {"model": "tiny-llama", "tasks": ["cb", "rte"], "max_examples": 4, "batch_size": 4}
# Runs for minutes on tiny-llama (batch 1, every test row, ~5000 rows): stopped long before that.
# the training split (about 26k rows at batch 1): well past SOFT_LIMIT even on an idle machine (the test split took
# 11 s there and the job succeeded)
LONG_EVAL = {
    "model": "tiny-llama",
    "tasks": ["sst2", "mr", "subj", "cr"],
    "split": "train",
    "batch_size": 1,
    "max_length": 64,
}
SOFT_LIMIT = 25  # seconds: the forked job process imports the ML core and starts the stage well within it
TRAINING = {
    "model": "tiny-llama",
    "quantization": "none",
    "groups": [["cb"], ["rte"]],
    "epochs": 1,
    "max_train": 8,
    "max_val": 4,
    "max_test": 4,
    "batch_size": 4,
    "eval_batch_size": 8,
    "rank": 2,
    "max_length": 64,
    "seed": 0,
    "boosting": {"enabled": False},
    "baselines": {"single": False},
    "zero_shot": False,
}


def _clear_service_caches() -> None:
    from services.api.key_cache import key_cache
    from shared.jobs.config import get_service_settings

    get_service_settings.cache_clear()
    key_cache.clear()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh CHORUS_HOME on the embedded defaults (no DATABASE_URL / BROKER_URL) with short leases."""
    with embedded_home(tmp_path_factory.mktemp("service-home"), **SERVICE_ENV) as path:
        from shared.config import get_settings

        assert get_settings().db_url.startswith("sqlite:///") and get_settings().celery_broker_url.startswith(
            "sqla+sqlite:///"
        )
        yield path


@pytest.fixture(scope="module")
def api(home: Path) -> Iterator[TestClient]:
    with TestClient(job_api(rate_limit_enabled=False), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def keys(home: Path) -> dict[str, str]:
    from shared.db.keys import create_key
    from shared.db.session import session_scope

    with session_scope() as session:
        return {
            "alice": create_key(session, "alice", ["submit"], "test alice")[1],
            "bob": create_key(session, "bob", ["submit"], "test bob")[1],
            "admin": create_key(session, "root", ["admin"], "test admin")[1],
        }


@pytest.fixture
def parked(monkeypatch: pytest.MonkeyPatch, home: Path) -> Iterator[None]:
    """Jobs created (or re-sent) during the test go to a queue that no worker reads."""
    monkeypatch.setenv("CHORUS_QUEUE", "parked")
    _clear_service_caches()
    yield
    monkeypatch.setenv("CHORUS_QUEUE", "chorus")
    _clear_service_caches()


def _submit(api: TestClient, key: str, type_: str, params: dict[str, Any]) -> dict[str, Any]:
    r = api.post("/v1/jobs", headers=auth(key), json={"type": type_, "params": params})
    assert r.status_code == 201, r.text
    return r.json()


def _job(api: TestClient, key: str, job_id: str) -> dict[str, Any]:
    r = api.get(f"/v1/jobs/{job_id}", headers=auth(key))
    assert r.status_code == 200, r.text
    return r.json()


def _events(api: TestClient, key: str, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after: int | None = None
    while True:
        page = api.get(
            f"/v1/jobs/{job_id}/events",
            headers=auth(key),
            params={"limit": 7, **({"after": after} if after is not None else {})},
        ).json()
        out += page["data"]
        if not page["has_more"]:
            return out
        after = page["last_id"]


def _messages(api: TestClient, key: str, job_id: str) -> list[str]:
    return [e["message"] for e in _events(api, key, job_id)]


def _wait_done(api: TestClient, key: str, job_id: str, timeout: float = 240) -> dict[str, Any]:
    return wait_for(
        lambda: (j := _job(api, key, job_id))["status"] in TERMINAL and j, timeout, 0.3, f"{job_id} to finish"
    )


def _db_job(job_id: str) -> Any:
    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def _run(job_id: str) -> dict[str, Any]:
    from shared.jobs.runner import run_job

    return run_job(job_id)


# -- the runner in-process --------------------------------------------------------------------------
def test_grouping_job_runs_to_success_with_events_and_artifacts(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    key = keys["alice"]
    job = _submit(api, key, "grouping", GROUPING)
    assert job["status"] == "queued" and job["attempt"] == 0 and job["params"]["affinity"].startswith("art-")
    assert _run(job["id"])["outcome"] == "succeeded"
    done = _job(api, key, job["id"])
    assert done["status"] == "succeeded" and done["attempt"] == 1 and done["error"] is None
    assert done["progress"]["percent"] == 100.0 and done["finished_at"] is not None
    assert [(s["name"], s["status"], s["attempts"]) for s in done["stages"]] == [("grouping", "succeeded", 1)]
    messages = _messages(api, key, job["id"])
    assert messages[0] == "job created (grouping)" and messages[-1] == "job succeeded"
    assert "stage grouping started (1/1)" in messages and "stage grouping finished (2 artifact(s))" in messages
    listed = api.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth(key)).json()["data"]
    assert {a["name"] for a in listed} == {"groups", "groups_heatmap"} and all(a["stage"] == "grouping" for a in listed)
    assert {a["id"] for a in listed} == set(done["result_artifacts"].values())
    groups_id = done["result_artifacts"]["groups"]
    meta = api.get(f"/v1/artifacts/{groups_id}", headers=auth(key)).json()
    content = api.get(f"/v1/artifacts/{groups_id}/content", headers=auth(key))
    assert content.status_code == 200 and content.headers["x-content-sha256"] == meta["sha256"]
    assert sorted(sorted(g) for g in content.json()["groups"]) == [["cb", "rte"], ["copa", "wic"]]
    png = api.get(f"/v1/artifacts/{done['result_artifacts']['groups_heatmap']}/content", headers=auth(key))
    assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # Another owner sees none of it.
    for url in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/events", f"/v1/artifacts/{groups_id}/content"):
        assert api.get(url, headers=auth(keys["bob"])).status_code == 404, url
    # A second delivery of the message finds the job finished and changes nothing; it cannot be cancelled.
    assert _run(job["id"]) == {"job_id": job["id"], "outcome": "terminal", "status": "succeeded"}
    assert _messages(api, key, job["id"]) == messages
    refused = api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key))
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "invalid_state"


def test_bad_inline_matrix_fails_the_job_with_a_clear_error(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    key = keys["alice"]
    job = _submit(api, key, "grouping", {"affinity": {"tasks": TASKS4, "matrix": [[1.0]]}, "groups": 2})
    assert _run(job["id"])["outcome"] == "failed"
    failed = _job(api, key, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_params"
    assert "matrix" in failed["error"]["message"] and failed["stages"][0]["status"] == "failed"
    assert _messages(api, key, job["id"])[-1].startswith("failed: ")
    assert api.get(f"/v1/jobs/{job['id']}/artifacts", headers=auth(key)).json()["data"] == []


@pytest.mark.needs_data
def test_evaluation_job_on_tiny_llama(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    key = keys["alice"]
    job = _submit(api, key, "evaluation", SMALL_EVAL)
    assert _run(job["id"])["outcome"] == "succeeded"
    done = _job(api, key, job["id"])
    assert done["status"] == "succeeded", done
    report = api.get(f"/v1/artifacts/{done['result_artifacts']['report']}/content", headers=auth(key)).json()
    assert set(report["tasks"]) == {"cb", "rte"} and report["tasks"]["cb"]["n"] == 4
    assert done["result"]["stages"]["evaluation"]["report"]["tasks"] == report["tasks"]
    messages = _messages(api, key, job["id"])
    assert any(m.startswith("evaluate cb: ") for m in messages), messages


@pytest.mark.needs_data
def test_training_job_with_explicit_groups(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    key = keys["alice"]
    missing = api.post("/v1/jobs", headers=auth(key), json={"type": "training", "params": {"model": "tiny-llama"}})
    assert missing.status_code == 422 and missing.json()["error"]["param"] == "params.groups"
    job = _submit(api, key, "training", TRAINING)
    assert job["params"]["groups"] == TRAINING["groups"]
    assert _run(job["id"])["outcome"] == "succeeded"
    done = _job(api, key, job["id"])
    assert done["status"] == "succeeded", done
    arts = done["result_artifacts"]
    assert {"ensemble", "predictions"} <= set(arts), arts
    adapters = api.get("/v1/adapters", headers=auth(key), params={"job_id": job["id"]}).json()["data"]
    names = sorted(a["name"] for a in adapters)
    assert "group_0" in names and "group_1" in names, names
    group0 = next(a for a in adapters if a["name"] == "group_0")
    tgz = api.get(f"/v1/adapters/{group0['id']}/content", headers=auth(key))
    with tarfile.open(fileobj=io.BytesIO(tgz.content), mode="r:gz") as tar:
        assert {"group_0/adapter_config.json", "group_0/adapter_model.safetensors"} <= set(tar.getnames())
    ensembles = api.get("/v1/ensembles", headers=auth(key), params={"job_id": job["id"]}).json()["data"]
    chorus = next(e for e in ensembles if e["name"] == "chorus")
    manifest = json.loads(api.get(f"/v1/ensembles/{chorus['id']}/content", headers=auth(key)).content)
    assert manifest["name"] == "chorus"
    assert set(done["result"]["stages"]["training"]["report"]["tasks"]) == {"cb", "rte"}


def test_celery_task_body_runs_the_job(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    """The worker's task (services/worker/tasks.py) applied in this process: the same runner, no hard stop
    outside a pool child, and fan-out helpers are only sent when there are any."""
    from services.worker.tasks import dispatch_shards, run_job

    key = keys["alice"]
    job = _submit(api, key, "grouping", GROUPING)
    assert run_job.apply(args=[job["id"]]).get() == {"job_id": job["id"], "outcome": "succeeded"}
    assert _job(api, key, job["id"])["status"] == "succeeded"
    assert run_job.apply(args=[job["id"]]).get()["outcome"] == "terminal"
    dispatch_shards(job["id"], "gradients", 0)  # nothing to send (no broker call)


# -- cancel and the reaper --------------------------------------------------------------------------
@pytest.mark.needs_data
def test_cooperative_cancel_of_a_running_job(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    key = keys["alice"]
    job = _submit(api, key, "evaluation", LONG_EVAL)
    outcome: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: outcome.update(_run(job["id"])), daemon=True)
    runner.start()
    wait_for(
        lambda: any((e.get("data") or {}).get("type") == "progress" for e in _events(api, key, job["id"])),
        120,
        0.2,
        "the first progress report",
    )
    cancelled = api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)).json()
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None
    runner.join(timeout=120)
    assert not runner.is_alive() and outcome["outcome"] == "cancelled"
    final = _job(api, key, job["id"])
    assert final["status"] == "cancelled" and final["stages"][0]["status"] == "cancelled"
    messages = _messages(api, key, job["id"])
    assert "cancelled by request while running" in messages
    assert "worker stopped stage evaluation after cancellation" in messages
    assert "job succeeded" not in messages and _db_job(job["id"]).lease_owner is None
    # Cancelling again returns the cancelled job.
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(key)).json()["status"] == "cancelled"


def test_reaper_requeues_an_expired_lease_and_gives_up_after_max_attempts(api, keys, parked, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from services.worker.celery_app import enqueue
    from shared.db.session import session_scope
    from shared.jobs import state
    from shared.jobs.reaper import reap

    monkeypatch.setenv("CHORUS_MAX_ATTEMPTS", "2")
    _clear_service_caches()
    key = keys["alice"]
    job = _submit(api, key, "grouping", GROUPING)
    first_task = _db_job(job["id"]).task_id

    def sweep() -> dict[str, list[str]] | None:
        report = reap(enqueue)
        return report if report["requeued"] or report["failed"] else None

    for attempt in (1, 2):
        token = f"gone-host:1:lost{attempt}"  # a worker on another machine that stopped renewing
        with session_scope() as session:
            assert state.claim(session, job["id"], token, 0.2, 2).outcome == "claimed"
        assert _job(api, key, job["id"])["status"] == "running"
        assert reap(enqueue)["requeued"] == []  # the lease is still valid: nothing to do
        report = wait_for(sweep, 30, 0.1, "the lease to expire")
        if attempt == 1:
            assert report["requeued"] == [job["id"]] and report["failed"] == []
            row = _db_job(job["id"])
            assert row.status == "queued" and row.lease_owner is None and row.attempt == 1
            # The requeued job was handed to the broker again in the same sweep (a new message).
            assert row.enqueued_at is not None and row.task_id not in (None, first_task)
        else:
            assert report["failed"] == [job["id"]] and report["requeued"] == []
    failed = _job(api, key, job["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
    assert "max_attempts=2" in failed["error"]["message"]
    messages = _messages(api, key, job["id"])
    assert "worker gone-host:1:lost1 stopped renewing its lease; requeued" in messages
    assert "worker gone-host:1:lost2 stopped renewing its lease; giving up" in messages


def test_a_requeued_job_runs_again_and_succeeds(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    from services.worker.celery_app import enqueue
    from shared.db.session import session_scope
    from shared.jobs import state
    from shared.jobs.reaper import reap

    key = keys["alice"]
    job = _submit(api, key, "grouping", GROUPING)
    with session_scope() as session:
        assert state.claim(session, job["id"], "gone-host:1:lost", 0.2, 3).outcome == "claimed"
    wait_for(lambda: reap(enqueue)["requeued"], 30, 0.1, "the lease to expire")
    assert _run(job["id"])["outcome"] == "succeeded"
    done = _job(api, key, job["id"])
    assert done["status"] == "succeeded" and done["attempt"] == 2
    assert done["stages"][0]["attempts"] == 1


# -- the JSON body cap and the per-owner quota ------------------------------------------------------
def test_json_body_cap_refuses_oversized_job_requests(api, keys, parked, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("CHORUS_MAX_JSON_BYTES", "4096")
    _clear_service_caches()
    key = keys["alice"]
    before = store_state()
    big = {"type": "grouping", "params": GROUPING, "metadata": {"note": "x" * 5000}}
    declared = api.post("/v1/jobs", headers=auth(key), json=big)
    assert declared.status_code == 413, declared.text
    assert declared.json()["error"] == {
        "code": "payload_too_large",
        "message": "request body is over the 4,096-byte limit",
        "param": None,
    }
    body = json.dumps(big).encode()
    streamed = api.post(
        "/v1/jobs", headers={**auth(key), "content-type": "application/json"}, content=iter([body[:3000], body[3000:]])
    )  # chunked: no Content-Length
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"
    assert store_state() == before  # nothing was written
    small = api.post("/v1/jobs", headers=auth(key), json={**big, "metadata": {"note": "x" * 100}})
    assert small.status_code == 201, small.text
    api.post(f"/v1/jobs/{small.json()['id']}/cancel", headers=auth(key))


def test_active_job_quota_per_owner(api, keys, parked, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from shared.db.keys import create_key
    from shared.db.session import session_scope

    with session_scope() as session:
        carol = create_key(session, "carol", ["submit"], "test carol")[1]
        dave = create_key(session, "dave", ["submit"], "test dave")[1]
    monkeypatch.setenv("CHORUS_MAX_ACTIVE_JOBS", "2")
    _clear_service_caches()
    first, second = (_submit(api, carol, "grouping", GROUPING) for _ in range(2))
    before = store_state()
    over = api.post("/v1/jobs", headers=auth(carol), json={"type": "grouping", "params": GROUPING})
    assert over.status_code == 429, over.text
    error = over.json()["error"]
    assert error["code"] == "quota_exceeded" and "limit 2" in error["message"] and "retry-after" not in over.headers
    assert store_state() == before  # the inline affinity of a refused job is not stored either
    assert _submit(api, dave, "grouping", GROUPING)["status"] == "queued"  # per owner
    # A finished or cancelled job frees its slot.
    assert api.post(f"/v1/jobs/{first['id']}/cancel", headers=auth(carol)).json()["status"] == "cancelled"
    third = _submit(api, carol, "grouping", GROUPING)
    assert _run(second["id"])["outcome"] == "succeeded"
    fourth = _submit(api, carol, "grouping", GROUPING)
    for job in (third, fourth):
        api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(carol))
    assert api.post(f"/v1/jobs/{second['id']}/cancel", headers=auth(carol)).status_code == 409


# -- the Python client over HTTP --------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[str]:
    """The job API served by uvicorn on 127.0.0.1 in a thread of this process."""
    import uvicorn

    port = _free_port()
    srv = uvicorn.Server(
        uvicorn.Config(
            job_api(rate_limit_enabled=False), host="127.0.0.1", port=port, log_level="warning", lifespan="on"
        )
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_for(lambda: srv.started, 30, 0.05, "uvicorn to start")
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=30)


def test_python_client_against_the_real_api(server, keys, parked, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from services.client import ChorusError, Client

    with Client(server, keys["admin"]) as admin:
        created = admin.create_key("erin", ["submit"], "client test")
        assert created["key"].startswith("chorus_") and created["owner"] == "erin"
    with Client(server, created["key"]) as client:
        types = {t["name"]: t for t in client.job_types()}
        assert types["grouping"]["available"] and "evaluation" in types
        job = client.create_job("grouping", GROUPING, metadata={"run": "1"}, idempotency_key="client-1")
        again = client.create_job("grouping", GROUPING, metadata={"run": "1"}, idempotency_key="client-1")
        assert again["id"] == job["id"]
        with pytest.raises(ChorusError) as reused:
            client.create_job("grouping", GROUPING, metadata={"run": "2"}, idempotency_key="client-1")
        assert reused.value.status == 422 and reused.value.code == "idempotency_key_reused"
        with pytest.raises(ChorusError) as bad:
            client.create_job("evaluation", {**SMALL_EVAL, "tasks": ["no_such_task"]})
        assert bad.value.status == 422 and bad.value.param == "params.tasks"
        with pytest.raises(ChorusError) as missing:
            client.get_job("job-does-not-exist")
        assert missing.value.status == 404 and missing.value.code == "not_found"
        assert _run(job["id"])["outcome"] == "succeeded"
        done = client.wait(job["id"], timeout=30, poll=0.1)
        assert done["status"] == "succeeded" and done["metadata"] == {"run": "1"}
        followed = [e["message"] for e in client.follow(job["id"], poll=0.1)]
        assert followed[0] == "job created (grouping)" and followed[-1] == "job succeeded"
        assert [j["id"] for j in client.iter_jobs(status="succeeded")] == [job["id"]]
        arts = client.job_artifacts(job["id"])
        assert {a["name"] for a in arts} == {"groups", "groups_heatmap"}
        groups_id = done["result_artifacts"]["groups"]
        path = client.download_artifact(groups_id, tmp_path / "groups.json")
        assert json.loads(path.read_text())["m"] == 2
        assert client.get_artifact(groups_id)["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        results = client.download_results(job["id"], tmp_path / "results")
        assert set(results) == {"groups", "groups_heatmap"} and results["groups_heatmap"].read_bytes()[:4] == b"\x89PNG"
        with pytest.raises(ChorusError) as finished:
            client.cancel(job["id"])
        assert finished.value.status == 409 and finished.value.code == "invalid_state"
        queued = client.create_job("grouping", GROUPING)
        assert client.cancel(queued["id"])["status"] == "cancelled"
        assert _run(queued["id"])["outcome"] == "terminal"  # a cancelled job's message does nothing
        rows = tmp_path / "reviews.jsonl"
        rows.write_text(
            "".join(json.dumps({"text": f"review {i}", "label": "pos" if i % 2 else "neg"}) + "\n" for i in range(20))
        )
        dataset = client.upload_dataset(rows, "reviews", "text", "label")
        assert dataset["num_rows"] == 20 and [d["id"] for d in client.list_datasets()["data"]] == [dataset["id"]]
        assert client.delete_dataset(dataset["id"])["deleted"] is True
    with Client(server, keys["admin"]) as admin:
        admin.revoke_key(created["id"])
    with Client(server, created["key"]) as client, pytest.raises(ChorusError) as revoked:
        client.list_jobs()
    assert revoked.value.status == 401


# -- a real worker subprocess on the embedded broker ------------------------------------------------
@pytest.fixture(scope="module")
def worker(home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """`chorus worker` on this home's SQLite database and broker (the process inherits CHORUS_HOME)."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    env["CHORUS_QUEUE"] = "chorus"
    assert env["CHORUS_HOME"] == str(home)
    proc = Worker(env, tmp_path_factory.mktemp("worker") / "worker.log", "fast")
    try:
        yield proc.wait_ready(120)
    finally:
        proc.stop()


def test_worker_runs_a_job_from_the_embedded_broker(api, keys, worker) -> None:  # type: ignore[no-untyped-def]
    key = keys["bob"]
    job = _submit(api, key, "grouping", GROUPING)
    done = _wait_done(api, key, job["id"], 120)
    assert done["status"] == "succeeded", (done, worker.text()[-3000:])
    assert done["attempt"] == 1 and [s["status"] for s in done["stages"]] == ["succeeded"]
    assert _messages(api, key, job["id"])[-1] == "job succeeded"
    assert "parent is free of torch" in worker.text()
    # A redelivered message is a no-op in the worker too.
    from services.worker.celery_app import enqueue

    enqueue(job["id"])
    wait_for(lambda: f"job {job['id']} not run: terminal succeeded" in worker.text(), 60, 0.2, "the duplicate")


@pytest.mark.needs_data
def test_worker_enforces_the_job_time_limit(api, keys, worker, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A job running past its soft time limit fails as `timeout`. The limit (CHORUS_JOB_TIME_LIMIT, at least a
    minute) is carried per message here, as Celery allows, so that the test takes seconds."""
    from services.worker import celery_app as worker_module

    key = keys["bob"]
    monkeypatch.setenv("CHORUS_QUEUE", "parked")  # the API's own message goes where the worker does not look
    _clear_service_caches()
    job = _submit(api, key, "evaluation", LONG_EVAL)
    monkeypatch.setenv("CHORUS_QUEUE", "chorus")
    _clear_service_caches()
    worker_module.celery_app.send_task(
        worker_module.RUN_JOB, args=[job["id"]], queue="chorus", soft_time_limit=SOFT_LIMIT, time_limit=SOFT_LIMIT + 60
    )
    done = _wait_done(api, key, job["id"], 180)
    assert done["status"] == "failed", (done, worker.text()[-3000:])
    assert done["error"]["code"] == "timeout"
    assert done["error"]["message"] == "stage evaluation exceeded the job time limit"
    assert done["stages"][0]["status"] == "failed"
    assert "job succeeded" not in _messages(api, key, job["id"])


def test_time_limit_before_the_stage_starts_fails_the_job(api, keys, worker, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from services.worker import celery_app as worker_module

    key = keys["bob"]
    monkeypatch.setenv("CHORUS_QUEUE", "parked")
    _clear_service_caches()
    job = _submit(api, key, "grouping", GROUPING)
    monkeypatch.setenv("CHORUS_QUEUE", "chorus")
    _clear_service_caches()
    # Far shorter than importing the grouping stage (cvxpy, sklearn, matplotlib) in the fresh job process, and
    # longer than the runner import and claim before it (under load 0.5 s sometimes fired before the claim).
    worker_module.celery_app.send_task(
        worker_module.RUN_JOB, args=[job["id"]], queue="chorus", soft_time_limit=1.5, time_limit=60
    )
    done = _wait_done(api, key, job["id"], 120)
    assert (done["status"], (done["error"] or {}).get("code"), done["attempt"]) == ("failed", "timeout", 1), (
        done,
        _messages(api, key, job["id"]),
        worker.text()[-4000:],
    )
