"""Recovery paths on the suite's own PostgreSQL. The reaper re-sends a queued job whose message no worker
took (the broker lost it): when due, backing off, one reaper at a time, and a broker failure leaves it
due; extra messages are harmless because a worker claims a job by compare-and-set. A database error in
a running stage ends the attempt unfinished (the job is retried) instead of failing the job."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update

pytestmark = [pytest.mark.integration, pytest.mark.faults]

AFTER = 4.0  # resend_after_seconds of these tests


def _settings() -> Any:
    from shared.jobs.config import ServiceSettings

    return ServiceSettings(resend_after_seconds=AFTER, max_attempts=3)


def _job(sent_ago: float | None, type: str = "evaluation", **values: Any) -> str:
    from shared.db.models import Job, new_id, utcnow
    from shared.db.session import session_scope

    job_id = new_id("job")
    now = utcnow()
    sent = None if sent_ago is None else now - timedelta(seconds=sent_ago)
    with session_scope() as session:
        session.add(
            Job(
                id=job_id,
                type=type,
                status="queued",
                owner="resend-test",
                params={},
                progress={},
                attempt=0,
                created_at=now,
                enqueued_at=sent,
                task_id="first",
                **values,
            )
        )
    return job_id


def _age(job_id: str, seconds: float) -> None:
    """Pretend the job's last message was sent `seconds` ago."""
    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope

    with session_scope() as session:
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow() - timedelta(seconds=seconds)))


def _resend_events(job_id: str) -> list[Any]:
    from shared.db.models import JobEvent
    from shared.db.session import session_scope

    with session_scope() as session:
        return [
            (e.message, e.data)
            for e in session.scalars(select(JobEvent).where(JobEvent.job_id == job_id))
            if (e.data or {}).get("type") == "resend"
        ]


def _sweep(sent: list[str]) -> dict[str, list[str]]:
    from shared.jobs.reaper import reap

    return reap(lambda job_id: sent.append(job_id) or f"task-{len(sent)}", _settings())


def test_a_queued_job_not_picked_up_is_resent_and_backs_off(stack) -> None:  # type: ignore[no-untyped-def]
    from shared.db.models import Job
    from shared.db.session import session_scope
    from tests.faults.jobs import row

    lost = _job(sent_ago=AFTER * 2)
    fresh = _job(sent_ago=0)
    running = _job(sent_ago=AFTER * 10)
    live_lease = row(fresh).created_at + timedelta(hours=1)
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == running)
            .values(status="running", lease_owner="otherhost:1:a", lease_expires_at=live_lease)
        )
    sent: list[str] = []
    report = _sweep(sent)
    assert lost in report["resent"] and fresh not in report["resent"] and running not in report["resent"]
    assert sent.count(lost) == 1 and fresh not in sent and running not in sent
    job = row(lost)
    assert job.status == "queued" and job.task_id == f"task-{sent.index(lost) + 1}"
    [(message, data)] = _resend_events(lost)
    assert message.startswith("message not picked up") and data["resends"] == 1
    # Just re-sent: not due again. The second re-send waits twice as long.
    assert lost not in _sweep(sent)["resent"]
    _age(lost, AFTER * 1.5)
    assert lost not in _sweep(sent)["resent"]
    _age(lost, AFTER * 2.5)
    assert lost in _sweep(sent)["resent"]
    assert [d["resends"] for _, d in _resend_events(lost)] == [1, 2] and sent.count(lost) == 2


def test_a_broker_failure_leaves_the_job_due(stack) -> None:  # type: ignore[no-untyped-def]
    from shared.jobs.reaper import reap
    from tests.faults.jobs import row

    lost = _job(sent_ago=AFTER * 2)
    before = row(lost).enqueued_at

    def down(job_id: str) -> str:
        raise ConnectionError("broker down")

    assert lost not in reap(down, _settings())["resent"]
    assert row(lost).enqueued_at == before and _resend_events(lost) == []
    sent: list[str] = []
    assert lost in _sweep(sent)["resent"] and sent.count(lost) == 1


def test_concurrent_reapers_resend_a_job_once(stack) -> None:  # type: ignore[no-untyped-def]
    from shared.jobs.reaper import reap

    lost = _job(sent_ago=AFTER * 2)
    sent: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(6)

    def enqueue(job_id: str) -> str:
        with lock:
            sent.append(job_id)
        return "t"

    def sweep() -> None:
        barrier.wait()
        reap(enqueue, _settings())

    threads = [threading.Thread(target=sweep) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sent.count(lost) == 1 and len(_resend_events(lost)) == 1


def test_a_resent_message_for_a_claimed_job_is_a_noop(stack) -> None:  # type: ignore[no-untyped-def]
    """Both messages of a re-sent job get delivered: the first claims it, the second finds it leased (and
    once it finished, terminal); neither changes the row."""
    from shared.db.session import get_sessionmaker
    from shared.jobs import state
    from tests.faults.jobs import row

    lost = _job(sent_ago=AFTER * 2)
    assert lost in _sweep([])["resent"]
    first, second = state.make_token(), "otherhost:2:b"
    with get_sessionmaker()() as session:
        assert state.claim(session, lost, first, 30, 3).outcome == "claimed"
        assert state.claim(session, lost, second, 30, 3).outcome == "leased"
        assert state.finish(session, lost, first, "succeeded", result={})
        session.commit()
        assert state.claim(session, lost, second, 30, 3).outcome == "terminal"
    job = row(lost)
    assert job.status == "succeeded" and job.attempt == 1


def test_a_database_error_in_a_stage_leaves_the_job_to_be_retried(stack, monkeypatch):  # type: ignore[no-untyped-def]
    """A progress write that hits a dropped connection must not fail the job for good (the database may be
    back a moment later): the attempt ends with the job still running, and the next delivery finishes it."""
    from sqlalchemy.exc import OperationalError

    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope
    from shared.jobs.config import ServiceSettings
    from shared.jobs.registry import JOB_TYPES, JobType
    from shared.jobs.runner import run_job
    from tests.faults import jobs

    monkeypatch.setitem(
        JOB_TYPES,
        "fault_blip",
        JobType(
            "fault_blip",
            "a stage hit by a database error",
            "tests.faults.jobs:BlipParams",
            "tests.faults.jobs:blip_stage",
        ),
    )
    monkeypatch.setitem(jobs.BLIPS, "left", 1)
    job_id = _job(sent_ago=0, type="fault_blip")
    settings = ServiceSettings(lease_seconds=30, max_attempts=3, keep_workdir=False)
    with pytest.raises(OperationalError):
        run_job(job_id, settings=settings)
    job = jobs.row(job_id)
    assert job.status == "running" and job.error is None and job.attempt == 1
    with session_scope() as session:  # the worker is gone: its lease runs out
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert run_job(job_id, settings=settings)["outcome"] == "succeeded"
    job = jobs.row(job_id)
    assert job.status == "succeeded" and job.attempt == 2 and set(job.result["artifacts"]) == {"out"}
