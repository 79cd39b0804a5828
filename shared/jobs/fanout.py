"""Fan-out: a job's shardable phases (gradient passes, subset estimations) run on several workers at once.

Queue-agnostic (no queue framework is imported here); the database is the only coordination:

- The job's own worker (the "parent", running JobRunner) meets a phase through the stage's sharder
  (`JobSharder`, installed around the stage with shared.ml.sharding.use_sharder). It creates one
  `JobShard` row per range (idempotent: rows that exist are kept, so a resumed job continues them),
  asks the queue for helpers through the injected `dispatch(job_id, phase, helpers)`, then works on the
  shards itself and waits until all are done, picking up any shard whose worker died meanwhile.
  A job with a single worker therefore still finishes (its queued helpers later find nothing to do).
- A helper (`run_helper(job_id, phase)`, the body of a queue task) runs the phase's `prepare` (loads the
  model, before it holds any shard), then claims shards of the phase and runs them until none is
  claimable, and returns. It does nothing when the job is finished or cancelled, and stops at the next
  progress call of a shard once the job is cancelled.

Claims are compare-and-set updates (status + attempts) that bump `attempts`, so exactly one worker wins a
shard. A claimant renews the shard's lease every lease/3 seconds while it works (`ShardHeartbeat`); a
shard whose lease expired, or whose claimant's pid is gone on this host, is claimable again. A worker that
loses its claim drops the shard at its next progress call (ClaimLost) and goes on with the next one.
Shard functions are idempotent (finished work is skipped), so a shard redone after its worker died
produces the same files. A shard that raised goes back to pending with its error; after `max_attempts`
claims it is marked failed and the phase fails.

All workers must share the job's workdir (settings.workdir_root / job_id): shards write their outputs
there and the parent merges them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from shared.db.models import SHARD_STATUSES, TERMINAL_STATUSES, Job, JobShard, ShardStatus, utcnow
from shared.db.session import get_sessionmaker
from shared.files import json_safe
from shared.jobs import state
from shared.jobs.config import ServiceSettings, get_service_settings
from shared.jobs.progress import Heartbeat
from shared.jobs.registry import load_ref
from shared.ml.progress import Cancelled, Progress
from shared.ml.sharding import Phase

log = logging.getLogger("chorus.fanout")

# dispatch(job_id, phase, helpers): ask the queue for `helpers` helper tasks run_helper(job_id, phase).
Dispatch = Callable[[str, str, int], None]
# Only functions of the ML core may be named by a shard's spec.
SHARD_FN_PREFIX = "shared.ml."


def worker_id() -> str:
    """hostname:pid of this process (what `claimed_by` records)."""
    return f"{state.HOSTNAME}:{os.getpid()}"


class ClaimLost(Cancelled):
    """Raised into a shard function once its worker lost the claim (another worker took the shard over
    after the lease expired): this worker drops the shard and goes on with the next one."""


@dataclass(frozen=True)
class ShardClaim:
    id: int
    job_id: str
    phase: str
    index: int
    start: int
    end: int
    attempt: int  # the shard's `attempts` after this claim: identifies the claim in later updates
    total: int  # shards in the phase
    spec: dict[str, Any]
    worker: str

    @property
    def label(self) -> str:
        return str(self.spec.get("label") or self.phase)


# -- the table ---------------------------------------------------------------------------------------
def ensure_shards(
    session: Session, job_id: str, phase: str, ranges: list[tuple[int, int]], spec: dict[str, Any]
) -> int:
    """Create the phase's shard rows unless the phase has rows already (then they are kept as they are,
    e.g. on a resumed job). Idempotent and safe against a concurrent creator. Commits; returns the count."""
    count = _count(session, job_id, phase)
    if count:
        return count
    now = utcnow()
    for index, (start, end) in enumerate(ranges):
        session.add(
            JobShard(
                job_id=job_id,
                phase=phase,
                index=index,
                start=int(start),
                end=int(end),
                status=ShardStatus.PENDING,
                attempts=0,
                spec=spec,
                created_at=now,
                updated_at=now,
            )
        )
    try:
        session.commit()
    except IntegrityError:  # another creator won; its rows are the phase's rows
        session.rollback()
    return _count(session, job_id, phase)


def _count(session: Session, job_id: str, phase: str) -> int:
    n = session.scalar(
        select(func.count()).select_from(JobShard).where(JobShard.job_id == job_id, JobShard.phase == phase)
    )
    session.rollback()
    return int(n or 0)


def _expired(now: datetime) -> Any:
    return or_(JobShard.lease_expires_at.is_(None), JobShard.lease_expires_at < now)


def claimable_clause(now: datetime, max_attempts: int) -> Any:
    return and_(
        JobShard.attempts < max_attempts,
        or_(JobShard.status == ShardStatus.PENDING, and_(JobShard.status == ShardStatus.RUNNING, _expired(now))),
    )


def claim_shard(
    session: Session, job_id: str, phase: str, worker: str, lease_seconds: float, max_attempts: int
) -> ShardClaim | None:
    """Claim the first claimable shard of the phase: pending, or running with an expired lease or a dead
    claimant (same host). A compare-and-set on (status, attempts): one claimant wins. Commits."""
    now = utcnow()
    candidates = session.execute(
        select(JobShard.id, JobShard.status, JobShard.attempts, JobShard.claimed_by, JobShard.lease_expires_at)
        .where(
            JobShard.job_id == job_id,
            JobShard.phase == phase,
            JobShard.status.in_((ShardStatus.PENDING, ShardStatus.RUNNING)),
            JobShard.attempts < max_attempts,
        )
        .order_by(JobShard.index)
    ).all()
    session.rollback()
    for shard_id, status, attempts, claimed_by, expires in candidates:
        cas = [JobShard.id == shard_id, JobShard.status == status, JobShard.attempts == attempts]
        if status == ShardStatus.RUNNING:
            if state.owner_is_dead(claimed_by):
                pass  # its pid is gone: claimable now (the CAS on attempts keeps it to one claimant)
            elif expires is None or expires < now:
                cas.append(_expired(now))  # re-checked in the update: a renewal in between wins
            else:
                continue
        done = session.execute(
            update(JobShard)
            .where(*cas)
            .values(
                status=ShardStatus.RUNNING,
                claimed_by=worker,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=JobShard.attempts + 1,
                started_at=now,
                finished_at=None,
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            continue
        row = session.get(JobShard, shard_id, populate_existing=True)
        assert row is not None
        total = session.scalar(
            select(func.count()).select_from(JobShard).where(JobShard.job_id == job_id, JobShard.phase == phase)
        )
        claim = ShardClaim(
            row.id,
            job_id,
            phase,
            row.index,
            row.start,
            row.end,
            row.attempts,
            int(total or 0),
            dict(row.spec or {}),
            worker,
        )
        session.commit()
        if status == ShardStatus.RUNNING:
            log.warning(
                "shard %s/%d of job %s taken over from %s (attempt %d)",
                phase,
                row.index,
                job_id,
                claimed_by,
                claim.attempt,
            )
        return claim
    return None


def _mine(claim: ShardClaim) -> list[Any]:
    return [JobShard.id == claim.id, JobShard.status == ShardStatus.RUNNING, JobShard.attempts == claim.attempt]


def renew_shard(session: Session, claim: ShardClaim, lease_seconds: float) -> bool:
    """Extend the claim's lease; False when the claim was lost (taken over after expiry). Commits."""
    now = utcnow()
    done = session.execute(
        update(JobShard)
        .where(*_mine(claim))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
    )
    session.commit()
    return done.rowcount == 1  # type: ignore[attr-defined]


