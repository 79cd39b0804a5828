"""Celery tasks: thin wrappers around shared.jobs.runner (the ML core is imported inside the task)."""

from __future__ import annotations

import logging
import os
from typing import Any

from services.worker import celery_app as worker_app
from services.worker.celery_app import RUN_JOB, celery_app

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
    return run(job_id, hard_stop=_hard_stop if in_child else None)
