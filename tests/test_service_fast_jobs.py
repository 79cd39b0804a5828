"""More of the job service in the fast loop, on the embedded stack of tests/test_service_fast.py (SQLite job
database, kombu's SQLAlchemy broker, the real API, runner, reaper and Celery tasks): list and event paging,
cancelling queued, running and multi-stage jobs, the cancel grace period, time limits, stage failures,
resuming after a killed worker, the reaper's sends and re-sends, a broker that is down, and an embedded Celery
worker (celery.contrib.testing) running the real tasks with the reaper in its timer.

The stages come from `flow`, a multi-stage job type defined here (as a plug-in would be): each step writes an
artifact, waits for a gate file (reporting progress or not), or fails in a chosen way."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import BadInput
from tests.bad_input_apps import auth, embedded_home, job_api
from tests.integration.conftest import wait_for
from tests.test_service_fast import (
    GROUPING,
    SERVICE_ENV,
    _clear_service_caches,
    _db_job,
    _events,
    _free_port,
    _job,
    _messages,
    _run,
    _submit,
    _wait_done,
)

GATE_TIMEOUT = 120.0  # seconds a waiting step waits for its gate before it fails the test


# -- the `flow` job type ----------------------------------------------------------------------------
class FlowStep(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=40)
    # write: write <name>.json (what it saw of earlier stages); wait: report progress until the gate opens,
    # then write; stubborn: wait for the gate without reporting progress, then write; quiet: as stubborn, and
    # write without reporting progress either; the others fail.
    do: Literal["write", "wait", "stubborn", "quiet", "fail", "bad_input", "not_a_dict", "no_output"] = "write"


class FlowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: list[FlowStep] = Field(min_length=1)
    gate: str = Field("", description="The file whose existence releases the waiting steps.")
    load_seconds: float = Field(0.0, ge=0, le=120, description="How long building the stage list takes.")


def flow_stages(params: FlowParams) -> list[tuple[str, Any]]:
    """The stages of a flow job. Building them takes `load_seconds` (a stage module that is slow to import);
    a step name with a slash is refused here, after the params were validated at submit."""
    deadline = time.monotonic() + params.load_seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
    if any("/" in step.name for step in params.steps):
        raise ValueError("a step name may not contain '/'")
    gate = Path(params.gate) if params.gate else None
    return [(step.name, partial(_step, step, gate)) for step in params.steps]


def _step(step: FlowStep, gate: Path | None, workdir: Path, inputs: dict[str, Path], progress: Any) -> Any:
    if step.do == "fail":
        raise ValueError("boom")
    if step.do == "bad_input":
        raise BadInput(f"{step.name}: row 3 has no label", param="params.steps")
    if step.do == "not_a_dict":
        return [step.name]
    if step.do == "no_output":
        return {"artifacts": {step.name: "missing.json"}}
    if step.do in ("wait", "stubborn", "quiet"):
        deadline = time.monotonic() + GATE_TIMEOUT
        while not (gate is not None and gate.exists()):
            if step.do == "wait":
                progress(step.name, 0, 1, "waiting for the gate")
            if time.monotonic() > deadline:
                raise RuntimeError(f"step {step.name}: the gate never opened")
            time.sleep(0.05)
    seen = {name: path.read_text() for name, path in sorted(inputs.items()) if "/" not in name}
    (workdir / f"{step.name}.json").write_text(json.dumps({"job": workdir.name, "step": step.name, "seen": seen}))
    if step.do != "quiet":
        progress(step.name, 1, 1, "written")
    return {"seen": sorted(seen), "artifacts": {step.name: f"{step.name}.json"}}


def _flow_type(name: str = "flow", params: str = "FlowParams", run: str = "flow_stages") -> Any:
    from shared.jobs.registry import JobType

    module = "tests.test_service_fast_jobs"
    return JobType(name, "Steps that write, wait or fail (tests).", f"{module}:{params}", f"{module}:{run}", True)


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh CHORUS_HOME on the embedded defaults with short leases, and the `flow` job type registered."""
    from shared.jobs.registry import JOB_TYPES

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(JOB_TYPES, "flow", _flow_type())
        with embedded_home(tmp_path_factory.mktemp("service-jobs-home"), **SERVICE_ENV) as path:
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
            owner: create_key(session, owner, [scope], f"test {owner}")[1]
            for owner, scope in (("frank", "submit"), ("grace", "submit"), ("pager", "submit"), ("root", "admin"))
        }


