"""/v1/datasets: multipart JSONL/CSV/TSV upload (size cap enforced while streaming), list, get, delete.

An upload is validated row by row (every problem reported with its line), imported as a task, and its
raw file kept as an artifact. Nothing is stored when anything fails: not the task folder, not the file,
not a row.

Dataset names are per owner: `name` is unique among the caller's datasets only, so whether another owner
uses a name cannot be probed. The task it is imported as (`task_name`, what job params name) is
`<name>-<8 random hex digits>`, unique across owners and unguessable.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import PurePath
from typing import Annotated

from fastapi import APIRouter, File, Form, Query, UploadFile
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

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
_ARG_FIELDS = frozenset({"name", "text_fields", "label_field", "template", "label_names", "id_field"})
_TASK_SUFFIX_HEX = 8


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
        except (ValueError, RecursionError) as exc:
            reason = str(exc).split(";")[0][:200] if isinstance(exc, ValueError) else "nested too deeply"
            raise ApiError(422, "invalid_request", f"label_names: not a JSON list: {reason}", "label_names") from None
        if not isinstance(value, list):
            raise ApiError(422, "invalid_request", "label_names: expected a JSON list of strings", "label_names")
        return [str(v) for v in value]
    return [p.strip() for p in raw.split(",")]


def _task_name(name: str) -> str:
    """A fresh task name for dataset `name`: the name (cut to fit 64 characters) and random hex digits."""
    return f"{name[:63 - _TASK_SUFFIX_HEX]}-{secrets.token_hex(_TASK_SUFFIX_HEX // 2)}"


def _taken(name: str) -> ApiError:
    return ApiError(409, "name_taken", f"you already have a dataset named {name!r}; choose another name", "name")


@router.post("/datasets", status_code=201, response_model=DatasetOut, dependencies=[rate_limit("upload")])
def upload_dataset(
    principal: Submitter, db: DB,
    file: Annotated[UploadFile, File(description="JSONL (one object per line), CSV or TSV with a header row.")],
    name: Annotated[str, Form(description="Dataset name, unique among your datasets: 2-64 chars, a-z first, then "
                                          "a-z 0-9 _ -. Jobs use the returned task_name.")],
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
    if db.scalar(select(Dataset.id).where(Dataset.owner == principal.owner, Dataset.name == name)) is not None:
        raise _taken(name)
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
        by_argument = first is not None and (first.line is None or field == "template")
        param = field if field in _ARG_FIELDS and by_argument else "file"
        raise ApiError(422, "invalid_dataset", str(exc)[:8000], param) from None
    task = None
    for _ in range(3):  # a clash of the random suffix is astronomically rare; retry anyway
        try:
            task = ui.register_dataset(parsed, _task_name(name), description=description)
            break
        except ui.TaskExistsError:
            continue
        except ui.DatasetValidationError as exc:
            raise ApiError(422, "invalid_dataset", str(exc)[:8000], "name") from None
    if task is None:
        raise ApiError(503, "unavailable", "could not pick a free task name; try again")
    store = ArtifactStore()
    stored = None
    try:
        stored = store.put_bytes(data)
        spec = ui.user_task_spec(task.name)
        ds_id = new_id("ds")
        art = record_artifact(db, stored, owner=principal.owner, name=filename, meta={"dataset_id": ds_id})
        ds = Dataset(id=ds_id, owner=principal.owner, name=name, task_name=task.name, format=fmt, filename=filename,
                     size_bytes=len(data), sha256=parsed.sha256, num_rows=len(parsed.rows), artifact_id=art.id,
                     info={k: spec.get(k) for k in ("label_names", "label_counts", "sizes", "text_fields",
                                                     "label_field", "id_field", "template", "description")})
        db.add(ds)
        db.commit()
    except BaseException as exc:
        db.rollback()
        ui.delete_user_task(task.name)
        if stored is not None:
            release_object(db, store, stored.sha256, stored.path)
        if isinstance(exc, IntegrityError):  # the same owner uploaded the same name meanwhile
            raise _taken(name) from None
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
