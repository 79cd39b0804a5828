"""The Celery application: JSON only, late acks, one job per worker process, a reaper in the parent.

GPU-worker practice (see ../shared/docs/anchors.md §4): acks_late + reject_on_worker_lost, prefetch 1,
visibility timeout longer than the longest job, soft + hard time limits, prefork with one process that is
recycled after every task (CUDA is only ever initialised in that child: the ML core is imported inside
the task). The database job row is the truth; Celery only carries job ids, results are not stored.
Fan-out helpers (chorus.run_shards, sent as a group by a running job) follow the same rules; they meet
through the job_shards table, not through a chord (there is no result backend).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid

from celery import Celery, bootsteps, signals

from shared.config import get_settings
from shared.jobs.config import get_service_settings

log = logging.getLogger("chorus.worker")
RUN_JOB = "chorus.run_job"
RUN_SHARDS = "chorus.run_shards"  # a fan-out helper: work on the shards of one phase of a job (same queue)
MAIN_PID: int | None = None  # the worker parent's pid (set at worker_init)


def broker_url() -> str:
    url = get_settings().celery_broker_url
    for plain in ("sqla+postgres://", "sqla+postgresql://"):
        if url.startswith(plain):
            url = "sqla+postgresql+psycopg://" + url[len(plain) :]
    if url.startswith("sqla+sqlite:///"):
        os.makedirs(os.path.dirname(url.removeprefix("sqla+sqlite:///")) or ".", exist_ok=True)
    return url


def make_celery() -> Celery:
    svc = get_service_settings()
    url = broker_url()
    networked = url.split("://", 1)[0] in ("redis", "rediss", "amqp", "amqps", "pyamqp")
    app = Celery("chorus", broker=url, include=["services.worker.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=svc.job_time_limit,
        task_soft_time_limit=svc.soft_time_limit,
        # The SQLAlchemy transport hands its options to create_engine: none there (it never redelivers;
        # the reaper does). Networked brokers redeliver unacked jobs after the visibility timeout.
        broker_transport_options={"visibility_timeout": svc.broker_visibility_timeout} if networked else {},
        worker_max_tasks_per_child=1,
        worker_concurrency=1,
        worker_pool="prefork",
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        task_default_queue=svc.queue,
        task_routes={RUN_JOB: {"queue": svc.queue}, RUN_SHARDS: {"queue": svc.queue}},
        worker_enable_remote_control=networked,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    app.steps["worker"].add(ReaperStep)
    return app


def enqueue(job_id: str, task_id: str | None = None) -> str:
    """Send the job to the queue; returns the broker task id."""
    task_id = task_id or uuid.uuid4().hex
    celery_app.send_task(RUN_JOB, args=[job_id], task_id=task_id, queue=get_service_settings().queue)
    return task_id


def revoke(task_id: str | None) -> None:
    """Best effort: tell workers to drop a queued task (the database check at task start is the guarantee)."""
    if task_id and celery_app.conf.worker_enable_remote_control:
        try:
            celery_app.control.revoke(task_id)
        except Exception as exc:  # pragma: no cover - broker hiccup
            log.warning("revoke %s failed: %s", task_id, exc)


class ReaperStep(bootsteps.StartStopStep):
    """Runs shared.jobs.reaper in the worker parent: once at start, then every CHORUS_REAP_INTERVAL s."""

    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs):
        super().__init__(worker, **kwargs)
        self.tref = None

    def start(self, worker):
        interval = get_service_settings().reap_interval
        worker.timer.call_after(0.5, self.sweep)
        self.tref = worker.timer.call_repeatedly(interval, self.sweep)

    def stop(self, worker):
        if self.tref is not None:
            self.tref.cancel()

    def sweep(self) -> None:
        from shared.jobs.reaper import reap

        try:
            reap(enqueue)
        except Exception:
            log.exception("reaper sweep failed")


@signals.worker_init.connect
def _on_worker_init(**_):
    global MAIN_PID
    MAIN_PID = os.getpid()
    svc = get_service_settings()
    if svc.migrate_on_start:
        from shared.db.session import migrate

        migrate()


@signals.worker_ready.connect
def _on_worker_ready(**_):
    heavy = [m for m in ("torch", "transformers", "bitsandbytes") if m in sys.modules]
    if heavy:
        log.error("worker parent imported %s before forking: CUDA could be initialised in the parent", heavy)
    else:
        log.info("worker ready; parent is free of torch (ML code is imported in the task process only)")


@signals.worker_process_init.connect
def _on_child_init(**_):
    from shared.db.session import dispose_engines

    dispose_engines()


celery_app = make_celery()
