"""Response and request models of the /v1 API (explicit fields only: no storage paths, no key hashes)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from services.http_errors import ErrorDetail
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
    """A page of a list. Pass `last_id` as `after` to get the next page while `has_more`."""

    object: Literal["list"] = Field(default="list", description="Always `list`.")
    data: list[T] = Field(description="The objects of this page, in the list's order.")
    has_more: bool = Field(default=False, description="Whether more objects follow this page.")
    first_id: str | int | None = Field(default=None, description="The id of the page's first object.")
    last_id: str | int | None = Field(
        default=None, description="The id of the page's last object: the `after` of the next page."
    )


class Deleted(BaseModel):
    """What a delete returns."""

    id: str = Field(description="The id of the deleted object.")
    object: str = Field(description="The deleted object's type, e.g. `dataset`.")
    deleted: bool = Field(default=True, description="Always true.")


# -- jobs -------------------------------------------------------------------------------------------
class JobCreate(BaseModel):
    """A typed job: `params` is validated against the job type's params model (see GET /v1/job-types)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "type": "pipeline",
                    "params": {
                        "tasks": ["cb", "rte", "copa"],
                        "model": "smollm2-135m",
                        "groups": "auto",
                        "training": {"epochs": 3},
                    },
                    "metadata": {"experiment": "glue-small"},
                },
                {"type": "training", "params": {"groups": [["cb", "rte"], ["copa"]], "epochs": 2}},
            ]
        },
    )

    type: str = Field(
        description="The job type: affinity, grouping, approximation_error, validate_estimates, "
        "validate_affinity, training, pipeline, study or evaluation (GET /v1/job-types)."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="The job type's params, validated against its "
        "params model; every field left out takes its default.",
    )
    metadata: dict[str, str] = Field(
        default_factory=dict, max_length=16, description="Up to 16 string pairs for the caller's own bookkeeping."
    )


class StageOut(BaseModel):
    """One stage of a job (a pipeline has affinity, grouping and training)."""

    name: str = Field(description="The stage's name.")
    status: str = Field(description="pending, running, succeeded, failed or cancelled.")
    attempts: int = Field(description="How many times the stage was started.")
    started_at: int | None = Field(description="Unix seconds when the stage last started.")
    finished_at: int | None = Field(description="Unix seconds when the stage finished.")
    artifacts: dict[str, str] = Field(
        default_factory=dict, description="The stage's outputs: logical file name -> artifact id."
    )


