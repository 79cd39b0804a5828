"""The job state machine on PostgreSQL: one claimant wins, leases expire into requeues, attempts are
bounded, a cancelled job's worker learns it at its next renewal, the reaper re-sends unsent jobs."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from shared.db.models import Job, JobEvent, new_id, utcnow
from shared.db.session import session_scope

pytestmark = pytest.mark.integration


def _job(**values) -> str:  # type: ignore[no-untyped-def]
    job_id = new_id("job")
    with session_scope() as session:
        session.add(
            Job(
                id=job_id,
                type="evaluation",
                status="queued",
                owner="state-test",
                params={},
                progress={},
                attempt=0,
                enqueued_at=utcnow(),
                **values,
            )
        )
    return job_id


def _get(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def test_only_one_worker_claims_a_job(stack_env) -> None:  # type: ignore[no-untyped-def]
    from shared.db.session import get_sessionmaker
    from shared.jobs import state

    job_id = _job()
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def claim(i: int) -> None:
        with get_sessionmaker()() as session:
            barrier.wait()
            outcomes.append(state.claim(session, job_id, f"host:{10_000 + i}:x", 30, 3).outcome)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert outcomes.count("claimed") == 1 and set(outcomes) <= {"claimed", "raced", "leased"}, outcomes
    assert _get(job_id).attempt == 1


def test_lease_expiry_requeues_and_attempts_are_bounded(stack_env) -> None:  # type: ignore[no-untyped-def]
    from shared.jobs.config import get_service_settings
    from shared.jobs.reaper import reap

    sent: list[str] = []
    past = utcnow() - timedelta(seconds=60)
    lost = _job()
    exhausted = _job()
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == lost)
            .values(status="running", lease_owner="elsewhere:1:a", lease_expires_at=past, attempt=1)
        )
        session.execute(
            update(Job)
            .where(Job.id == exhausted)
            .values(
                status="running",
                lease_owner="elsewhere:2:b",
                lease_expires_at=past,
                attempt=get_service_settings().max_attempts,
            )
        )
    report = reap(lambda job_id: sent.append(job_id) or f"task-{job_id}")
    assert lost in report["requeued"] and lost in report["sent"] and exhausted in report["failed"]
    assert sent.count(lost) == 1 and exhausted not in sent
    requeued, failed = _get(lost), _get(exhausted)
    assert requeued.status == "queued" and requeued.lease_owner is None and requeued.task_id == f"task-{lost}"
    assert failed.status == "failed" and failed.error["code"] == "worker_lost"
    # A second sweep finds nothing to do.
    again = reap(lambda job_id: sent.append(job_id) or "x")
    assert lost not in again["sent"] and exhausted not in again["failed"]


def test_a_live_lease_is_respected_and_a_dead_local_owner_is_not(stack_env) -> None:  # type: ignore[no-untyped-def]
    from shared.db.session import get_sessionmaker
    from shared.jobs import state

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_token = f"{state.HOSTNAME}:{dead.stdout.strip()}:gone"
    live = _job()
    orphan = _job()
    future = utcnow() + timedelta(minutes=5)
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == live)
            .values(status="running", lease_owner="otherhost:1:a", lease_expires_at=future, attempt=1)
        )
        session.execute(
            update(Job)
            .where(Job.id == orphan)
            .values(status="running", lease_owner=dead_token, lease_expires_at=future, attempt=1)
        )
    with get_sessionmaker()() as session:
        assert state.claim(session, live, state.make_token(), 30, 3).outcome == "leased"
        assert state.claim(session, orphan, state.make_token(), 30, 3).outcome == "claimed"
    assert _get(orphan).attempt == 2


def test_renewal_reports_cancellation_and_lost_leases(stack_env) -> None:  # type: ignore[no-untyped-def]
    from shared.db.session import get_sessionmaker
    from shared.jobs import state

    job_id = _job()
    token = state.make_token()
    with get_sessionmaker()() as session:
        assert state.claim(session, job_id, token, 30, 3).outcome == "claimed"
        assert state.renew(session, job_id, token, 30) == "ok"
        assert state.renew(session, job_id, "someone:else:1", 30) == "lost"
        job = session.get(Job, job_id)
        assert state.cancel(session, job)
        session.commit()
        assert state.renew(session, job_id, token, 30) == "cancelled"
        assert not state.finish(session, job_id, token, "succeeded")  # a cancelled job stays cancelled
        session.commit()
    assert _get(job_id).status == "cancelled"
    with session_scope() as session:
        messages = [e.message for e in session.query(JobEvent).filter(JobEvent.job_id == job_id).order_by(JobEvent.id)]
    assert messages[0].startswith("attempt 1 started") and messages[-1] == "cancelled by request while running"


def test_status_reads_survive_connections_dropped_by_the_server(stack_env) -> None:  # type: ignore[no-untyped-def]
    """The read engine has no pre-ping (one round trip per poll); a pooled connection the server killed
    (a database restart) is retried once on a fresh connection instead of failing the request."""
    import psycopg
    from sqlalchemy import select, text

    from shared.db.session import get_read_engine, read_all
    from tests.integration.conftest import PG_ADMIN

    job_id = _job()
    stmt = select(Job.__table__.c.id).where(Job.__table__.c.id == job_id)
    assert [r["id"] for r in read_all(stmt)] == [job_id]  # leaves a connection in the pool
    with get_read_engine().connect() as conn:
        pids = {conn.execute(text("select pg_backend_pid()")).scalar()}
    name = get_read_engine().url.database
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and pid = any(%s)",
            (name, list(pids)),
        )
    assert [r["id"] for r in read_all(stmt)] == [job_id]