@pytest.fixture
def parked(monkeypatch: pytest.MonkeyPatch, home: Path) -> Iterator[None]:
    """Jobs created (or re-sent) during the test go to a queue that no worker reads."""
    monkeypatch.setenv("CHORUS_QUEUE", "parked")
    _clear_service_caches()
    yield
    monkeypatch.setenv("CHORUS_QUEUE", "chorus")
    _clear_service_caches()


def _flow(api: TestClient, key: str, steps: list[tuple[str, str]], **params: Any) -> str:
    job = _submit(api, key, "flow", {"steps": [{"name": n, "do": d} for n, d in steps], **params})
    return str(job["id"])


def _stages(job: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(s["name"], s["status"], s["attempts"]) for s in job["stages"]]


def _db_messages(job_id: str) -> list[str]:
    """The job's event messages read from the database (safe from any thread)."""
    from sqlalchemy import select

    from shared.db.models import JobEvent
    from shared.db.session import session_scope

    with session_scope() as session:
        return list(session.scalars(select(JobEvent.message).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))


def _wait_message(job_id: str, message: str, timeout: float = 60) -> None:
    wait_for(lambda: message in _db_messages(job_id), timeout, 0.05, f"{message!r} in {job_id}")


def _in_thread(job_id: str, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    from shared.jobs.runner import run_job

    outcome: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: outcome.update(run_job(job_id, **kwargs)), daemon=True)
    thread.start()
    return thread, outcome


def _cancel(api: TestClient, key: str, job_id: str) -> dict[str, Any]:
    r = api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(key))
    assert r.status_code == 200, r.text
    return dict(r.json())


# -- paging -----------------------------------------------------------------------------------------
def test_jobs_and_events_page_with_after_and_limit(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    key = keys["pager"]
    created = [_submit(api, key, "grouping", GROUPING)["id"] for _ in range(5)]
    newest_first = created[::-1]
    pages, after = [], None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"after": after} if after else {})}
        page = api.get("/v1/jobs", headers=auth(key), params=params).json()
        ids = [j["id"] for j in page["data"]]
        assert (page["first_id"], page["last_id"]) == (ids[0], ids[-1])
        pages.append((ids, page["has_more"]))
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == [(newest_first[:2], True), (newest_first[2:4], True), (newest_first[4:], False)]
    # Filters: a cancelled job leaves the queued list; a type with no jobs gives an empty page.
    _cancel(api, key, created[2])
    by = {
        s: [j["id"] for j in api.get("/v1/jobs", headers=auth(key), params={"status": s}).json()["data"]]
        for s in ("queued", "cancelled", "running")
    }
    assert by == {"queued": [i for i in newest_first if i != created[2]], "cancelled": [created[2]], "running": []}
    typed = api.get("/v1/jobs", headers=auth(key), params={"type": "grouping", "limit": 1}).json()
    assert [j["id"] for j in typed["data"]] == newest_first[:1] and typed["has_more"] is True
    empty = api.get("/v1/jobs", headers=auth(key), params={"type": "flow"}).json()
    assert empty == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
    # The cursor must be a job the caller can see: another owner's job and an unknown id are refused.
    other = _submit(api, keys["frank"], "grouping", GROUPING)["id"]
    for cursor in (other, "job-" + "0" * 24):
        refused = api.get("/v1/jobs", headers=auth(key), params={"after": cursor})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "after", refused.text
    for bad in ({"after": "not-a-cursor"}, {"limit": 0}, {"limit": 101}):
        assert api.get("/v1/jobs", headers=auth(key), params=bad).status_code == 422, bad
    # An admin key lists every owner's jobs and may page from any of them.
    admin = api.get("/v1/jobs", headers=auth(keys["root"]), params={"after": created[1], "limit": 100}).json()
    assert [j["id"] for j in admin["data"]][:1] == [created[0]] and other not in [j["id"] for j in admin["data"]]
    # Events oldest first, one per page; `after` the last one gives an empty page.
    events, after_id = [], None
    while True:
        params = {"limit": 1, **({"after": after_id} if after_id is not None else {})}
        page = api.get(f"/v1/jobs/{created[2]}/events", headers=auth(key), params=params).json()
        events += page["data"]
        assert len(page["data"]) == 1
        if not page["has_more"]:
            break
        after_id = page["last_id"]
    assert [e["message"] for e in events] == ["job created (grouping)", "cancelled by request"]
    assert [e["level"] for e in events] == ["info", "warning"] and events[0]["id"] < events[1]["id"]
    tail = api.get(f"/v1/jobs/{created[2]}/events", headers=auth(key), params={"after": events[-1]["id"]}).json()
    assert tail == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
    for bad in ({"after": -1}, {"limit": 0}, {"limit": 1001}):
        assert api.get(f"/v1/jobs/{created[2]}/events", headers=auth(key), params=bad).status_code == 422, bad
    for job_id in created + [other]:
        api.post(f"/v1/jobs/{job_id}/cancel", headers=auth(keys["root"]))