def complete_shard(session: Session, claim: ShardClaim, result: dict[str, Any] | None = None) -> bool:
    """Mark the claimed shard done and log an event on the job ("<label>: shard k/n done by host:pid").
    False (nothing written) when the claim was lost. Commits."""
    now = utcnow()
    # The job row's lock serialises completions of one job, so each one counts the others' (committed) rows:
    # two shards finishing together get "k/n" and "k+1/n", never the same k. Taken first: job, then shard.
    session.execute(select(Job.id).where(Job.id == claim.job_id).with_for_update())
    done = session.execute(
        update(JobShard)
        .where(*_mine(claim))
        .values(
            status=ShardStatus.DONE,
            lease_expires_at=None,
            finished_at=now,
            updated_at=now,
            result=json_safe(result or {}),
        )
    )
    if done.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        return False
    finished = int(
        session.scalar(
            select(func.count())
            .select_from(JobShard)
            .where(JobShard.job_id == claim.job_id, JobShard.phase == claim.phase, JobShard.status == ShardStatus.DONE)
        )
        or 0
    )
    unit = claim.spec.get("unit", "items")
    state.add_event(
        session,
        claim.job_id,
        f"{claim.label}: shard {finished}/{claim.total} done by {claim.worker}",
        data={
            "type": "shard",
            "phase": claim.phase,
            "shard": claim.index,
            "start": claim.start,
            "end": claim.end,
            "unit": unit,
            "worker": claim.worker,
            "attempt": claim.attempt,
            "done": finished,
            "total": claim.total,
        },
    )
    session.commit()
    return True