class JobOut(BaseModel):
    """A job: its validated params (every default filled in), where it is, and what it produced."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "job-0192f3a4b5c6d7e8f9a0b1c2",
                    "object": "job",
                    "type": "pipeline",
                    "status": "running",
                    "owner": "alice",
                    "params": {"tasks": ["cb", "rte", "copa"], "model": "smollm2-135m", "groups": "auto"},
                    "metadata": {"experiment": "glue-small"},
                    "progress": {"stage": "affinity", "step": "gradients", "done": 120, "total": 400, "percent": 12.0},
                    "error": None,
                    "result": None,
                    "result_artifacts": {},
                    "current_stage": "affinity",
                    "stages": [
                        {
                            "name": "affinity",
                            "status": "running",
                            "attempts": 1,
                            "started_at": 1767225605,
                            "finished_at": None,
                            "artifacts": {},
                        }
                    ],
                    "attempt": 1,
                    "created_at": 1767225600,
                    "started_at": 1767225605,
                    "finished_at": None,
                }
            ]
        }
    )

    id: str = Field(description="The job's id (job-...).")
    object: Literal["job"] = Field(default="job", description="Always `job`.")
    type: str = Field(description="The job type.")
    status: JobStatus = Field(description="queued, running, succeeded, failed or cancelled.")
    owner: str = Field(description="The owner of the API key that created the job.")
    params: dict[str, Any] = Field(description="The params as validated, with every default filled in.")
    metadata: dict[str, Any] = Field(description="The caller's metadata, as given.")
    progress: dict[str, Any] = Field(
        description="The latest progress report: stage, step, done, total, percent, message."
    )
    error: ErrorDetail | None = Field(
        description="Why the job failed (code, message, param), when it did. `invalid_params` and `bad_input`: "
        "the params or the data they name are wrong; `stage_failed`: a stage failed for a reason that is not the "
        "caller's; the others (`infrastructure`, `timeout`, `worker_lost`, ...) are on the service's side."
    )
    result: dict[str, Any] | None = Field(description="The summary of a finished job (per stage).")
    result_artifacts: dict[str, str] = Field(description="Every stage's outputs: logical file name -> artifact id.")
    current_stage: str | None = Field(description="The stage running now.")
    stages: list[StageOut] = Field(description="The job's stages, in order.")
    attempt: int = Field(description="How many times the job was started (a lost worker's job is retried).")
    created_at: int = Field(description="Unix seconds when the job was created.")
    started_at: int | None = Field(description="Unix seconds when the job first started.")
    finished_at: int | None = Field(description="Unix seconds when the job finished.")

    @classmethod
    def of(cls, job: Job) -> JobOut:
        stages = [
            StageOut(
                name=s.name,
                status=s.status,
                attempts=s.attempts,
                started_at=ts(s.started_at),
                finished_at=ts(s.finished_at),
                artifacts=(s.outputs or {}).get("artifacts") or {},
            )
            for s in job.stages
        ]
        artifacts = merge_stage_artifacts([(s.name, s.artifacts) for s in stages])
        return cls(
            id=job.id,
            type=job.type,
            status=job.status,  # type: ignore[arg-type]  # a str column (checked by the database), validated here
            owner=job.owner,
            params=job.params or {},
            metadata=job.metadata_ or {},
            progress=job.progress or {},
            error=ErrorDetail(**job.error) if job.error else None,
            result=job.result,
            result_artifacts=artifacts,
            current_stage=job.current_stage,
            stages=stages,
            attempt=job.attempt,
            created_at=ts(job.created_at) or 0,
            started_at=ts(job.started_at),
            finished_at=ts(job.finished_at),
        )

    @classmethod
    def from_rows(cls, rows: list[Any]) -> JobOut:
        """From the rows of `job LEFT JOIN job_stages` (the polling path skips the ORM)."""
        job = rows[0]
        stages = [
            StageOut(
                name=r["s_name"],
                status=r["s_status"],
                attempts=r["s_attempts"],
                started_at=ts(r["s_started_at"]),
                finished_at=ts(r["s_finished_at"]),
                artifacts=(r["s_outputs"] or {}).get("artifacts") or {},
            )
            for r in rows
            if r["s_name"] is not None
        ]
        return cls(
            id=job["id"],
            type=job["type"],
            status=job["status"],
            owner=job["owner"],
            params=job["params"] or {},
            metadata=job["metadata"] or {},
            progress=job["progress"] or {},
            error=ErrorDetail(**job["error"]) if job["error"] else None,
            result=job["result"],
            result_artifacts=merge_stage_artifacts([(st.name, st.artifacts) for st in stages]),
            current_stage=job["current_stage"],
            stages=stages,
            attempt=job["attempt"],
            created_at=ts(job["created_at"]) or 0,
            started_at=ts(job["started_at"]),
            finished_at=ts(job["finished_at"]),
        )


class EventOut(BaseModel):
    """One event of a job: status changes, stage starts and ends, progress, warnings."""

    id: int = Field(description="The event's id; ids grow, so the last one seen is the `after` to follow a job.")
    object: Literal["job.event"] = Field(default="job.event", description="Always `job.event`.")
    created_at: float = Field(description="Unix seconds (milliseconds precision).")
    level: str = Field(description="info, warning or error.")
    message: str = Field(description="What happened, for humans.")
    data: dict[str, Any] | None = Field(
        description='The same for programs, e.g. {"type": "progress", "stage", "step", "done", "total"}.'
    )

    @classmethod
    def of(cls, event: JobEvent) -> EventOut:
        return cls(
            id=event.id,
            created_at=round(event.created_at.timestamp(), 3),
            level=event.level,
            message=event.message,
            data=event.data,
        )


class ShardOut(BaseModel):
    """One shard of a fanned-out phase of a job (CHORUS_FANOUT_SHARDS): who ran it and how it went."""

    object: Literal["job.shard"] = Field(default="job.shard", description="Always `job.shard`.")
    phase: str = Field(description="The fanned-out phase, e.g. a Stage-1 gradient pass.")
    index: int = Field(description="The shard's index within its phase.")
    start: int = Field(description="The first item of the shard's range.")
    end: int = Field(description="One past the last item of the shard's range.")
    status: str = Field(description="pending, running, done or failed.")
    claimed_by: str | None = Field(description="The worker that ran (or runs) the shard.")
    attempts: int = Field(description="How many times the shard was claimed.")
    error: str | None = Field(description="Why the shard's last attempt failed.")
    started_at: int | None = Field(description="Unix seconds when the shard was last claimed.")
    finished_at: int | None = Field(description="Unix seconds when the shard finished.")

    @classmethod
    def of(cls, shard: Any) -> ShardOut:
        return cls(
            phase=shard.phase,
            index=shard.index,
            start=shard.start,
            end=shard.end,
            status=shard.status,
            claimed_by=shard.claimed_by,
            attempts=shard.attempts,
            error=shard.error,
            started_at=ts(shard.started_at),
            finished_at=ts(shard.finished_at),
        )


class JobTypeOut(BaseModel):
    """A job type and the JSON schema of its params."""

    name: str = Field(description="The `type` of a job.")
    object: Literal["job_type"] = Field(default="job_type", description="Always `job_type`.")
    description: str = Field(description="What a job of this type does.")
    available: bool = Field(description="Whether this deployment can run it.")
    reason: str | None = Field(default=None, description="Why not, when it cannot.")
    params_schema: dict[str, Any] | None = Field(
        default=None,
        description="JSON schema of the params: every field with its type, default and description; "
        "the stage sections (affinity, grouping, training) typed with their stage's fields.",
    )


# -- datasets ---------------------------------------------------------------------------------------
class DatasetOut(BaseModel):
    """An uploaded dataset, imported as a task that jobs name by `task_name`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "ds-0192f3a4b5c6d7e8f9a0b1c2",
                    "object": "dataset",
                    "name": "reviews",
                    "task_name": "reviews-3f9a1c2e",
                    "format": "csv",
                    "filename": "reviews.csv",
                    "size_bytes": 48213,
                    "sha256": "9f86d081884c7d65...",
                    "num_rows": 1000,
                    "label_names": ["negative", "positive"],
                    "label_counts": {"negative": 480, "positive": 520},
                    "sizes": {"train": 800, "val": 100, "test": 100},
                    "text_fields": ["text"],
                    "label_field": "label",
                    "artifact_id": "art-0192f3a4b5c6d7e8f9a0b1c3",
                    "artifact_ids": ["art-0192f3a4b5c6d7e8f9a0b1c3"],
                    "split_source": "carved",
                    "warnings": [],
                    "created_at": 1767225600,
                }
            ]
        }
    )

    id: str = Field(description="The dataset's id (ds-...).")
    object: Literal["dataset"] = Field(default="dataset", description="Always `dataset`.")
    name: str = Field(description="The name given at upload, unique among the owner's datasets.")
    task_name: str = Field(description="The task jobs name in their `tasks` (the name plus a random suffix).")
    format: str = Field(description="The file format read: jsonl, json, csv, tsv, parquet or arrow.")
    filename: str = Field(description="The uploaded file name(s).")
    size_bytes: int = Field(description="Bytes uploaded.")
    sha256: str = Field(description="SHA-256 of the rows as imported.")
    num_rows: int = Field(description="Rows imported (all splits).")
    label_names: list[str] = Field(description="The labels, in the order integer labels index.")
    label_counts: dict[str, int] = Field(description="Rows per label.")
    sizes: dict[str, int] = Field(description="Rows per split (train, val, test).")
    text_fields: list[str] = Field(description="The text columns the prompt shows.")
    label_field: str = Field(description="The label column.")
    artifact_id: str | None = Field(description="The artifact holding the (first) uploaded file.")
    artifact_ids: list[str] = Field(default_factory=list, description="Every uploaded file (one per split given).")
    split_source: str = Field(
        default="carved",
        description="column (a split column), files (one per split) or carved (80/10/10, stratified by label).",
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="What the import could not check for you, e.g. integer labels without label names.",
    )
    created_at: int = Field(description="Unix seconds when the dataset was uploaded.")

    @classmethod
    def of(cls, ds: Dataset) -> DatasetOut:
        info = ds.info or {}
        return cls(
            id=ds.id,
            name=ds.name,
            task_name=ds.task_name,
            format=ds.format,
            filename=ds.filename,
            size_bytes=ds.size_bytes,
            sha256=ds.sha256,
            num_rows=ds.num_rows,
            label_names=info.get("label_names", []),
            label_counts=info.get("label_counts", {}),
            sizes=info.get("sizes", {}),
            text_fields=info.get("text_fields", []),
            label_field=info.get("label_field", ""),
            artifact_id=ds.artifact_id,
            artifact_ids=info.get("artifact_ids") or ([ds.artifact_id] if ds.artifact_id else []),
            split_source=info.get("split_source") or "carved",
            warnings=info.get("warnings") or [],
            created_at=ts(ds.created_at) or 0,
        )


