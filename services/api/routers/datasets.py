"""/v1/datasets: multipart JSONL/CSV/TSV upload (size cap enforced while streaming), list, get, delete.

An upload is validated row by row (every problem reported with its line), imported as a task named
`name` (usable in job params), and its raw file kept as an artifact. Nothing is stored when anything
fails: not the task folder, not the file, not a row.
"""

from __future__ import annotations

import json
import logging
from pathlib import PurePath
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from sqlalchemy import func, select

from services.api.common import MAX_LIMIT, get_owned, page, scoped
from services.api.deps import DB, Submitter, rate_limit
from services.api.errors import ApiError
from services.api.schemas import DatasetOut, Deleted, ListResponse
from shared.config import get_settings
from shared.db.models import Artifact, Dataset, new_id
from shared.jobs.config import get_service_settings
from shared.storage import ArtifactStore, record_artifact, release_object

log = logging.getLogger("chorus.api")
router = APIRouter(tags=["datasets"])
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def _user_import():  # type: ignore[no-untyped-def]
    try:
        from shared.ml.tasks import user_import
    except ModuleNotFoundError as exc:  # pragma: no cover - deployment without the ML core
        raise ApiError(501, "not_implemented", f"dataset import is not available: {exc}") from exc
    return user_import


def _label_names(raw: str | None) -> list[str] | None:
    if raw is None or not raw.strip():
        return None
    if raw.lstrip().startswith("["):
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise ApiError(422, "invalid_request", f"label_names: not a JSON list: {exc}", "label_names") from exc
        if not isinstance(value, list):
            raise ApiError(422, "invalid_request", "label_names: expected a JSON list of strings", "label_names")
        return [str(v) for v in value]
    return [p.strip() for p in raw.split(",")]


@router.post("/datasets", status_code=201, response_model=DatasetOut, dependencies=[rate_limit("upload")])
def upload_dataset(
    principal: Submitter, db: DB,
    file: Annotated[UploadFile, File(description="JSONL (one object per line), CSV or TSV with a header row.")],
    name: Annotated[str, Form(description="Task name: 2-64 chars, a-z first, then a-z 0-9 _ -.")],
    text_fields: Annotated[str, Form(description="Comma-separated text column(s).")],
    label_field: Annotated[str, Form(description="The label column.")],
    format: Annotated[str | None, Form(description="jsonl, csv or tsv (default: from the file name).")] = None,
    template: Annotated[str | None, Form(description="Jinja prompt template (default lists fields and options).")] = None,
    label_names: Annotated[str | None, Form(description="Label order: comma-separated or a JSON list.")] = None,
    id_field: Annotated[str | None, Form(description="Optional column of unique row ids.")] = None,
    description: Annotated[str | None, Form(max_length=2000)] = None,
) -> DatasetOut:
    settings = get_settings()
    cap = settings.max_upload_bytes
    filename = PurePath(file.filename or "upload").name[:200]
    size = file.size if file.size is not None else None
    if size is not None and size > cap:
        raise ApiError(413, "payload_too_large", f"file is over the {cap:,}-byte upload limit", "file")
    fmt = (format or _SUFFIX_FORMATS.get(PurePath(filename).suffix.lower(), "")).lower()
    if not fmt:
        raise ApiError(422, "invalid_request", "format: cannot tell the format from the file name; "
                       "pass format=jsonl|csv|tsv", "format")
    count = db.scalar(select(func.count()).select_from(Dataset).where(Dataset.owner == principal.owner)) or 0
    if count >= get_service_settings().max_datasets:
        raise ApiError(429, "quota_exceeded", f"this owner already has {count} datasets (limit "
                       f"{get_service_settings().max_datasets}); delete some first")
    if db.scalar(select(Dataset.id).where(Dataset.task_name == name)) is not None:
        raise ApiError(409, "name_taken", f"a dataset named {name!r} already exists; choose another name", "name")
    data = file.file.read(cap + 1)
    if len(data) > cap:
        raise ApiError(413, "payload_too_large", f"file is over the {cap:,}-byte upload limit", "file")
    ui = _user_import()
    try:
        parsed = ui.validate_dataset_bytes(data, fmt, text_fields, label_field, template, _label_names(label_names),
                                           id_field or None, name=name, source_name=filename)
    except ui.DatasetValidationError as exc:
        first = exc.errors[0] if exc.errors else None
        field = first.field if first is not None and first.field else None
        arg_fields = {"name", "text_fields", "label_field", "template", "label_names", "id_field"}
        param = field if field in arg_fields and first is not None and first.line is None else "file"
        raise ApiError(422, "invalid_dataset", str(exc)[:8000], param) from exc
    try:
        task = ui.register_dataset(parsed, name, description=description)
    except ui.TaskExistsError as exc:
        raise ApiError(409, "name_taken", f"a task named {name!r} already exists; choose another name", "name") from exc
    except ui.DatasetValidationError as exc:
        raise ApiError(422, "invalid_dataset", str(exc)[:8000], "name") from exc
    store = ArtifactStore()
    stored = None
    try:
        stored = store.put_bytes(data)
        spec = ui.user_task_spec(name)
        ds_id = new_id("ds")
        art = record_artifact(db, stored, owner=principal.owner, name=filename, meta={"dataset_id": ds_id})
        ds = Dataset(id=ds_id, owner=principal.owner, name=name, task_name=task.name, format=fmt, filename=filename,
                     size_bytes=len(data), sha256=parsed.sha256, num_rows=len(parsed.rows), artifact_id=art.id,
                     info={k: spec.get(k) for k in ("label_names", "label_counts", "sizes", "text_fields",
                                                     "label_field", "id_field", "template", "description")})
        db.add(ds)
        db.commit()
    except BaseException:
        db.rollback()
        ui.delete_user_task(name)
        if stored is not None:
            release_object(db, store, stored.sha256, stored.path)
        raise
    return DatasetOut.of(ds)


@router.get("/datasets", response_model=ListResponse[DatasetOut])
def list_datasets(principal: Submitter, db: DB, after: str | None = None,
                  limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20) -> ListResponse[DatasetOut]:
    rows, more = page(db, scoped(select(Dataset), Dataset, principal), Dataset.id, after, limit)
    data = [DatasetOut.of(d) for d in rows]
    return ListResponse[DatasetOut](data=data, has_more=more, first_id=data[0].id if data else None,
                                    last_id=data[-1].id if data else None)


@router.get("/datasets/{dataset_id}", response_model=DatasetOut)
def get_dataset(dataset_id: str, principal: Submitter, db: DB) -> DatasetOut:
    return DatasetOut.of(get_owned(db, Dataset, dataset_id, principal, "dataset"))


@router.delete("/datasets/{dataset_id}", response_model=Deleted)
def delete_dataset(dataset_id: str, principal: Submitter, db: DB) -> Deleted:
    """Delete the dataset, its task and its stored file (jobs that already ran keep their artifacts)."""
    ds = get_owned(db, Dataset, dataset_id, principal, "dataset")
    art = db.get(Artifact, ds.artifact_id) if ds.artifact_id else None
    task_name = ds.task_name
    db.delete(ds)
    if art is not None:
        db.delete(art)
    db.commit()
    try:
        _user_import().delete_user_task(task_name)
    except ValueError:
        log.warning("dataset %s: task %s was already gone", dataset_id, task_name)
    if art is not None:
        release_object(db, ArtifactStore(), art.sha256, art.path)
    return Deleted(id=dataset_id, object="dataset")
