"""Celery tasks: thin wrappers around shared.jobs.runner and shared.jobs.fanout (the ML core is imported
inside the task process only, never in the worker parent that forks)."""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import group

from services.worker import celery_app as worker_app
from services.worker.celery_app import RUN_JOB, RUN_SHARDS, celery_app
from shared.jobs.config import get_service_settings

log = logging.getLogger("chorus.worker")


def _hard_stop() -> None:
    """Leave the pool child now (a cancelled stage that never calls progress). The broker redelivers the
    message (reject_on_worker_lost); the next delivery sees the cancelled row and does nothing."""
    log.warning("hard-stopping worker process %s", os.getpid())
    os._exit(3)


@celery_app.task(name=RUN_JOB, bind=True, ignore_result=True)
def run_job(self: Any, job_id: str) -> dict[str, Any]:
    """Run, resume or skip one job (idempotent: the database row decides)."""
    from shared.jobs.runner import run_job as run

    in_child = worker_app.MAIN_PID is not None and os.getpid() != worker_app.MAIN_PID
    return run(job_id, hard_stop=_hard_stop if in_child else None, dispatch=dispatch_shards)


def dispatch_shards(job_id: str, phase: str, helpers: int) -> None:
    """Fan a phase out: a group of `helpers` chorus.run_shards tasks on the job queue. No chord: the job's
    own task works on the shards too and waits for them in the database (so one worker alone finishes)."""
    if helpers > 0:
        group(run_shards.si(job_id, phase) for _ in range(helpers)).apply_async(queue=get_service_settings().queue)


@celery_app.task(name=RUN_SHARDS, bind=True, ignore_result=True)
def run_shards(self: Any, job_id: str, phase: str) -> dict[str, Any]:
    """Help a running job: work on the shards of `phase` until none is claimable, then return. Idempotent:
    nothing happens when the job is finished or cancelled (checked before the ML core is imported)."""
    from shared.jobs.fanout import run_helper

    return run_helper(job_id, phase)