# -- cancel -----------------------------------------------------------------------------------------
def test_cancelling_a_queued_job_means_it_never_runs(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    key = keys["frank"]
    job_id = _flow(api, key, [("a", "write")])
    cancelled = _cancel(api, key, job_id)
    assert cancelled["status"] == "cancelled" and cancelled["finished_at"] is not None and cancelled["stages"] == []
    assert _run(job_id) == {"job_id": job_id, "outcome": "terminal", "status": "cancelled"}
    assert _messages(api, key, job_id) == ["job created (flow)", "cancelled by request"]
    assert _cancel(api, key, job_id)["status"] == "cancelled"  # again: the same job, no new event
    assert len(_messages(api, key, job_id)) == 2


def test_cancelling_a_multi_stage_job_stops_it_in_its_second_stage(api, keys, parked, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = keys["frank"]
    job_id = _flow(api, key, [("a", "write"), ("b", "wait"), ("c", "write")], gate=str(tmp_path / "never"))
    thread, outcome = _in_thread(job_id)
    _wait_message(job_id, "b: 0/1 waiting for the gate")
    running = _job(api, key, job_id)
    assert running["status"] == "running" and running["progress"]["stage"] == "b"
    assert running["progress"]["percent"] == 33.33, running["progress"]  # stage 2 of 3, nothing done in it yet
    assert _stages(running) == [("a", "succeeded", 1), ("b", "running", 1), ("c", "pending", 0)]
    assert _run(job_id) == {"job_id": job_id, "outcome": "leased", "status": "running"}  # a second delivery
    cancelled = _cancel(api, key, job_id)
    assert cancelled["status"] == "cancelled"
    thread.join(timeout=60)
    assert not thread.is_alive() and outcome == {"job_id": job_id, "outcome": "cancelled"}
    final = _job(api, key, job_id)
    assert _stages(final) == [("a", "succeeded", 1), ("b", "cancelled", 1), ("c", "pending", 0)]
    assert final["status"] == "cancelled" and final["result"] is None
    messages = _messages(api, key, job_id)
    assert (
        "cancelled by request while running" in messages and messages[-1] == "worker stopped stage b after cancellation"
    )
    assert "stage c started (3/3)" not in messages and _db_job(job_id).lease_owner is None
    kept = api.get(f"/v1/jobs/{job_id}/artifacts", headers=auth(key)).json()["data"]
    assert [(a["name"], a["stage"]) for a in kept] == [("a", "a")]  # the finished stage's output stays


def test_a_stage_that_ignores_cancellation_is_hard_stopped_after_the_grace_period(api, keys, parked, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The lease watches for cancellation; a stage that never reports progress is stopped from outside once
    CHORUS_CANCEL_GRACE_SECONDS have passed (in the worker: the pool child exits; here: the gate opens)."""
    from shared.jobs.config import ServiceSettings

    key = keys["frank"]
    gate = tmp_path / "gate"
    job_id = _flow(api, key, [("s", "stubborn")], gate=str(gate))
    stopped: list[float] = []

    def hard_stop() -> None:
        stopped.append(time.monotonic())
        gate.touch()

    grace = 1.5
    thread, outcome = _in_thread(job_id, settings=ServiceSettings(cancel_grace_seconds=grace), hard_stop=hard_stop)
    _wait_message(job_id, "stage s started (1/1)")
    time.sleep(1.0)  # the lease renews (lease/3 = 1 s) without noticing anything
    assert stopped == [] and _job(api, key, job_id)["status"] == "running"
    cancelled_at = time.monotonic()
    _cancel(api, key, job_id)
    thread.join(timeout=60)
    assert not thread.is_alive() and outcome["outcome"] == "cancelled"
    assert len(stopped) == 1 and grace <= stopped[0] - cancelled_at < grace + 10
    final = _job(api, key, job_id)
    assert final["status"] == "cancelled" and _stages(final) == [("s", "cancelled", 1)]
    assert _messages(api, key, job_id)[-1] == "worker stopped stage s after cancellation"
    assert api.get(f"/v1/jobs/{job_id}/artifacts", headers=auth(key)).json()["data"] == []


def test_a_stage_that_returns_after_the_cancel_is_marked_cancelled(api, keys, parked, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = keys["frank"]
    gate = tmp_path / "gate"
    job_id = _flow(api, key, [("q", "quiet")], gate=str(gate))
    thread, outcome = _in_thread(job_id)
    _wait_message(job_id, "stage q started (1/1)")
    _cancel(api, key, job_id)
    gate.touch()  # the stage finishes without another progress report
    thread.join(timeout=60)
    assert not thread.is_alive() and outcome == {"job_id": job_id, "outcome": "cancelled"}
    assert api.get(f"/v1/jobs/{job_id}/artifacts", headers=auth(key)).json()["data"] == []
    assert _db_job(job_id).lease_owner is None
    assert _stages(_job(api, key, job_id)) == [("q", "cancelled", 1)]


def test_the_worker_hard_stop_exits_the_pool_child() -> None:
    """What the Celery task passes as hard_stop inside a pool child: leave the process at once (exit code 3)."""
    from services.worker.tasks import _hard_stop

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _hard_stop()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3


# -- time limits ------------------------------------------------------------------------------------
@contextmanager
def soft_time_limit_after(job_id: str, pattern: str, delay: float = 0.3) -> Iterator[None]:
    """Celery's soft time limit, fired on this thread `delay` s after the job logged an event matching
    `pattern`: billiard's handler (what a pool child runs when the soft limit expires) raises
    SoftTimeLimitExceeded wherever this thread is."""
    from billiard.pool import soft_timeout_sighandler

    previous = signal.signal(signal.SIGALRM, soft_timeout_sighandler)
    done = threading.Event()

    def arm() -> None:
        while not done.is_set():
            if any(re.fullmatch(pattern, m) for m in _db_messages(job_id)):
                signal.setitimer(signal.ITIMER_REAL, delay)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=arm, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join(timeout=10)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_time_limit_fails_a_running_stage_as_timeout(api, keys, parked, tmp_path) -> None:  # type: ignore[no-untyped-def]
    key = keys["grace"]
    job_id = _flow(api, key, [("a", "write"), ("b", "wait")], gate=str(tmp_path / "never"))
    with soft_time_limit_after(job_id, re.escape("stage b started (2/2)")):
        assert _run(job_id) == {"job_id": job_id, "outcome": "failed"}
    failed = _job(api, key, job_id)
    assert failed["error"] == {"code": "timeout", "message": "stage b exceeded the job time limit", "param": None}
    assert _stages(failed) == [("a", "succeeded", 1), ("b", "failed", 1)]
    assert failed["stages"][1]["finished_at"] is not None and failed["result"] is None
    assert _messages(api, key, job_id)[-1] == "failed: stage b exceeded the job time limit"
    assert _db_job(job_id).lease_owner is None


def test_the_time_limit_before_the_first_stage_fails_the_job_as_timeout(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    key = keys["grace"]
    job_id = _flow(api, key, [("a", "write")], load_seconds=60)
    started = time.monotonic()
    with soft_time_limit_after(job_id, r"attempt 1 started on .*"):
        assert _run(job_id) == {"job_id": job_id, "outcome": "failed"}
    assert time.monotonic() - started < 30  # stopped while the stage list was being built, not after
    failed = _job(api, key, job_id)
    assert failed["error"]["code"] == "timeout" and failed["attempt"] == 1
    assert failed["error"]["message"] == "the job exceeded its time limit before its stage started"
    assert failed["stages"] == [] and _db_job(job_id).lease_owner is None


# -- stage failures ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("steps", "code", "message", "param", "stages"),
    [
        ([("a", "write"), ("b", "fail")], "stage_failed", "stage b: ValueError: boom", None, ["succeeded", "failed"]),
        ([("a", "bad_input")], "bad_input", "a: row 3 has no label", "params.steps", ["failed"]),
        ([("a", "not_a_dict")], "stage_failed", "stage a returned list, not a dict", None, ["failed"]),
        ([("a", "write"), ("a", "write")], "internal_error", "duplicate stage names ['a', 'a']", None, []),
        ([("a/b", "write")], "invalid_params", "a step name may not contain '/'", "params", []),
    ],
)
def test_how_a_stage_fails_is_the_job_error(api, keys, parked, steps, code, message, param, stages) -> None:  # type: ignore[no-untyped-def]
    key = keys["grace"]
    job_id = _flow(api, key, steps)
    assert _run(job_id) == {"job_id": job_id, "outcome": "failed"}
    failed = _job(api, key, job_id)
    assert failed["status"] == "failed" and failed["error"] == {"code": code, "message": message, "param": param}
    assert [s["status"] for s in failed["stages"]] == stages
    last = _events(api, key, job_id)[-1]
    assert (last["level"], last["message"], last["data"]["error"]["code"]) == ("error", f"failed: {message}", code)
    # Our own failures keep the traceback for the operator; the user's (bad input) do not need one.
    ours = code == "stage_failed" and not message.endswith("not a dict")
    assert ("Traceback (most recent call last)" in last["data"].get("traceback", "")) is ours


def test_missing_stage_outputs_fail_the_stage(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    key = keys["grace"]
    job_id = _flow(api, key, [("a", "no_output")])
    assert _run(job_id)["outcome"] == "failed"
    failed = _job(api, key, job_id)
    assert failed["error"]["code"] == "stage_failed" and failed["error"]["message"].startswith("stage a outputs: ")
    assert _stages(failed) == [("a", "failed", 1)]
    assert api.get(f"/v1/jobs/{job_id}/artifacts", headers=auth(key)).json()["data"] == []


def test_a_job_type_that_disappeared_or_cannot_be_imported(api, keys, parked, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from shared.jobs.registry import JOB_TYPES

    key = keys["grace"]
    monkeypatch.setitem(JOB_TYPES, "flow_gone", _flow_type("flow_gone", run="no_such_stages"))
    monkeypatch.setitem(JOB_TYPES, "flow_broken", _flow_type("flow_broken", params="NoSuchParams"))
    listed = {t["name"]: t for t in api.get("/v1/job-types", headers=auth(key)).json()["data"]}
    assert listed["flow_gone"]["available"] is True  # its params import; its stages do not
    assert listed["flow_broken"]["available"] is False and "NoSuchParams" in listed["flow_broken"]["reason"]
    refused = api.post("/v1/jobs", headers=auth(key), json={"type": "flow_broken", "params": {}})
    assert refused.status_code == 501 and refused.json()["error"]["code"] == "job_type_unavailable", refused.text
    gone = _submit(api, key, "flow_gone", {"steps": [{"name": "a"}]})["id"]
    assert _run(gone)["outcome"] == "failed"
    error = _job(api, key, gone)["error"]
    assert error["code"] == "job_type_unavailable" and error["param"] == "type"
    assert error["message"].startswith("job type 'flow_gone' is not available: ")
    # A job whose type the worker does not know (an older or newer deployment) fails instead of looping.
    orphan = _flow(api, key, [("a", "write")])
    monkeypatch.delitem(JOB_TYPES, "flow")
    assert _run(orphan)["outcome"] == "failed"
    assert _job(api, key, orphan)["error"] == {
        "code": "unknown_job_type",
        "message": "unknown job type 'flow'",
        "param": "type",
    }


# -- a killed worker, the reaper and resuming ----------------------------------------------------------
def _run_in_a_child(job_id: str) -> int:
    """run_job in a forked process (a worker's pool child); returns its pid."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            from shared.jobs.runner import run_job

            run_job(job_id)
        finally:
            os._exit(0)
    return pid


def _kill_in_stage(job_id: str, message: str) -> int:
    pid = _run_in_a_child(job_id)
    _wait_message(job_id, message)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return pid


def test_a_killed_worker_s_job_is_requeued_and_resumes_after_its_finished_stage(api, keys, parked, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from services.worker.celery_app import enqueue
    from shared.jobs.config import get_service_settings
    from shared.jobs.reaper import reap

    key = keys["grace"]
    gate = tmp_path / "gate"
    job_id = _flow(api, key, [("a", "write"), ("b", "wait")], gate=str(gate))
    pid = _kill_in_stage(job_id, "b: 0/1 waiting for the gate")
    assert _job(api, key, job_id)["status"] == "running"  # until the reaper looks
    report = reap(enqueue)  # the lease is valid for seconds more, but its holder's pid is gone
    assert job_id in report["requeued"] and job_id in report["sent"]
    requeued = _db_job(job_id)
    assert requeued.status == "queued" and requeued.lease_owner is None and requeued.enqueued_at is not None
    assert any(re.fullmatch(rf"worker \S+:{pid}:\S+ exited; requeued", m) for m in _messages(api, key, job_id))
    # Another machine picks it up: stage a is not run again, its artifact comes back from the store.
    shutil.rmtree(get_service_settings().workdir_root / job_id)
    gate.touch()
    assert _run(job_id) == {"job_id": job_id, "outcome": "succeeded"}
    done = _job(api, key, job_id)
    assert done["attempt"] == 2 and _stages(done) == [("a", "succeeded", 1), ("b", "succeeded", 2)]
    assert "resuming after finished stage(s): a" in _messages(api, key, job_id)
    assert done["result"]["stages"]["b"]["seen"] == ["a"] and set(done["result_artifacts"]) == {"a", "b"}
    a_text = api.get(f"/v1/artifacts/{done['result_artifacts']['a']}/content", headers=auth(key)).text
    b = api.get(f"/v1/artifacts/{done['result_artifacts']['b']}/content", headers=auth(key)).json()
    assert b["seen"] == {"a": a_text} and json.loads(a_text) == {"job": job_id, "step": "a", "seen": {}}


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_resumed_job_whose_stored_artifact_is_damaged_fails(api, keys, parked, tmp_path, damage) -> None:  # type: ignore[no-untyped-def]
    from services.worker.celery_app import enqueue
    from shared.db.models import Artifact
    from shared.db.session import session_scope
    from shared.jobs.config import get_service_settings
    from shared.jobs.reaper import reap
    from shared.storage import ArtifactStore

    key = keys["grace"]
    gate = tmp_path / "gate"
    job_id = _flow(api, key, [("a", "write"), ("b", "wait")], gate=str(gate))
    _kill_in_stage(job_id, "b: 0/1 waiting for the gate")
    assert job_id in reap(enqueue)["requeued"]
    (art_id,) = [a["id"] for a in api.get(f"/v1/jobs/{job_id}/artifacts", headers=auth(key)).json()["data"]]
    with session_scope() as session:
        stored = ArtifactStore().resolve(session.get(Artifact, art_id).path)
    if damage == "corrupt":
        stored.write_text('{"tampered": true}')
    else:
        stored.unlink()
    shutil.rmtree(get_service_settings().workdir_root / job_id)
    gate.touch()
    assert _run(job_id)["outcome"] == "failed"
    error = _job(api, key, job_id)["error"]
    what = "is corrupt in the artifact store" if damage == "corrupt" else "is missing from the artifact store"
    assert error["code"] == "stage_failed" and error["message"].startswith(f"artifact 'a' of stage a {what}")
    assert not (get_service_settings().workdir_root / job_id / "a.json").exists()  # no bad copy left behind


def test_a_delivery_after_max_attempts_fails_the_job_as_worker_lost(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    from shared.db.session import session_scope
    from shared.jobs import state
    from shared.jobs.config import ServiceSettings
    from shared.jobs.runner import run_job

    key = keys["grace"]
    job_id = _flow(api, key, [("a", "write")])
    with session_scope() as session:
        assert state.claim(session, job_id, "gone-host:1:lost", 0.1, 1).outcome == "claimed"
    time.sleep(0.2)  # its lease runs out; the message is delivered again before any reaper sweep
    assert run_job(job_id, settings=ServiceSettings(max_attempts=1)) == {
        "job_id": job_id,
        "outcome": "exhausted",
        "status": "failed",
    }
    failed = _job(api, key, job_id)
    assert failed["error"]["code"] == "worker_lost" and "delivered 1 times" in failed["error"]["message"]
    assert _messages(api, key, job_id)[-1] == "giving up: too many attempts"


def test_the_reaper_resends_a_message_no_worker_took_and_backs_off(api, keys, parked) -> None:  # type: ignore[no-untyped-def]
    from services.worker.celery_app import enqueue
    from shared.jobs.config import ServiceSettings
    from shared.jobs.reaper import reap, resend

    key = keys["grace"]
    settings = ServiceSettings(resend_after_seconds=0.5)
    job_id = _flow(api, key, [("a", "write")])
    sent = _db_job(job_id)
    assert job_id not in reap(enqueue, settings)["resent"]  # sent just now
    time.sleep(0.6)
    assert job_id in reap(enqueue, settings)["resent"]
    first = _db_job(job_id)
    assert first.task_id != sent.task_id and first.enqueued_at > sent.enqueued_at and first.status == "queued"
    # Of two reapers that saw the same stale send time, only one re-sends.
    assert resend(job_id, sent.enqueued_at, 0, enqueue) is False
    # The second re-send waits twice as long.
    time.sleep(0.6)
    assert job_id not in reap(enqueue, settings)["resent"]
    time.sleep(0.5)
    assert job_id in reap(enqueue, settings)["resent"]
    resends = [e for e in _events(api, key, job_id) if (e["data"] or {}).get("type") == "resend"]
    assert [e["data"]["resends"] for e in resends] == [1, 2] and all(e["level"] == "warning" for e in resends)
    assert re.fullmatch(r"message not picked up \d+s after it was sent; re-sent to the queue", resends[0]["message"])
    assert resends[-1]["data"]["task_id"] == _db_job(job_id).task_id
    # The job still runs once, whichever message is delivered first; the others are no-ops.
    assert _run(job_id)["outcome"] == "succeeded" and _run(job_id)["outcome"] == "terminal"
    assert job_id not in reap(enqueue, settings)["resent"]


# -- a broker that is down, and an embedded worker ------------------------------------------------------
@contextmanager
def broker_down() -> Iterator[None]:
    """The Celery app of the API and the reaper pointed at a Redis port nothing listens on."""
    from services.worker import celery_app as worker_module
    from shared.config import get_settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BROKER_URL", f"redis://127.0.0.1:{_free_port()}/0")
        get_settings.cache_clear()
        mp.setattr(worker_module, "celery_app", worker_module.make_celery())
        try:
            yield
        finally:
            mp.undo()
            get_settings.cache_clear()


@contextmanager
def embedded_worker() -> Iterator[Any]:
    """A Celery worker on this home's broker in a thread of this process (solo pool), reaper included."""
    import celery
    from celery.contrib.testing.worker import start_worker

    from services.worker import celery_app as worker_module

    previous = celery.current_app._get_current_object()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(worker_module, "MAIN_PID", worker_module.MAIN_PID)  # worker_init sets it
        try:
            with start_worker(
                worker_module.celery_app, pool="solo", perform_ping_check=False, shutdown_timeout=60, loglevel="WARNING"
            ) as worker:
                yield worker
        finally:
            previous.set_current()
            previous.set_default()


def test_broker_url_uses_psycopg3_for_postgres_brokers(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from services.worker.celery_app import broker_url
    from shared.config import get_settings

    for given in ("sqla+postgres://u@db/chorus", "sqla+postgresql://u@db/chorus"):
        monkeypatch.setenv("BROKER_URL", given)
        get_settings.cache_clear()
        assert broker_url() == "sqla+postgresql+psycopg://u@db/chorus"
    monkeypatch.setenv("BROKER_URL", "redis://cache:6379/0")
    get_settings.cache_clear()
    assert broker_url() == "redis://cache:6379/0"
    monkeypatch.delenv("BROKER_URL")
    get_settings.cache_clear()


def test_a_job_created_while_the_broker_is_down_is_sent_by_the_worker_s_reaper(api, keys) -> None:  # type: ignore[no-untyped-def]
    """The API stores the job and says so when the broker is down; the reaper cannot send it either (nor
    re-send a stale one) until the broker is back; then an embedded worker's reaper sends it and the worker
    runs it, and a fan-out helper sent for the finished job does nothing."""
    from celery.worker import state as worker_state

    from services.worker import celery_app as worker_module
    from services.worker.celery_app import RUN_JOB, RUN_SHARDS, enqueue
    from shared.jobs.config import ServiceSettings
    from shared.jobs.reaper import reap

    key = keys["pager"]
    settings = ServiceSettings(resend_after_seconds=0.5)
    with pytest.MonkeyPatch.context() as mp:  # a message no worker will take, stale by the time of the sweep
        mp.setenv("CHORUS_QUEUE", "parked")
        _clear_service_caches()
        stale = _submit(api, key, "grouping", GROUPING)["id"]
    _clear_service_caches()
    time.sleep(0.6)
    with broker_down():
        job = _submit(api, key, "grouping", GROUPING)
        assert job["status"] == "queued"
        assert _messages(api, key, job["id"])[-1] == "broker unavailable; the job will be sent when it is back"
        assert _db_job(job["id"]).enqueued_at is None
        before = _db_job(stale).enqueued_at
        report = reap(enqueue, settings, unsent_grace=0)
        assert job["id"] not in report["sent"] and stale not in report["resent"]
        assert _db_job(job["id"]).enqueued_at is None and _db_job(stale).enqueued_at == before  # put back
        # Cancelling a queued job also tells the workers to drop its message: best effort, the cancel holds.
        assert _cancel(api, key, stale)["status"] == "cancelled"
    counts_before = dict(worker_state.total_count)
    with embedded_worker():
        done = _wait_done(api, key, job["id"], 120)
        assert done["status"] == "succeeded" and done["attempt"] == 1, done
        # The helpers dispatch_shards sends, sent through this home's app (dispatch_shards uses the app its
        # tasks were first bound to, which is another test module's home when the whole suite runs).
        for _ in range(2):
            worker_module.celery_app.send_task(RUN_SHARDS, args=[job["id"], "gradients"], queue="chorus")
        wait_for(
            lambda: worker_state.total_count[RUN_SHARDS] - counts_before.get(RUN_SHARDS, 0) == 2,
            60,
            0.1,
            "the two helper tasks",
        )
    assert worker_state.total_count[RUN_JOB] - counts_before.get(RUN_JOB, 0) == 1
    messages = _messages(api, key, job["id"])
    assert messages[1] == "broker unavailable; the job will be sent when it is back"
    assert messages[-1] == "job succeeded" and _db_job(job["id"]).task_id is not None
