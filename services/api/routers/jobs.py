"""/v1/jobs: create (typed, validated, idempotent), get, list, events, cancel, artifacts; /v1/job-types."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Annotated

from fastapi import APIRouter, Body, Header, Query, Request, Response
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload
from sqlalchemy.orm.attributes import set_committed_value

from services.api import job_params
from services.api.common import Cursor, PageSize, get_owned, page, scoped
from services.api.deps import DB, Principal, Submitter, owned, rate_limit
from services.api.errors import ApiError
from services.api.params_schema import params_schema
from services.api.schemas import (
    ArtifactOut,
    EventOut,
    JobCreate,
    JobOut,
    JobStatus,
    JobTypeOut,
    ListResponse,
    ShardOut,
)
from shared.db.models import Artifact, Job, JobEvent, JobShard, JobStage, new_id, utcnow
from shared.db.session import read_all
from shared.jobs import state
from shared.jobs.config import get_service_settings
from shared.jobs.registry import JOB_TYPES, JobTypeUnavailable
from shared.jobs.task_refs import ACTIVE_STATUSES

log = logging.getLogger("chorus.api")
router = APIRouter(tags=["jobs"])
STAGES = [selectinload(Job.stages)]
MAX_EVENT_ID = 2**63 - 1  # event ids are BIGINT on PostgreSQL, INTEGER (int64) on SQLite
# Printable ASCII without leading or trailing spaces (what clients put in headers; stored as given).
IDEMPOTENCY_KEY = r"^[!-~]([ -~]*[!-~])?$"


def request_hash(body: JobCreate) -> str:
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(db: DB, principal: Principal, key: str, digest: str) -> Job | None:
    job = db.scalars(
        select(Job).options(*STAGES).where(Job.owner == principal.owner, Job.idempotency_key == key)
    ).one_or_none()
    if job is not None and job.request_hash != digest:
        raise ApiError(
            422,
            "idempotency_key_reused",
            "this Idempotency-Key was already used with a different request body; use a new key for a new job",
            "Idempotency-Key",
        )
    return job


JOB_EXAMPLES = {
    "pipeline": {
        "summary": "The whole method on three tasks",
        "value": {
            "type": "pipeline",
            "params": {
                "tasks": ["cb", "rte", "copa"],
                "model": "smollm2-135m",
                "groups": "auto",
                "affinity": {"dim": 200},
                "training": {"epochs": 3, "rank": 8},
            },
            "metadata": {"experiment": "glue-small"},
        },
    },
    "training": {
        "summary": "Stage 2 on groups you choose",
        "value": {
            "type": "training",
            "params": {"groups": [["cb", "rte"], ["copa"]], "epochs": 2, "boosting": {"enabled": False}},
        },
    },
    "grouping": {
        "summary": "Groups from an affinity matrix given inline",
        "value": {
            "type": "grouping",
            "params": {
                "groups": 2,
                "affinity": {
                    "tasks": ["cb", "rte", "copa", "wic"],
                    "matrix": [[0.9, 0.8, 0.1, 0.2], [0.8, 0.9, 0.2, 0.1], [0.1, 0.2, 0.9, 0.8], [0.2, 0.1, 0.8, 0.9]],
                },
            },
        },
    },
    "evaluation": {
        "summary": "Zero-shot accuracy of the base model",
        "value": {"type": "evaluation", "params": {"tasks": ["sst2", "rte"], "max_examples": 200}},
    },
}


def _enqueue(job_id: str, task_id: str) -> None:
    from services.worker.celery_app import enqueue

    enqueue(job_id, task_id)


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobOut,
    dependencies=[rate_limit("create")],
    responses={200: {"model": JobOut, "description": "Replayed: same Idempotency-Key and body."}},
)
def create_job(
    body: Annotated[JobCreate, Body(openapi_examples=JOB_EXAMPLES)],
    principal: Submitter,
    db: DB,
    request: Request,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            pattern=IDEMPOTENCY_KEY,
            description="1-255 printable ASCII characters, unique per request body (e.g. a UUID).",
        ),
    ] = None,
) -> JobOut:
    """Create a job. With `Idempotency-Key`, retrying the same body returns the same job (200); reusing the
    key with a different body is refused (422). Job creation has a per-key rate limit of its own (429 with
    Retry-After), stricter than the general one; a replay counts against it too."""
    job_type = JOB_TYPES.get(body.type)
    if job_type is None:
        raise ApiError(
            422, "invalid_request", f"unknown job type {body.type!r}; expected one of {sorted(JOB_TYPES)}", "type"
        )
    digest = request_hash(body)
    if idempotency_key:
        existing = _replay(db, principal, idempotency_key, digest)
        if existing is not None:
            response.status_code = 200
            return JobOut.of(existing)
    edge = getattr(request.app.state, "api_settings", None)
    params = job_params.validate(db, job_type, body.params, principal, edge.model_dirs if edge else ())
    settings = get_service_settings()
    active = db.scalar(
        select(func.count()).select_from(Job).where(Job.owner == principal.owner, Job.status.in_(ACTIVE_STATUSES))
    )
    if (active or 0) >= settings.max_active_jobs:
        raise ApiError(
            429,
            "quota_exceeded",
            f"{active} jobs are already queued or running for this owner "
            f"(limit {settings.max_active_jobs}); wait for some to finish or cancel them",
        )
    now = utcnow()
    job = Job(
        id=new_id("job"),
        type=body.type,
        status=state.JobStatus.QUEUED,
        owner=principal.owner,
        params=params,
        metadata_=dict(body.metadata),
        progress={},
        idempotency_key=idempotency_key,
        request_hash=digest,
        task_id=uuid.uuid4().hex,
        enqueued_at=now,
        created_at=now,
        updated_at=now,
        attempt=0,
    )
    db.add(job)
    state.add_event(db, job.id, f"job created ({body.type})", data={"type": "status", "status": state.JobStatus.QUEUED})
    try:
        db.commit()
    except IntegrityError:
        db.rollback()
        existing = _replay(db, principal, idempotency_key, digest) if idempotency_key else None
        if existing is None:
            raise
        response.status_code = 200
        return JobOut.of(existing)
    request.app.state.metrics.jobs_created.labels(job.type).inc()
    try:
        _enqueue(job.id, job.task_id or "")
    except Exception as exc:  # the reaper re-sends jobs that never reached the broker
        log.warning("broker unavailable for %s: %s", job.id, exc)
        db.execute(update(Job).where(Job.id == job.id).values(enqueued_at=None))
        state.add_event(db, job.id, "broker unavailable; the job will be sent when it is back", "warning")
        db.commit()
    set_committed_value(job, "stages", [])
    return JobOut.of(job)


@router.get("/jobs", response_model=ListResponse[JobOut])
def list_jobs(
    principal: Submitter,
    db: DB,
    after: Cursor = None,
    limit: PageSize = 20,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    type: Annotated[str | None, Query(description="Only jobs of this type.")] = None,
) -> Response:
    """Jobs, newest first. `after` is the last id of the previous page."""
    stmt = scoped(select(Job).options(*STAGES), Job, principal)
    if status:
        stmt = stmt.where(Job.status == status)
    if type:
        stmt = stmt.where(Job.type == type)
    rows, more = page(db, stmt, Job.id, after, limit, principal=principal)
    data = [JobOut.of(j) for j in rows]
    page_out = ListResponse[JobOut](
        data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )
    return Response(page_out.model_dump_json(), media_type="application/json")


_J, _S = Job.__table__, JobStage.__table__
_POLL = (
    select(
        _J,
        *(
            c.label(f"s_{c.name}")
            for c in (_S.c.name, _S.c.status, _S.c.attempts, _S.c.started_at, _S.c.finished_at, _S.c.outputs)
        ),
    )
    .select_from(_J.outerjoin(_S, _S.c.job_id == _J.c.id))
    .order_by(_S.c.position)
)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, principal: Submitter) -> Response:
    """A job. This is the polling hot path: one autocommit Core query (job + stages), serialised once."""
    rows = read_all(_POLL.where(_J.c.id == job_id))
    if not rows or not owned(principal, rows[0]["owner"]):
        raise ApiError(404, "not_found", f"no job {job_id!r}", "id")
    return Response(JobOut.from_rows(list(rows)).model_dump_json(), media_type="application/json")


@router.get("/jobs/{job_id}/events", response_model=ListResponse[EventOut])
def list_events(
    job_id: str,
    principal: Submitter,
    db: DB,
    after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID, description="The last id seen.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000, description="Events per page (1-1000).")] = 100,
) -> Response:
    """Events oldest first; pass the last seen id as `after` to follow a job."""
    get_owned(db, Job, job_id, principal, "job")
    rows, more = page(
        db, select(JobEvent).where(JobEvent.job_id == job_id), JobEvent.id, after, limit, newest_first=False
    )
    data = [EventOut.of(e) for e in rows]
    page_out = ListResponse[EventOut](
        data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )
    return Response(page_out.model_dump_json(), media_type="application/json")


@router.get("/jobs/{job_id}/shards", response_model=ListResponse[ShardOut])
def list_shards(job_id: str, principal: Submitter, db: DB) -> Response:
    """The shards of the job's fanned-out phases (empty when fan-out is off), in the order they were created."""
    get_owned(db, Job, job_id, principal, "job")
    rows = db.scalars(select(JobShard).where(JobShard.job_id == job_id).order_by(JobShard.id)).all()
    data = [ShardOut.of(s) for s in rows]
    out = ListResponse[ShardOut](data=data, has_more=False, first_id=None, last_id=None)
    return Response(out.model_dump_json(), media_type="application/json")


