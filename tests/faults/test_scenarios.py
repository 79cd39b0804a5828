"""Faults on real processes: the job service loses no job and runs none twice when a job process or a
whole worker is killed with SIGKILL, when Redis restarts with or without its data, and when PostgreSQL
restarts mid-job (the API answers 503 + Retry-After meanwhile, not 500). Each scenario submits tiny-llama
jobs through the API, injects its fault, and audits every job in the database (tests/faults/jobs.py):
submitted = completed, 0 lost, 0 duplicated."""

from __future__ import annotations

import os
import signal

import pytest

from tests.faults.jobs import (
    QUICK,
    STEPPED,
    audit,
    events,
    freeze_mid_stage,
    pid_of,
    row,
    stage_running,
    submit,
    wait_terminal,
    wait_until,
)
from tests.integration.conftest import auth

pytestmark = [pytest.mark.integration, pytest.mark.faults]

TIMEOUT = 150  # seconds a scenario waits for its jobs (a bound against hanging, not a claim about speed)


def _check(tally, record_tally, workers) -> None:  # type: ignore[no-untyped-def]
    record_tally(tally.line())
    assert tally.ok, f"{tally.line()}\nlost: {tally.lost}\nduplicated: {tally.duplicated}\n{workers.logs_text()}"


def _messages(job_id: str) -> list[str]:
    return [e.message for e in events(job_id)]


def test_kill9_of_the_job_process_mid_stage(api, key, workers, record_tally):  # type: ignore[no-untyped-def]
    """SIGKILL the worker's child running a job: the job runs again on a new child and succeeds once."""
    workers.start()
    victim, queued = submit(api, key, QUICK, seed=1), submit(api, key, QUICK, seed=2)
    token = freeze_mid_stage(victim, TIMEOUT)
    os.kill(pid_of(token), signal.SIGKILL)
    wait_terminal([victim, queued], TIMEOUT)
    _check(audit("kill -9 job process", [victim, queued]), record_tally, workers)
    assert row(victim).attempt == 2
    assert any(token in m and ("took over" in m or "requeued" in m) for m in _messages(victim)), _messages(victim)


def test_kill9_of_a_whole_worker_mid_stage(api, key, workers, record_tally):  # type: ignore[no-untyped-def]
    """SIGKILL a worker's parent and child together: a new worker requeues the job and finishes it once."""
    first = workers.start()
    victim, queued = submit(api, key, QUICK, seed=3), submit(api, key, QUICK, seed=4)
    token = freeze_mid_stage(victim, TIMEOUT)
    first.kill9()
    workers.start()
    wait_terminal([victim, queued], TIMEOUT)
    _check(audit("kill -9 worker", [victim, queued]), record_tally, workers)
    assert row(victim).attempt == 2
    assert any(token in m and ("took over" in m or "requeued" in m) for m in _messages(victim)), _messages(victim)


def test_redis_restart_with_its_data(stack, api, key, workers, record_tally):  # type: ignore[no-untyped-def]
    """Redis crashes (SIGKILL) and restarts on its append-only file while one job runs and one is queued.
    Re-sending is off for this worker, so the queued job can only run from the message Redis kept."""
    workers.start(CHORUS_RESEND_AFTER_SECONDS="3600")
    running, queued = submit(api, key, QUICK, seed=5), submit(api, key, QUICK, seed=6)
    assert wait_until(lambda: stage_running(running), TIMEOUT, 0.1)
    stack.redis.kill9()
    stack.redis.start(keep_data=True)
    wait_terminal([running, queued], TIMEOUT)
    tally = audit("redis restart with data", [running, queued])
    _check(tally, record_tally, workers)
    assert tally.resends == 0


def test_redis_restart_without_its_data(stack, api, key, workers, record_tally):  # type: ignore[no-untyped-def]
    """Redis restarts empty (its data lost) while one job runs and one is queued: the queued job's message
    is gone, so it completes only because the reaper re-sends it."""
    workers.start()
    running, queued = submit(api, key, QUICK, seed=7), submit(api, key, QUICK, seed=8)
    assert wait_until(lambda: stage_running(running), TIMEOUT, 0.1)
    stack.redis.kill9()
    stack.redis.start(keep_data=False)
    wait_terminal([running, queued], TIMEOUT)
    _check(audit("redis restart without data", [running, queued]), record_tally, workers)
    assert any(m.startswith("message not picked up") for m in _messages(queued)), _messages(queued)


def test_postgres_restart_mid_job(stack, api, key, workers, record_tally):  # type: ignore[no-untyped-def]
    """PostgreSQL stops while a job's stage runs and another job waits: meanwhile the API answers 503 with
    Retry-After in the standard error shape (no driver text), and once it is back both jobs complete once."""
    worker = workers.start()
    running, queued = submit(api, key, STEPPED, seed=9), submit(api, key, QUICK, seed=10)
    assert wait_until(lambda: stage_running(running), TIMEOUT, 0.1)
    stack.pg.stop()
    try:
        port = str(stack.pg.port)
        calls = [
            ("GET", "/v1/jobs", None),
            ("GET", f"/v1/jobs/{running}", None),
            ("GET", f"/v1/jobs/{running}/events", None),
            ("POST", "/v1/jobs", {"type": "evaluation", "params": QUICK}),
        ]
        for method, url, body in calls:
            r = api.request(method, url, headers=auth(key), json=body)
            assert r.status_code == 503, (method, url, r.status_code, r.text)
            assert int(r.headers["retry-after"]) > 0
            error = r.json()["error"]
            assert error["code"] == "unavailable" and set(error) == {"code", "message", "param"}
            assert port not in r.text and "127.0.0.1" not in r.text and "postgres" not in r.text.lower(), r.text
        health = api.get("/health")
        assert health.status_code == 503 and int(health.headers["retry-after"]) > 0
        assert health.json() == {"status": "error", "database": "unavailable"}
        # The job process notices the outage (its lease heartbeat fails) before the database comes back.
        assert wait_until(lambda: f"lease heartbeat of {running} failed" in worker.text(), 60, 0.2), worker.text()[
            -3000:
        ]
    finally:
        stack.pg.start()
    wait_terminal([running, queued], TIMEOUT)
    _check(audit("postgres restart mid-job", [running, queued]), record_tally, workers)
    assert api.get("/health").status_code == 200
