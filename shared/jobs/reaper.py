"""The reaper: requeues jobs whose worker died (lease expired, or the lease holder's pid is gone on this
host) and (re)sends jobs that were never handed to the broker. Runs periodically in every worker's
parent process; several reapers at once are safe (every change is a compare-and-set)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import or_, select, update

from shared.db.models import Job, utcnow
from shared.db.session import get_sessionmaker
from shared.jobs import state
from shared.jobs.config import ServiceSettings, get_service_settings

log = logging.getLogger("chorus.reaper")

# enqueue(job_id) -> broker task id; raises when the broker is unreachable.
Enqueue = Callable[[str], str]


def reap(enqueue: Enqueue, settings: ServiceSettings | None = None, unsent_grace: float = 5.0) -> dict[str, list[str]]:
    """One sweep. Returns {"requeued": [...], "failed": [...], "sent": [...]} job ids."""
    settings = settings or get_service_settings()
    maker = get_sessionmaker()
    now = utcnow()
    report: dict[str, list[str]] = {"requeued": [], "failed": [], "sent": []}
    with maker() as session:
        running = session.scalars(select(Job).where(Job.status == "running")).all()
        for job in running:
            expired = job.lease_expires_at is None or job.lease_expires_at < now
            dead = state.owner_is_dead(job.lease_owner)
            if not (expired or dead):
                continue
            reason = f"worker {job.lease_owner} " + ("exited" if dead else "stopped renewing its lease")
            new_status = state.requeue_lost(session, job, reason, settings.max_attempts)
            session.commit()
            if new_status == "queued":
                report["requeued"].append(job.id)
            elif new_status == "failed":
                report["failed"].append(job.id)
        unsent = session.scalars(select(Job.id).where(
            Job.status == "queued", Job.enqueued_at.is_(None),
            or_(Job.id.in_(report["requeued"]), Job.created_at < now - timedelta(seconds=unsent_grace)))).all()
    for job_id in unsent:
        if send(job_id, enqueue):
            report["sent"].append(job_id)
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
        session.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                        .values(enqueued_at=utcnow(), task_id=task_id))
        session.commit()
    return True