# -- artifacts, adapters, ensembles -----------------------------------------------------------------
def artifact_filename(art: Artifact) -> str:
    from pathlib import PurePosixPath

    from shared.storage import safe_name

    rel = (art.meta or {}).get("relpath")
    return safe_name(PurePosixPath(rel).name if rel else art.name)


class ArtifactOut(BaseModel):
    """A stored file or folder: a job's output or an upload (content-addressed, immutable)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "art-0192f3a4b5c6d7e8f9a0b1c4",
                    "object": "artifact",
                    "name": "groups.json",
                    "filename": "groups.json",
                    "kind": "file",
                    "media_type": "application/json",
                    "sha256": "2c26b46b68ffc68f...",
                    "size_bytes": 412,
                    "job_id": "job-0192f3a4b5c6d7e8f9a0b1c2",
                    "stage": "grouping",
                    "files": None,
                    "download_url": "/v1/artifacts/art-0192f3a4b5c6d7e8f9a0b1c4/content",
                    "created_at": 1767226000,
                }
            ]
        }
    )

    id: str = Field(description="The artifact's id (art-...).")
    object: Literal["artifact"] = Field(default="artifact", description="Always `artifact`.")
    name: str = Field(description="The logical name, e.g. groups.json or adapters/g0.")
    filename: str = Field(description="A file name for downloads (the name the producing stage wrote).")
    kind: Literal["file", "folder"] = Field(description="A file, or a folder (downloaded as an archive).")
    media_type: str = Field(description="The media type (inode/directory for a folder).")
    sha256: str = Field(description="SHA-256 of the file (of a folder: of its manifest of files and their digests).")
    size_bytes: int = Field(description="Bytes (of a folder: all its files).")
    job_id: str | None = Field(description="The job that produced it (none for uploads).")
    stage: str | None = Field(description="The stage that produced it.")
    files: int | None = Field(default=None, description="How many files a folder holds.")
    download_url: str = Field(description="Where to download it (GET; folders as tar.gz or zip).")
    created_at: int = Field(description="Unix seconds when it was stored.")

    @classmethod
    def of(cls, art: Artifact) -> ArtifactOut:
        return cls(
            id=art.id,
            name=art.name,
            filename=artifact_filename(art),
            kind=art.kind,  # type: ignore[arg-type]
            media_type=art.media_type,
            sha256=art.sha256,
            size_bytes=art.size_bytes,
            job_id=art.job_id,
            stage=art.stage,
            files=(art.meta or {}).get("files"),
            download_url=f"/v1/artifacts/{art.id}/content",
            created_at=ts(art.created_at) or 0,
        )


class AdapterOut(BaseModel):
    """A trained LoRA adapter (a PEFT folder)."""

    id: str = Field(description="The adapter's id (ad-...).")
    object: Literal["adapter"] = Field(default="adapter", description="Always `adapter`.")
    name: str = Field(description="The adapter's name in its ensemble, e.g. g0 or single.")
    job_id: str | None = Field(description="The job that trained it.")
    artifact_id: str = Field(description="The artifact holding its folder.")
    sha256: str = Field(description="SHA-256 of the folder.")
    base_model: str | None = Field(description="The base model it was trained on.")
    info: dict[str, Any] = Field(description="Its metadata: tasks, hyperparameters, training FLOPs, scores.")
    download_url: str = Field(description="Where to download the folder (tar.gz or zip).")
    created_at: int = Field(description="Unix seconds when it was stored.")

    @classmethod
    def of(cls, ad: Adapter) -> AdapterOut:
        return cls(
            id=ad.id,
            name=ad.name,
            job_id=ad.job_id,
            artifact_id=ad.artifact_id,
            sha256=ad.sha256,
            base_model=ad.base_model,
            info=ad.info or {},
            download_url=f"/v1/adapters/{ad.id}/content",
            created_at=ts(ad.created_at) or 0,
        )


class EnsembleOut(BaseModel):
    """A weighted ensemble of adapters, servable by the inference service by its id."""

    id: str = Field(description="The ensemble's id (ens-...), what the inference service serves.")
    object: Literal["ensemble"] = Field(default="ensemble", description="Always `ensemble`.")
    name: str = Field(description="The ensemble's name.")
    job_id: str | None = Field(description="The job that built it.")
    artifact_id: str = Field(description="The artifact holding its manifest (ensemble.json).")
    fingerprint: str = Field(description="SHA-256 over the manifest and every member's files.")
    base_model: str | None = Field(description="The base model its members were trained on.")
    members: dict[str, str] = Field(description="Member name -> adapter id.")
    manifest: dict[str, Any] = Field(description="The manifest: members, per-task weights, templates.")
    created_at: int = Field(description="Unix seconds when it was stored.")

    @classmethod
    def of(cls, ens: Ensemble) -> EnsembleOut:
        return cls(
            id=ens.id,
            name=ens.name,
            job_id=ens.job_id,
            artifact_id=ens.artifact_id,
            fingerprint=ens.fingerprint,
            base_model=ens.base_model,
            members=ens.members or {},
            manifest=ens.manifest or {},
            created_at=ts(ens.created_at) or 0,
        )


# -- keys -------------------------------------------------------------------------------------------
class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(
        min_length=1, max_length=200, pattern=PRINTABLE, description="Who the key acts for (no control characters)."
    )
    scopes: list[Literal["admin", "submit", "infer"]] = Field(
        min_length=1,
        description="What the key may do: submit (datasets, jobs, results), infer (the inference "
        "service), admin (everything, every owner's objects, keys).",
    )
    name: str = Field(
        default="",
        max_length=200,
        pattern=PRINTABLE_OR_EMPTY,
        description="A label for humans (no control characters).",
    )


class KeyOut(BaseModel):
    """An API key (its secret only in the create response)."""

    id: str = Field(description="The key's id (key-...).")
    object: Literal["api_key"] = Field(default="api_key", description="Always `api_key`.")
    name: str = Field(description="The label given at creation.")
    owner: str = Field(description="Who the key acts for.")
    prefix: str = Field(description="The first characters of the secret, to tell keys apart.")
    scopes: list[str] = Field(description="admin, submit and/or infer.")
    created_at: int = Field(description="Unix seconds when the key was created.")
    revoked_at: int | None = Field(description="Unix seconds when the key was revoked.")
    key: str | None = Field(default=None, description="The secret, present only in the create response.")

    @classmethod
    def of(cls, row: ApiKey, plaintext: str | None = None) -> KeyOut:
        return cls(
            id=row.id,
            name=row.name,
            owner=row.owner,
            prefix=row.prefix,
            scopes=list(row.scopes or []),
            created_at=ts(row.created_at) or 0,
            revoked_at=ts(row.revoked_at),
            key=plaintext,
        )
