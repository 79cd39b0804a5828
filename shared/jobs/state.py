"""The job state machine on the database: claims, leases, terminal transitions, events.

queued -> running -> succeeded | failed | cancelled;  queued -> cancelled;  running -> queued (lease lost,
requeued by the reaper). Every transition a worker makes is a compare-and-set on (status, lease_owner),
so a worker that lost its lease (or whose job was cancelled) can never overwrite the row. The statuses are
JobStatus (StageStatus for a job's stages), defined next to the tables and used from here.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.db.models import TERMINAL_STATUSES, Job, JobEvent, JobStage, JobStatus, StageStatus, utcnow

HOSTNAME = socket.gethostname()


def make_token() -> str:
    """A lease owner token: host:pid:random (the pid lets a worker on the same host detect a dead owner)."""
    return f"{HOSTNAME}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_is_dead(token: str | None) -> bool:
    """True when `token` belongs to a process on this host that no longer exists."""
    if not token:
        return False
    host, _, rest = token.partition(":")
    pid_text = rest.partition(":")[0]
    if host != HOSTNAME or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def add_event(
    session: Session, job_id: str, message: str, level: str = "info", data: dict[str, Any] | None = None
) -> JobEvent:
    event = JobEvent(job_id=job_id, message=message, level=level, data=data, created_at=utcnow())
    session.add(event)
    return event


def error_obj(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message[:4000], "param": param}


# What a claim attempt found: the job is now ours, gone, finished, held by a live lease, taken by a racing worker,
# or failed for too many attempts.
ClaimOutcome = Literal["claimed", "missing", "terminal", "leased", "raced", "exhausted"]
# What a lease renewal or check found: still ours, cancelled by its owner, or held by someone else.
LeaseVerdict = Literal["ok", "cancelled", "lost"]


@dataclass
class Claim:
    outcome: ClaimOutcome
    job_id: str
    type: str = ""
    owner: str = ""
    params: dict[str, Any] | None = None
    attempt: int = 0
    status: str = ""


def _cas(job_id: str, status: str, lease_owner: str | None) -> list[Any]:
    owner_clause = Job.lease_owner.is_(None) if lease_owner is None else Job.lease_owner == lease_owner
    return [Job.id == job_id, Job.status == status, owner_clause]


def claim(session: Session, job_id: str, token: str, lease_seconds: float, max_attempts: int) -> Claim:
    """Take the job for this worker: queued, or running with an expired/dead lease. Commits."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        return Claim("missing", job_id)
    if job.status in TERMINAL_STATUSES:
        return Claim("terminal", job_id, status=job.status)
    now = utcnow()
    previous, seen_status, seen_attempt = job.lease_owner, job.status, job.attempt
    if job.status == JobStatus.RUNNING:
        expired = job.lease_expires_at is None or job.lease_expires_at < now
        if not (expired or owner_is_dead(previous)):
            return Claim("leased", job_id, status=job.status)
    if seen_attempt >= max_attempts:
        done = session.execute(
            update(Job)
            .where(*_cas(job_id, seen_status, previous))
            .values(
                status=JobStatus.FAILED,
                finished_at=now,
                lease_owner=None,
                lease_expires_at=None,
                updated_at=now,
                error=error_obj(
                    "worker_lost",
                    f"the job was delivered {seen_attempt} times without finishing (max_attempts={max_attempts})",
                ),
            )
            .execution_options(synchronize_session=False)
        )
        if done.rowcount == 1:  # type: ignore[attr-defined]
            add_event(session, job_id, "giving up: too many attempts", "error", {"attempt": seen_attempt})
        session.commit()
        return Claim("exhausted", job_id, status=JobStatus.FAILED)
    result = session.execute(
        update(Job)
        .where(*_cas(job_id, seen_status, previous), Job.attempt == seen_attempt)
        .values(
            status=JobStatus.RUNNING,
            lease_owner=token,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            attempt=Job.attempt + 1,
            started_at=func.coalesce(Job.started_at, now),
            cancel_requested_at=None,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return Claim("raced", job_id)
    attempt = seen_attempt + 1
    note = f" (took over from {previous})" if previous else ""
    add_event(
        session, job_id, f"attempt {attempt} started on {token}{note}", data={"attempt": attempt, "worker": token}
    )
    session.commit()
    return Claim("claimed", job_id, job.type, job.owner, dict(job.params or {}), attempt, JobStatus.RUNNING)


def renew(session: Session, job_id: str, token: str, lease_seconds: float) -> LeaseVerdict:
    """Extend the lease; returns "ok", "cancelled" (job cancelled) or "lost" (someone else holds it)."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(*_cas(job_id, JobStatus.RUNNING, token))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now)
    )
    session.commit()
    if result.rowcount == 1:  # type: ignore[attr-defined]
        return "ok"
    return observe(session, job_id, token)


def observe(session: Session, job_id: str, token: str) -> LeaseVerdict:
    """ "ok" while this worker holds the running job, "cancelled" once it was cancelled, else "lost"."""
    row = session.execute(select(Job.status, Job.lease_owner).where(Job.id == job_id)).one_or_none()
    session.rollback()
    if row is None:
        return "lost"
    status, owner = row
    if status == JobStatus.CANCELLED:
        return "cancelled"
    return "ok" if status == JobStatus.RUNNING and owner == token else "lost"


def guard(session: Session, job_id: str, token: str) -> bool:
    """Inside a transaction: lock the row and check we still hold the running job (no commit)."""
    now = utcnow()
    result = session.execute(update(Job).where(*_cas(job_id, JobStatus.RUNNING, token)).values(updated_at=now))
    return result.rowcount == 1  # type: ignore[attr-defined]


def finish(
    session: Session,
    job_id: str,
    token: str,
    status: JobStatus,
    *,
    error: dict[str, Any] | None = None,
    result: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
) -> bool:
    """running -> succeeded | failed | cancelled for the lease holder. Does not commit."""
    now = utcnow()
    values: dict[str, Any] = dict(
        status=status, finished_at=now, lease_owner=None, lease_expires_at=None, updated_at=now, error=error
    )
    if result is not None:
        values["result"] = result
    if progress is not None:
        values["progress"] = progress
    done = session.execute(update(Job).where(*_cas(job_id, JobStatus.RUNNING, token)).values(**values))
    return done.rowcount == 1  # type: ignore[attr-defined]


def release(session: Session, job_id: str, token: str) -> None:
    """Drop our lease on a job that was cancelled under us (status stays cancelled). Does not commit."""
    session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == token).values(lease_owner=None, lease_expires_at=None)
    )


def cancel(session: Session, job: Job) -> bool:
    """Cancel a queued or running job (the worker stops at its next progress call). Does not commit."""
    if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
        return False
    now = utcnow()
    seen = job.status
    done = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == seen)
        .values(
            status=JobStatus.CANCELLED, cancel_requested_at=now, finished_at=now, updated_at=now, lease_expires_at=None
        )
        .execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(
        session,
        job.id,
        "cancelled by request" + (" while running" if seen == JobStatus.RUNNING else ""),
        "warning",
        {"previous_status": seen},
    )
    return True


def requeue_lost(session: Session, job: Job, reason: str, max_attempts: int) -> JobStatus | None:
    """running (lease lost) -> queued, or -> failed once attempts are exhausted. Does not commit.
    Returns the new status, or None if the row changed under us."""
    now = utcnow()
    seen_owner, seen_attempt = job.lease_owner, job.attempt
    if seen_attempt >= max_attempts:
        values: dict[str, Any] = dict(
            status=JobStatus.FAILED,
            finished_at=now,
            error=error_obj(
                "worker_lost", f"{reason}; the job was delivered {seen_attempt} times (max_attempts={max_attempts})"
            ),
        )
    else:
        values = dict(status=JobStatus.QUEUED, enqueued_at=None)
    done = session.execute(
        update(Job)
        .where(*_cas(job.id, JobStatus.RUNNING, seen_owner))
        .values(lease_owner=None, lease_expires_at=None, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return None
    status: JobStatus = values["status"]
    add_event(
        session,
        job.id,
        f"{reason}; " + ("requeued" if status == JobStatus.QUEUED else "giving up"),
        "warning" if status == JobStatus.QUEUED else "error",
        {"attempt": seen_attempt, "worker": seen_owner},
    )
    return status


def ensure_stages(session: Session, job_id: str, names: list[str]) -> dict[str, JobStage]:
    """The job's stage rows by name, creating missing ones (pending). Commits."""
    rows = {s.name: s for s in session.scalars(select(JobStage).where(JobStage.job_id == job_id))}
    for position, name in enumerate(names):
        if name not in rows:
            rows[name] = JobStage(job_id=job_id, name=name, position=position, status=StageStatus.PENDING)
            session.add(rows[name])
    session.commit()
    return rows
