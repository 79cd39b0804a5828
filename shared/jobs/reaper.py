"""The reaper: requeues jobs whose worker died (lease expired, or the lease holder's pid is gone on this
host), sends jobs that were never handed to the broker, and re-sends queued jobs whose message no worker
took within resend_after_seconds (a broker that lost its data). Runs periodically in every worker's
parent process; several reapers at once are safe (every change is a compare-and-set, and a worker
claims a job by compare-and-set, so an extra message for a job is a no-op when it is delivered)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from shared.db.models import Job, JobEvent, JobStatus, utcnow
from shared.db.session import get_sessionmaker
from shared.jobs import state
from shared.jobs.config import ServiceSettings, get_service_settings

log = logging.getLogger("chorus.reaper")

# enqueue(job_id) -> broker task id; raises when the broker is unreachable.
Enqueue = Callable[[str], str]
RESENT = "message not picked up"  # how re-send events start (counted for the back-off)
MAX_BACKOFF = 8  # a job's n-th re-send waits resend_after_seconds * min(2**(n-1), MAX_BACKOFF)


def reap(enqueue: Enqueue, settings: ServiceSettings | None = None, unsent_grace: float = 5.0) -> dict[str, list[str]]:
    """One sweep. Returns {"requeued": [...], "failed": [...], "sent": [...], "resent": [...]} job ids."""
    settings = settings or get_service_settings()
    maker = get_sessionmaker()
    now = utcnow()
    report: dict[str, list[str]] = {"requeued": [], "failed": [], "sent": [], "resent": []}
    with maker() as session:
        running = session.scalars(select(Job).where(Job.status == JobStatus.RUNNING)).all()
        for job in running:
            expired = job.lease_expires_at is None or job.lease_expires_at < now
            dead = state.owner_is_dead(job.lease_owner)
            if not (expired or dead):
                continue
            reason = f"worker {job.lease_owner} " + ("exited" if dead else "stopped renewing its lease")
            new_status = state.requeue_lost(session, job, reason, settings.max_attempts)
            session.commit()
            if new_status == JobStatus.QUEUED:
                report["requeued"].append(job.id)
            elif new_status == JobStatus.FAILED:
                report["failed"].append(job.id)
        unsent = session.scalars(
            select(Job.id).where(
                Job.status == JobStatus.QUEUED,
                Job.enqueued_at.is_(None),
                or_(Job.id.in_(report["requeued"]), Job.created_at < now - timedelta(seconds=unsent_grace)),
            )
        ).all()
        stale = _stale(session, now, settings.resend_after_seconds)
    for job_id in unsent:
        if send(job_id, enqueue):
            report["sent"].append(job_id)
    for job_id, sent_at, count in stale:
        if resend(job_id, sent_at, count, enqueue):
            report["resent"].append(job_id)
    if any(report.values()):
        log.warning("reaper: %s", report)
    return report


def send(job_id: str, enqueue: Enqueue) -> bool:
    """Hand a queued job to the broker and record when; False (job stays unsent) if the broker failed."""
    try:
        task_id = enqueue(job_id)
    except Exception as exc:  # broker down: the next sweep retries
        log.warning("could not enqueue %s: %s", job_id, exc)
        return False
    with get_sessionmaker()() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
            .values(enqueued_at=utcnow(), task_id=task_id)
        )
        session.commit()
    return True


def _stale(session: Session, now: datetime, after: float) -> list[tuple[str, datetime, int]]:
    """(job id, when its message was sent, re-sends so far) of queued jobs due for a re-send."""
    rows = session.execute(
        select(Job.id, Job.enqueued_at).where(
            Job.status == JobStatus.QUEUED, Job.enqueued_at < now - timedelta(seconds=after)
        )
    ).all()
    if not rows:
        return []
    counts = dict(
        session.execute(
            select(JobEvent.job_id, func.count())
            .where(JobEvent.job_id.in_([r.id for r in rows]), JobEvent.message.startswith(RESENT))
            .group_by(JobEvent.job_id)
        ).all()
    )
    out: list[tuple[str, datetime, int]] = []
    for job_id, sent_at in rows:
        assert sent_at is not None  # the query's `enqueued_at < ...` leaves NULL out
        count = counts.get(job_id, 0)
        if sent_at < now - timedelta(seconds=after * min(2**count, MAX_BACKOFF)):
            out.append((job_id, sent_at, count))
    return out


def resend(job_id: str, sent_at: datetime, count: int, enqueue: Enqueue) -> bool:
    """Send a queued job's message again. The send time is taken by compare-and-set first, so of several
    reapers one re-sends; if the broker fails the old time is put back and a later sweep tries again."""
    maker = get_sessionmaker()
    now = utcnow()
    with maker() as session:
        won = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.enqueued_at == sent_at)
            .values(enqueued_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
    if won.rowcount != 1:  # type: ignore[attr-defined]
        return False
    try:
        task_id = enqueue(job_id)
    except Exception as exc:  # broker down: the next sweep retries
        log.warning("could not re-send %s: %s", job_id, exc)
        with maker() as session:
            session.execute(update(Job).where(Job.id == job_id, Job.enqueued_at == now).values(enqueued_at=sent_at))
            session.commit()
        return False
    waited = (now - sent_at).total_seconds()
    with maker() as session:
        session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED).values(task_id=task_id))
        state.add_event(
            session,
            job_id,
            f"{RESENT} {waited:.0f}s after it was sent; re-sent to the queue",
            "warning",
            {"type": "resend", "resends": count + 1, "task_id": task_id, "waited_seconds": round(waited, 1)},
        )
        session.commit()
    return True