def release_shard(session: Session, claim: ShardClaim, error: str | None = None) -> bool:
    """Give a claimed, unfinished shard back (pending; `error` kept for the record). Commits."""
    now = utcnow()
    done = session.execute(
        update(JobShard)
        .where(*_mine(claim))
        .values(
            status=ShardStatus.PENDING, lease_expires_at=None, updated_at=now, error=error[-4000:] if error else None
        )
    )
    session.commit()
    return done.rowcount == 1  # type: ignore[attr-defined]


def fail_exhausted(session: Session, job_id: str, phase: str, max_attempts: int) -> list[dict[str, Any]]:
    """Mark failed the unfinished shards that used up their attempts and are not being worked on. Commits;
    returns the phase's failed shards (index, start, end, attempts, error)."""
    now = utcnow()
    stuck = and_(
        JobShard.job_id == job_id,
        JobShard.phase == phase,
        JobShard.attempts >= max_attempts,
        or_(JobShard.status == ShardStatus.PENDING, and_(JobShard.status == ShardStatus.RUNNING, _expired(now))),
    )
    session.execute(
        update(JobShard)
        .where(stuck)
        .values(status=ShardStatus.FAILED, lease_expires_at=None, updated_at=now, finished_at=now)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    failed = session.execute(
        select(JobShard.index, JobShard.start, JobShard.end, JobShard.attempts, JobShard.error)
        .where(JobShard.job_id == job_id, JobShard.phase == phase, JobShard.status == ShardStatus.FAILED)
        .order_by(JobShard.index)
    ).all()
    session.rollback()
    return [dict(row._mapping) for row in failed]


def phase_counts(session: Session, job_id: str, phase: str) -> dict[str, int]:
    rows = session.execute(
        select(JobShard.status, func.count())
        .where(JobShard.job_id == job_id, JobShard.phase == phase)
        .group_by(JobShard.status)
    ).all()
    session.rollback()
    counts = {s: 0 for s in SHARD_STATUSES}
    counts.update({status: int(n) for status, n in rows})
    counts["total"] = sum(counts[s] for s in SHARD_STATUSES)
    return counts


def has_claimable(session: Session, job_id: str, phase: str, max_attempts: int) -> bool:
    """Is there a shard a worker could claim now? (Dead claimants are only seen by claim_shard.)"""
    found = session.scalar(
        select(JobShard.id)
        .where(JobShard.job_id == job_id, JobShard.phase == phase, claimable_clause(utcnow(), max_attempts))
        .limit(1)
    )
    session.rollback()
    return found is not None


def job_status(session: Session, job_id: str) -> str | None:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    session.rollback()
    return status


# -- working on shards -------------------------------------------------------------------------------
class ShardHeartbeat(Heartbeat):
    """Renews one claim's lease every lease/3 seconds in a thread; `lost` is set once the claim is gone."""

    def __init__(self, claim: ShardClaim, lease_seconds: float, maker: sessionmaker[Session]) -> None:
        self.claim, self.lease_seconds, self.maker = claim, lease_seconds, maker
        self.lost = threading.Event()
        super().__init__(f"shard-{claim.id}")

    def _run(self) -> None:
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                with self.maker() as session:
                    if not renew_shard(session, self.claim, self.lease_seconds):
                        log.warning(
                            "lost the claim of shard %s/%d of job %s",
                            self.claim.phase,
                            self.claim.index,
                            self.claim.job_id,
                        )
                        self.lost.set()
                        return
            except Exception:  # a database hiccup must not kill the heartbeat
                log.exception(
                    "heartbeat of shard %s/%d of job %s failed", self.claim.phase, self.claim.index, self.claim.job_id
                )


class _ClaimProgress:
    """The progress callback a shard function gets: forwards to the worker's own callback, and raises
    Cancelled once this worker lost the claim (so two workers never write one shard for long)."""

    def __init__(self, inner: Progress, heartbeat: ShardHeartbeat) -> None:
        self.inner, self.heartbeat = inner, heartbeat

    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None:
        if self.heartbeat.lost.is_set():
            raise ClaimLost("lost the shard's claim")
        self.inner(stage, done, total, message)


def shard_function(ref: str) -> Callable[..., dict[str, Any]]:
    if not isinstance(ref, str) or not ref.startswith(SHARD_FN_PREFIX):
        raise ValueError(f"shard function {ref!r} is not a function of the ML core")
    return load_ref(ref)


def run_claim(
    claim: ShardClaim,
    progress: Progress,
    cache: dict[str, Any],
    *,
    settings: ServiceSettings,
    maker: sessionmaker[Session],
    check: Callable[[], None] | None = None,
) -> bool:
    """Run one claimed shard under a heartbeat and mark it done (True), or give it back and re-raise."""
    heartbeat = ShardHeartbeat(claim, settings.lease_seconds, maker).start()
    guarded = _ClaimProgress(progress, heartbeat)
    try:
        _test_delay(settings.fanout_shard_delay, heartbeat, check)
        fn = shard_function(str(claim.spec.get("fn")))
        workdir = settings.workdir_root / claim.job_id
        workdir.mkdir(parents=True, exist_ok=True)
        result = fn(dict(claim.spec.get("args") or {}), workdir, guarded, claim.start, claim.end, cache)
    except BaseException as exc:
        heartbeat.stop()
        try:
            with maker() as session:
                release_shard(session, claim, None if isinstance(exc, Cancelled) else f"{type(exc).__name__}: {exc}")
        except Exception:  # the database is away: the lease expires and the shard is claimable again
            log.exception("could not give back shard %s/%d of job %s", claim.phase, claim.index, claim.job_id)
        raise
    heartbeat.stop()
    with maker() as session:
        ok = complete_shard(session, claim, result if isinstance(result, dict) else {"result": result})
    if not ok:
        log.warning(
            "shard %s/%d of job %s was finished here after its claim was lost (outputs are idempotent)",
            claim.phase,
            claim.index,
            claim.job_id,
        )
    return ok


def _test_delay(seconds: float, heartbeat: ShardHeartbeat, check: Callable[[], None] | None) -> None:
    """settings.fanout_shard_delay (tests only; 0 in production): hold the claim a while before running it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if heartbeat.lost.is_set():
            raise ClaimLost("lost the shard's claim")
        if check is not None:
            check()
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


def work_on_phase(
    job_id: str,
    phase: str,
    progress: Progress,
    cache: dict[str, Any],
    *,
    settings: ServiceSettings | None = None,
    stop: Callable[[], bool] | None = None,
    check: Callable[[], None] | None = None,
    maker: sessionmaker[Session] | None = None,
    worker: str | None = None,
) -> list[ShardClaim]:
    """Claim and run shards of the phase until none is claimable (or `stop()`); returns the shards done here.
    An exception of a shard function propagates (the shard is given back first); `check()` may raise
    Cancelled between shards."""
    settings = settings or get_service_settings()
    maker = maker or get_sessionmaker()
    worker = worker or worker_id()
    done: list[ShardClaim] = []
    while not (stop and stop()):
        if check is not None:
            check()
        with maker() as session:
            claim = claim_shard(session, job_id, phase, worker, settings.lease_seconds, settings.max_attempts)
        if claim is None:
            break
        try:
            if run_claim(claim, progress, cache, settings=settings, maker=maker, check=check):
                done.append(claim)
        except ClaimLost:
            log.warning("dropped shard %s/%d of job %s: its claim was taken over", phase, claim.index, job_id)
    return done


# -- the parent's side: a sharder for the stage -----------------------------------------------------
class JobSharder:
    """shared.ml.sharding.Sharder for a job: fans a phase out over the queue's workers (see module doc)."""

    def __init__(
        self,
        job_id: str,
        settings: ServiceSettings | None = None,
        dispatch: Dispatch | None = None,
        check: Callable[[], None] | None = None,
        maker: sessionmaker[Session] | None = None,
    ) -> None:
        """`check()` raises Cancelled once the job should stop (called while waiting on other workers)."""
        self.job_id = job_id
        self.settings = settings or get_service_settings()
        self.shards = self.settings.fanout_shards
        self.dispatch = dispatch
        self.check = check or (lambda: None)
        self.maker = maker or get_sessionmaker()

    def run(self, phase: Phase, workdir: Path, progress: Progress, cache: dict[str, Any]) -> None:
        spec = {"fn": phase.fn, "prepare": phase.prepare, "args": phase.args, "label": phase.label, "unit": phase.unit}
        ranges = phase.ranges(self.shards)
        with self.maker() as session:
            total = ensure_shards(session, self.job_id, phase.name, ranges, spec)
            counts = phase_counts(session, self.job_id, phase.name)
        open_shards = total - counts["done"]
        helpers = 0
        if open_shards > 1 and self.dispatch is not None:
            wanted = self.settings.fanout_helpers if self.settings.fanout_helpers is not None else self.shards - 1
            helpers = max(0, min(wanted, open_shards - 1))
        with self.maker() as session:
            state.add_event(
                session,
                self.job_id,
                f"{phase.label}: {phase.size} {phase.unit} in {total} shard(s), {counts['done']} done; "
                f"asking for {helpers} helper(s)",
                data={
                    "type": "fanout",
                    "phase": phase.name,
                    "shards": total,
                    "size": phase.size,
                    "unit": phase.unit,
                    "done": counts["done"],
                    "helpers": helpers,
                },
            )
            session.commit()
        if helpers:
            try:
                assert self.dispatch is not None
                self.dispatch(self.job_id, phase.name, helpers)
            except Exception as exc:  # the broker is down: this worker does the phase alone
                log.warning("could not dispatch helpers for %s/%s: %s", self.job_id, phase.name, exc)
        self.wait(phase.name, phase.label, progress, cache)

    def wait(self, phase: str, label: str, progress: Progress, cache: dict[str, Any]) -> None:
        """Work on the phase's shards and wait until all are done (re-claiming those of dead workers).
        The job's progress gets the shard count whenever it changes; `check()` runs between polls."""
        poll = min(1.0, self.settings.lease_seconds / 4)
        seen_done = -1
        while True:
            work_on_phase(
                self.job_id, phase, progress, cache, settings=self.settings, maker=self.maker, check=self.check
            )
            with self.maker() as session:
                counts = phase_counts(session, self.job_id, phase)
            if counts["done"] != seen_done or counts["done"] == counts["total"]:
                seen_done = counts["done"]
                progress(f"{label} shards", counts["done"], counts["total"], f"({counts['running']} running)")
            if counts["done"] == counts["total"]:
                self._summarize(phase, label)
                return
            with self.maker() as session:
                failed = fail_exhausted(session, self.job_id, phase, self.settings.max_attempts)
            if failed:
                first = failed[0]
                raise RuntimeError(
                    f"{label}: shard {first['index']} ([{first['start']}, {first['end']})) failed after "
                    f"{first['attempts']} attempt(s): {first['error'] or 'its worker was lost'}"
                )
            self.check()
            time.sleep(poll)

    def _summarize(self, phase: str, label: str) -> None:
        with self.maker() as session:
            rows = session.execute(
                select(JobShard.claimed_by).where(JobShard.job_id == self.job_id, JobShard.phase == phase)
            ).all()
            by = Counter(str(r[0]) for r in rows)
            text = ", ".join(f"{n} by {w}" for w, n in sorted(by.items()))
            state.add_event(
                session,
                self.job_id,
                f"{label}: all {sum(by.values())} shards done ({text})",
                data={"type": "fanout", "phase": phase, "status": "done", "workers": dict(by)},
            )
            session.commit()


# -- the helper's side -------------------------------------------------------------------------------
class _JobWatch:
    """Raises Cancelled (at most one database read a second) once the job is finished or cancelled."""

    def __init__(self, job_id: str, maker: sessionmaker[Session]) -> None:
        self.job_id, self.maker = job_id, maker
        self._checked = 0.0
        self.status: str | None = None

    def active(self) -> bool:
        now = time.monotonic()
        if now - self._checked >= 1.0 or self.status is None:
            self._checked = now
            with self.maker() as session:
                self.status = job_status(session, self.job_id)
        return self.status is not None and self.status not in TERMINAL_STATUSES

    def check(self) -> None:
        if not self.active():
            raise Cancelled(f"job {self.job_id} is {self.status}")

    def __call__(self, stage: str, done: int, total: int, message: str = "") -> None:
        self.check()


def helper_wanted(
    job_id: str, phase: str, settings: ServiceSettings | None = None, maker: sessionmaker[Session] | None = None
) -> bool:
    """Cheap check (no ML import): is the job unfinished and does the phase have a claimable shard?"""
    settings = settings or get_service_settings()
    maker = maker or get_sessionmaker()
    with maker() as session:
        status = job_status(session, job_id)
        if status is None or status in TERMINAL_STATUSES:
            return False
        if has_claimable(session, job_id, phase, settings.max_attempts):
            return True
        # a running shard whose claimant died on this host is claimable too
        owners = session.scalars(
            select(JobShard.claimed_by).where(
                JobShard.job_id == job_id, JobShard.phase == phase, JobShard.status == ShardStatus.RUNNING
            )
        ).all()
        session.rollback()
    return any(state.owner_is_dead(o) for o in owners)


def phase_spec(session: Session, job_id: str, phase: str) -> dict[str, Any] | None:
    spec = session.scalar(
        select(JobShard.spec)
        .where(JobShard.job_id == job_id, JobShard.phase == phase)
        .order_by(JobShard.index)
        .limit(1)
    )
    session.rollback()
    return dict(spec) if spec is not None else None


def _prepare(
    job_id: str, phase: str, cache: dict[str, Any], settings: ServiceSettings, maker: sessionmaker[Session]
) -> None:
    with maker() as session:
        spec = phase_spec(session, job_id, phase) or {}
    if spec.get("prepare"):
        prepare = shard_function(str(spec["prepare"]))
        prepare(dict(spec.get("args") or {}), settings.workdir_root / job_id, cache)


def run_helper(
    job_id: str, phase: str, settings: ServiceSettings | None = None, maker: sessionmaker[Session] | None = None
) -> dict[str, Any]:
    """The body of a helper task: run the phase's `prepare` (load the model), then work on its shards until
    none is claimable, and return. Idempotent: nothing happens when the job is finished or cancelled or
    the phase has nothing to claim."""
    settings = settings or get_service_settings()
    maker = maker or get_sessionmaker()
    out: dict[str, Any] = {"job_id": job_id, "phase": phase, "worker": worker_id(), "shards": []}
    if not helper_wanted(job_id, phase, settings, maker):
        log.info("helper for %s/%s: nothing to do", job_id, phase)
        return {**out, "outcome": "nothing to do"}
    watch = _JobWatch(job_id, maker)
    cache: dict[str, Any] = {}
    try:
        _prepare(job_id, phase, cache, settings, maker)  # e.g. load the model before holding any shard
        watch.check()
        done = work_on_phase(job_id, phase, watch, cache, settings=settings, maker=maker, check=watch.check)
    except Cancelled as exc:
        log.info("helper for %s/%s stopped: %s", job_id, phase, exc)
        return {**out, "outcome": "stopped"}
    except Exception:
        # the shard went back to pending with its error; the job's own worker will retry it (and fail the
        # stage with the full error if it fails there too)
        log.exception("helper for %s/%s failed", job_id, phase)
        return {**out, "outcome": "error"}
    out["shards"] = [c.index for c in done]
    log.info("helper for %s/%s done: shards %s", job_id, phase, out["shards"])
    return {**out, "outcome": "done"}
