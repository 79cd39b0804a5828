"""Response and request models of the /v1 API (explicit fields only: no storage paths, no key hashes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from services.http_errors import ErrorDetail, ErrorResponse
from shared.db.models import Adapter, ApiKey, Artifact, Dataset, Ensemble, Job, JobEvent
from shared.jobs.ingest import merge_stage_artifacts

T = TypeVar("T")
# Text stored in the database: no control characters (PostgreSQL text cannot even hold NUL).
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
PRINTABLE_OR_EMPTY = r"^[^\x00-\x1f\x7f]*$"
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


def ts(value: datetime | None) -> int | None:
    """Unix seconds (the OpenAI convention for created_at / finished_at)."""
    return int(value.timestamp()) if value is not None else None


class ListResponse(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | int | None = None
    last_id: str | int | None = None


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


# -- jobs -------------------------------------------------------------------------------------------
class JobCreate(BaseModel):
    """A typed job: `params` is validated against the job type's params model (see GET /v1/job-types)."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="affinity, grouping, approximation_error, validate_estimates, training, "
                                  "pipeline or evaluation")
    params: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16,
                                     description="Up to 16 string pairs for the caller's own bookkeeping.")


class StageOut(BaseModel):
    name: str
    status: str
    attempts: int
    started_at: int | None
    finished_at: int | None
    artifacts: dict[str, str] = Field(default_factory=dict)


class JobOut(BaseModel):
    id: str
    object: Literal["job"] = "job"
    type: str
    status: JobStatus
    owner: str
    params: dict[str, Any]
    metadata: dict[str, Any]
    progress: dict[str, Any]
    error: ErrorDetail | None
    result: dict[str, Any] | None
    result_artifacts: dict[str, str]
    current_stage: str | None
    stages: list[StageOut]
    attempt: int
    created_at: int
    started_at: int | None
    finished_at: int | None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        stages = [StageOut(name=s.name, status=s.status, attempts=s.attempts, started_at=ts(s.started_at),
                           finished_at=ts(s.finished_at), artifacts=(s.outputs or {}).get("artifacts") or {})
                  for s in job.stages]
        artifacts = merge_stage_artifacts([(s.name, s.artifacts) for s in stages])
        return cls(id=job.id, type=job.type, status=job.status, owner=job.owner, params=job.params or {},  # type: ignore[arg-type]
                   metadata=job.metadata_ or {}, progress=job.progress or {},
                   error=ErrorDetail(**job.error) if job.error else None, result=job.result,
                   result_artifacts=artifacts, current_stage=job.current_stage, stages=stages, attempt=job.attempt,
                   created_at=ts(job.created_at) or 0, started_at=ts(job.started_at), finished_at=ts(job.finished_at))


    @classmethod
    def from_rows(cls, rows: list[Any]) -> JobOut:
        """From the rows of `job LEFT JOIN job_stages` (the polling path skips the ORM)."""
        job = rows[0]
        stages = [StageOut(name=r["s_name"], status=r["s_status"], attempts=r["s_attempts"],
                           started_at=ts(r["s_started_at"]), finished_at=ts(r["s_finished_at"]),
                           artifacts=(r["s_outputs"] or {}).get("artifacts") or {})
                  for r in rows if r["s_name"] is not None]
        return cls(id=job["id"], type=job["type"], status=job["status"], owner=job["owner"], params=job["params"] or {},
                   metadata=job["metadata"] or {}, progress=job["progress"] or {},
                   error=ErrorDetail(**job["error"]) if job["error"] else None, result=job["result"],
                   result_artifacts=merge_stage_artifacts([(st.name, st.artifacts) for st in stages]),
                   current_stage=job["current_stage"], stages=stages, attempt=job["attempt"],
                   created_at=ts(job["created_at"]) or 0, started_at=ts(job["started_at"]),
                   finished_at=ts(job["finished_at"]))


class EventOut(BaseModel):
    id: int
    object: Literal["job.event"] = "job.event"
    created_at: float
    level: str
    message: str
    data: dict[str, Any] | None

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        return cls(id=event.id, created_at=round(event.created_at.timestamp(), 3), level=event.level,
                   message=event.message, data=event.data)


class ShardOut(BaseModel):
    """One shard of a fanned-out phase of a job (CHORUS_FANOUT_SHARDS): who ran it and how it went."""

    object: Literal["job.shard"] = "job.shard"
    phase: str
    index: int
    start: int
    end: int
    status: str
    claimed_by: str | None
    attempts: int
    error: str | None
    started_at: int | None
    finished_at: int | None

    @classmethod
    def of(cls, shard: Any) -> ShardOut:
        return cls(phase=shard.phase, index=shard.index, start=shard.start, end=shard.end, status=shard.status,
                   claimed_by=shard.claimed_by, attempts=shard.attempts, error=shard.error,
                   started_at=ts(shard.started_at), finished_at=ts(shard.finished_at))


class JobTypeOut(BaseModel):
    name: str
    object: Literal["job_type"] = "job_type"
    description: str
    available: bool
    reason: str | None = None
    params_schema: dict[str, Any] | None = None


