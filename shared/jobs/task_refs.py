"""Which queued or running jobs name a task: an imported task must not be deleted under them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import Job, JobStatus

ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
_TASK_KEYS = frozenset({"tasks", "groups", "subsets", "task"})  # params keys that hold task names (nested lists)


def _strings(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, list):
        return set().union(*(_strings(v) for v in value)) if value else set()
    return set()


def task_names_in(params: Any) -> set[str]:
    """The task names a job's params mention: under tasks/groups/subsets/task, at any depth of nested params."""
    found: set[str] = set()
    if isinstance(params, dict):
        for key, value in params.items():
            if key in _TASK_KEYS:
                found |= _strings(value)
            found |= task_names_in(value)
    elif isinstance(params, list):
        for value in params:
            found |= task_names_in(value)
    return found


def active_jobs_using(session: Session, task_name: str) -> list[str]:
    """Ids of the queued or running jobs (of any owner) whose params name `task_name`, oldest first."""
    rows = (
        session.execute(select(Job.id, Job.params).where(Job.status.in_(ACTIVE_STATUSES)).order_by(Job.created_at))
        .tuples()
        .all()
    )
    return [job_id for job_id, params in rows if task_name in task_names_in(params)]
