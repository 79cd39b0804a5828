"""Submitting tiny-llama jobs through the API and auditing them in the database after a fault: every job
must end `succeeded` exactly once (one "job succeeded" event, each stage finished once, one artifact row
per stage and name); anything else is counted as lost or duplicated."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from tests.integration.conftest import TERMINAL, auth

# Seconds of work on a CPU: a few forward passes per example.
QUICK = {"model": "tiny-llama", "tasks": ["cb", "rte"], "max_examples": 8}
# Reports progress after every example (to meet a database outage mid-stage).
STEPPED = {**QUICK, "batch_size": 1}


class BlipParams(BaseModel):
    """Params of the test job type "fault_blip" (tests/faults/test_recovery.py): none."""


BLIPS: dict[str, int] = {"left": 0}  # database errors the next blip_stage calls still raise


def blip_stage(params: BlipParams, workdir: Path, progress: Any) -> dict[str, Any]:
    """A stage whose progress write hits a dropped database connection while BLIPS["left"] > 0."""
    progress("blip", 0, 1)
    if BLIPS["left"] > 0:
        BLIPS["left"] -= 1
        raise OperationalError("UPDATE jobs SET progress=...", {}, ConnectionError("server closed the connection"))
    (workdir / "out.json").write_text('{"ok": true}')
    progress("blip", 1, 1)
    return {"artifacts": {"out": "out.json"}}


def submit(api: Any, key: str, params: dict[str, Any], seed: int = 0) -> str:
    r = api.post("/v1/jobs", headers=auth(key), json={"type": "evaluation", "params": {**params, "seed": seed}})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def row(job_id: str) -> Any:
    from shared.db.models import Job
    from shared.db.session import session_scope

    with session_scope() as session:
        job = session.get(Job, job_id)
        session.expunge(job)
        return job


def events(job_id: str) -> list[Any]:
    from shared.db.models import JobEvent
    from shared.db.session import session_scope

    with session_scope() as session:
        rows = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
        for e in rows:
            session.expunge(e)
        return list(rows)


def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    """Poll `predicate` (database errors count as "not yet") until true or `timeout`; whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except Exception:  # the database may be restarting
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def wait_terminal(job_ids: list[str], timeout: float) -> bool:
    return wait_until(lambda: all(row(j).status in TERMINAL for j in job_ids), timeout, 0.5)


def stage_running(job_id: str) -> str | None:
    """The lease owner token while one of the job's stages is running (else None)."""
    from shared.db.models import JobStage
    from shared.db.session import session_scope

    job = row(job_id)
    if job.status != "running":
        return None
    with session_scope() as session:
        busy = session.scalar(select(JobStage.id).where(JobStage.job_id == job_id, JobStage.status == "running"))
    return str(job.lease_owner) if busy is not None else None


def pid_of(token: str) -> int:
    """The job process's pid from its lease token (host:pid:random)."""
    return int(token.split(":")[1])


def freeze_mid_stage(job_id: str, timeout: float) -> str:
    """SIGSTOP the job's process while one of its stages runs, checked once it is frozen (a stage that
    ended in between is let go and awaited again). Returns the frozen process's lease token."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wait_until(lambda: stage_running(job_id), deadline - time.monotonic(), 0.1)
        token = stage_running(job_id)
        if token is None:
            continue
        try:
            os.kill(pid_of(token), signal.SIGSTOP)
        except ProcessLookupError:
            continue
        if stage_running(job_id) == token:
            return token
        os.kill(pid_of(token), signal.SIGCONT)
    raise AssertionError(f"job {job_id} never had a running stage within {timeout:.0f}s: {row(job_id).status}")


@dataclass
class Tally:
    scenario: str
    submitted: int = 0
    completed: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    resends: int = 0

    def line(self) -> str:
        return (
            f"faults[{self.scenario}]: submitted={self.submitted} completed={self.completed} "
            f"lost={len(self.lost)} duplicated={len(self.duplicated)} attempts={self.attempts} "
            f"resends={self.resends}"
        )

    @property
    def ok(self) -> bool:
        return self.completed == self.submitted and not self.lost and not self.duplicated


def audit(scenario: str, job_ids: list[str]) -> Tally:
    from shared.db.models import Artifact
    from shared.db.session import session_scope

    tally = Tally(scenario, submitted=len(job_ids))
    for job_id in job_ids:
        job = row(job_id)
        messages = Counter(e.message for e in events(job_id))
        finished = Counter(
            m.split(" finished")[0] for m in messages.elements() if m.startswith("stage ") and " finished" in m
        )
        with session_scope() as session:
            pairs = Counter(
                (a.stage, a.name) for a in session.scalars(select(Artifact).where(Artifact.job_id == job_id))
            )
        tally.attempts.append(job.attempt)
        tally.resends += sum(n for m, n in messages.items() if m.startswith("message not picked up"))
        if job.status != "succeeded":
            tally.lost.append(f"{job_id}: {job.status} {job.error}")
        elif (
            messages["job succeeded"] != 1
            or any(n != 1 for n in finished.values())
            or any(n != 1 for n in pairs.values())
        ):
            tally.duplicated.append(f"{job_id}: {dict(finished)} {dict(pairs)} succeeded x{messages['job succeeded']}")
        else:
            tally.completed += 1
    return tally