# -- datasets ---------------------------------------------------------------------------------------
class DatasetOut(BaseModel):
    id: str
    object: Literal["dataset"] = "dataset"
    name: str
    task_name: str
    format: str
    filename: str
    size_bytes: int
    sha256: str
    num_rows: int
    label_names: list[str]
    label_counts: dict[str, int]
    sizes: dict[str, int]
    text_fields: list[str]
    label_field: str
    artifact_id: str | None
    artifact_ids: list[str] = Field(default_factory=list, description="Every uploaded file (one per split given).")
    split_source: str = Field(default="carved", description="column (a split column), files (one per split) or "
                                                            "carved (80/10/10, stratified by label).")
    warnings: list[str] = Field(default_factory=list, description="What the import could not check for you, e.g. "
                                                                  "integer labels without label names.")
    created_at: int

    @classmethod
    def of(cls, ds: Dataset) -> DatasetOut:
        info = ds.info or {}
        return cls(id=ds.id, name=ds.name, task_name=ds.task_name, format=ds.format, filename=ds.filename,
                   size_bytes=ds.size_bytes, sha256=ds.sha256, num_rows=ds.num_rows,
                   label_names=info.get("label_names", []), label_counts=info.get("label_counts", {}),
                   sizes=info.get("sizes", {}), text_fields=info.get("text_fields", []),
                   label_field=info.get("label_field", ""), artifact_id=ds.artifact_id,
                   artifact_ids=info.get("artifact_ids") or ([ds.artifact_id] if ds.artifact_id else []),
                   split_source=info.get("split_source") or "carved", warnings=info.get("warnings") or [],
                   created_at=ts(ds.created_at) or 0)


# -- artifacts, adapters, ensembles -----------------------------------------------------------------
def artifact_filename(art: Artifact) -> str:
    from pathlib import PurePosixPath

    from shared.storage import safe_name

    rel = (art.meta or {}).get("relpath")
    return safe_name(PurePosixPath(rel).name if rel else art.name)


class ArtifactOut(BaseModel):
    id: str
    object: Literal["artifact"] = "artifact"
    name: str
    filename: str = Field(description="A file name for downloads (the name the producing stage wrote).")
    kind: Literal["file", "folder"]
    media_type: str
    sha256: str
    size_bytes: int
    job_id: str | None
    stage: str | None
    files: int | None = None
    download_url: str
    created_at: int

    @classmethod
    def of(cls, art: Artifact) -> ArtifactOut:
        return cls(id=art.id, name=art.name, filename=artifact_filename(art), kind=art.kind,  # type: ignore[arg-type]
                   media_type=art.media_type, sha256=art.sha256,
                   size_bytes=art.size_bytes, job_id=art.job_id, stage=art.stage, files=(art.meta or {}).get("files"),
                   download_url=f"/v1/artifacts/{art.id}/content", created_at=ts(art.created_at) or 0)


class AdapterOut(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    job_id: str | None
    artifact_id: str
    sha256: str
    base_model: str | None
    info: dict[str, Any]
    download_url: str
    created_at: int

    @classmethod
    def of(cls, ad: Adapter) -> AdapterOut:
        return cls(id=ad.id, name=ad.name, job_id=ad.job_id, artifact_id=ad.artifact_id, sha256=ad.sha256,
                   base_model=ad.base_model, info=ad.info or {}, download_url=f"/v1/adapters/{ad.id}/content",
                   created_at=ts(ad.created_at) or 0)


class EnsembleOut(BaseModel):
    id: str
    object: Literal["ensemble"] = "ensemble"
    name: str
    job_id: str | None
    artifact_id: str
    fingerprint: str
    base_model: str | None
    members: dict[str, str]
    manifest: dict[str, Any]
    created_at: int

    @classmethod
    def of(cls, ens: Ensemble) -> EnsembleOut:
        return cls(id=ens.id, name=ens.name, job_id=ens.job_id, artifact_id=ens.artifact_id,
                   fingerprint=ens.fingerprint, base_model=ens.base_model, members=ens.members or {},
                   manifest=ens.manifest or {}, created_at=ts(ens.created_at) or 0)


# -- keys -------------------------------------------------------------------------------------------
class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(min_length=1, max_length=200, pattern=PRINTABLE,
                       description="Who the key acts for (no control characters).")
    scopes: list[Literal["admin", "submit", "infer"]] = Field(min_length=1)
    name: str = Field(default="", max_length=200, pattern=PRINTABLE_OR_EMPTY,
                      description="A label for humans (no control characters).")


class KeyOut(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    name: str
    owner: str
    prefix: str
    scopes: list[str]
    created_at: int
    revoked_at: int | None
    key: str | None = Field(default=None, description="The secret, present only in the create response.")

    @classmethod
    def of(cls, row: ApiKey, plaintext: str | None = None) -> KeyOut:
        return cls(id=row.id, name=row.name, owner=row.owner, prefix=row.prefix, scopes=list(row.scopes or []),
                   created_at=ts(row.created_at) or 0, revoked_at=ts(row.revoked_at), key=plaintext)
