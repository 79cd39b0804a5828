"""The job runner's side of `shared.ml.progress`: a lease heartbeat thread and a progress callback that
writes progress and events to the database and raises `Cancelled` once the job was cancelled."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from sqlalchemy import update

from shared.db.models import Job, JobStatus, utcnow
from shared.db.session import get_sessionmaker
from shared.jobs import state
from shared.ml.progress import Cancelled, StageMeter

log = logging.getLogger("chorus.jobs")


class Heartbeat:
    """A daemon thread running `_run` until `stop()`; `_stop` is the event `_run` waits on."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        raise NotImplementedError


class Lease(Heartbeat):
    """Renews a job's lease every lease/3 seconds and watches for cancellation (about once a second).

    `hard_stop` (optional) is called when the job was cancelled or the lease was lost and the stage is
    still running `grace` seconds later: a stage that never calls progress is stopped from outside.
    """

    def __init__(
        self,
        job_id: str,
        token: str,
        lease_seconds: float,
        grace: float = 0.0,
        hard_stop: Callable[[], None] | None = None,
    ) -> None:
        self.job_id, self.token, self.lease_seconds = job_id, token, lease_seconds
        self.grace, self.hard_stop = grace, hard_stop
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        super().__init__(f"lease-{job_id}")

    @property
    def stopping(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set()

    def note(self, verdict: state.LeaseVerdict) -> None:
        if verdict == "cancelled":
            self.cancelled.set()
        elif verdict == "lost":
            self.lost.set()

    def _run(self) -> None:
        maker = get_sessionmaker()
        tick = min(1.0, self.lease_seconds / 3)
        renew_every = self.lease_seconds / 3
        last_renew = time.monotonic()
        stopping_since: float | None = None
        while not self._stop.wait(tick):
            try:
                with maker() as session:
                    if time.monotonic() - last_renew >= renew_every:
                        verdict = state.renew(session, self.job_id, self.token, self.lease_seconds)
                        last_renew = time.monotonic()
                    else:
                        verdict = state.observe(session, self.job_id, self.token)
                self.note(verdict)
            except Exception:  # a database hiccup must not kill the heartbeat
                log.exception("lease heartbeat of %s failed", self.job_id)
            if self.stopping:
                stopping_since = stopping_since or time.monotonic()
                if self.hard_stop and self.grace > 0 and time.monotonic() - stopping_since > self.grace:
                    log.warning("job %s did not stop within %.0fs of cancellation; hard stop", self.job_id, self.grace)
                    self.hard_stop()
                    return


class JobProgress:
    """The `progress(stage, done, total, message)` callback handed to library stages.

    Writes the job's progress JSON at most every `interval` seconds (and at the end of each step),
    appends a progress event at most every `event_interval` seconds per step, and raises Cancelled as
    soon as the job was cancelled or this worker lost its lease.
    """

    def __init__(
        self,
        job_id: str,
        token: str,
        lease: Lease,
        stage: str,
        stage_index: int,
        stage_count: int,
        interval: float = 0.5,
        event_interval: float = 2.0,
    ) -> None:
        self.job_id, self.token, self.lease = job_id, token, lease
        self.stage, self.stage_index, self.stage_count = stage, stage_index, stage_count
        self.interval, self.event_interval = interval, event_interval
        self._last_write = 0.0
        self._last_event: dict[str, float] = {}
        self._maker = get_sessionmaker()
        self._meter = StageMeter()  # the stage's fraction from its steps, never decreasing

    def snapshot(self, step: str | None, done: int, total: int, message: str = "") -> dict[str, Any]:
        fraction = self._meter.update(step or "", done, total) if step is not None else self._meter.fraction
        overall = (self.stage_index + min(max(fraction, 0.0), 1.0)) / max(self.stage_count, 1)
        return {
            "stage": self.stage,
            "stage_index": self.stage_index,
            "stage_count": self.stage_count,
            "step": step,
            "done": done,
            "total": total,
            "message": message,
            "percent": round(100.0 * overall, 2),
        }

    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self.lease.stopping:
            raise Cancelled("job cancelled" if self.lease.cancelled.is_set() else "lease lost")
        now = time.monotonic()
        step_end = total > 0 and done >= total
        new_step = stage not in self._last_event
        if not (step_end or new_step or now - self._last_write >= self.interval):
            return
        self._last_write = now
        snap = self.snapshot(stage, done, total, message)
        want_event = step_end or new_step or now - self._last_event.get(stage, 0.0) >= self.event_interval
        with self._maker() as session:
            ok = (
                session.execute(
                    update(Job)
                    .where(Job.id == self.job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == self.token)
                    .values(progress=snap, updated_at=utcnow())
                ).rowcount  # type: ignore[attr-defined]
                == 1
            )
            if ok and want_event:
                self._last_event[stage] = now
                text = f"{stage}: {done}/{total}" + (f" {message}" if message else "")
                state.add_event(session, self.job_id, text, data={"type": "progress", **snap})
            session.commit()
            if not ok:
                self.lease.note(state.observe(session, self.job_id, self.token))
                if not self.lease.stopping:
                    self.lease.lost.set()
        if self.lease.stopping:
            raise Cancelled("job cancelled" if self.lease.cancelled.is_set() else "lease lost")