@router.post("/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, principal: Submitter, db: DB) -> JobOut:
    """Cancel a queued or running job (a running stage stops at its next progress report, within seconds).
    Cancelling a cancelled job returns it; a finished job cannot be cancelled (409)."""
    job = get_owned(db, Job, job_id, principal, "job", STAGES)
    if job.status in (state.JobStatus.SUCCEEDED, state.JobStatus.FAILED):
        raise ApiError(409, "invalid_state", f"job {job_id} already {job.status}", "id")
    was_queued = job.status == state.JobStatus.QUEUED
    if job.status != state.JobStatus.CANCELLED:
        if not state.cancel(db, job):
            db.rollback()  # it changed state under us: report what it is now
        db.commit()
        if was_queued:
            from services.worker.celery_app import revoke

            revoke(job.task_id)
    db.expire_all()
    return JobOut.of(get_owned(db, Job, job_id, principal, "job", STAGES))


@router.get("/jobs/{job_id}/artifacts", response_model=ListResponse[ArtifactOut])
def job_artifacts(job_id: str, principal: Submitter, db: DB) -> ListResponse[ArtifactOut]:
    get_owned(db, Job, job_id, principal, "job")
    rows = db.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id)).all()
    return ListResponse[ArtifactOut](data=[ArtifactOut.of(a) for a in rows])


@router.get("/job-types", response_model=ListResponse[JobTypeOut])
def job_types(principal: Submitter) -> ListResponse[JobTypeOut]:
    """Every job type, whether it is available in this deployment, and its params JSON schema."""
    out = []
    for jt in JOB_TYPES.values():
        try:
            schema = params_schema(jt.params_class())
            out.append(JobTypeOut(name=jt.name, description=jt.description, available=True, params_schema=schema))
        except JobTypeUnavailable as exc:
            out.append(JobTypeOut(name=jt.name, description=jt.description, available=False, reason=str(exc)))
    return ListResponse[JobTypeOut](data=out)
