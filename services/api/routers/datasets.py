"""/v1/datasets: multipart upload (size cap enforced while streaming), list, get, delete.

Formats: JSON lines, a JSON array of objects, CSV, TSV, Parquet, Arrow. The user's splits are kept: a `split`
column (train / validation or val / test), or `file` as the train split with `validation_file` and/or
`test_file`; without either the rows are split 80/10/10, stratified by label.

An upload is validated row by row (every problem reported with its line), imported as a task, and its
raw file(s) kept as artifacts. Nothing is stored when anything fails: not the task folder, not a file,
not a row.

Dataset names are per owner: `name` is unique among the caller's datasets only, so whether another owner
uses a name cannot be probed. The task it is imported as (`task_name`, what job params name) is
`<name>-<8 random hex digits>`, unique across owners and unguessable. GET and DELETE take the dataset's
id or its name (the caller's own datasets only).
"""

from __future__ import annotations

import logging
import secrets
from pathlib import PurePath
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.api.common import Cursor, PageSize, page, scoped
from services.api.deps import DB, Submitter, owned, rate_limit
from services.api.errors import ApiError
from services.api.schemas import DatasetOut, Deleted, ListResponse
from shared.config import get_settings
from shared.db.models import Artifact, Dataset, new_id
from shared.jobs.config import get_service_settings
from shared.jobs.task_refs import active_jobs_using
from shared.storage import ArtifactStore, StoredObject, record_artifact, release_object

log = logging.getLogger("chorus.api")
router = APIRouter(tags=["datasets"])
_ARG_FIELDS = frozenset({"name", "text_fields", "label_field", "template", "label_names", "id_field"})
_TASK_SUFFIX_HEX = 8
_FORMATS = "jsonl, json, csv, tsv, parquet or arrow"


def _user_import():
    try:
        from shared.ml.tasks import user_import
    except ModuleNotFoundError as exc:  # pragma: no cover - deployment without the ML core
        raise ApiError(501, "not_implemented", f"dataset import is not available: {exc}") from exc
    return user_import


def _task_name(name: str) -> str:
    """A fresh task name for dataset `name`: the name (cut to fit 64 characters) and random hex digits."""
    return f"{name[: 63 - _TASK_SUFFIX_HEX]}-{secrets.token_hex(_TASK_SUFFIX_HEX // 2)}"


def _taken(name: str) -> ApiError:
    return ApiError(409, "name_taken", f"you already have a dataset named {name!r}; choose another name", "name")


def _invalid(exc: Any, params: dict[str, str] | None = None) -> ApiError:
    """A DatasetValidationError as a 422 whose param names the argument at fault, else the file part
    (`params`: the form field of each file as messages name it)."""
    first = exc.errors[0] if exc.errors else None
    field = first.field if first is not None and first.field else None
    by_argument = first is not None and (first.line is None or field == "template")
    param = field if field in _ARG_FIELDS and by_argument else "file"
    if param == "file" and first is not None and first.source:
        param = (params or {}).get(first.source, "file")
    return ApiError(422, "invalid_dataset", str(exc)[:8000], param)


def _read(upload: UploadFile, param: str, left: int, cap: int, fmt: str | None, split: str | None) -> Any:
    """The DataFile of one uploaded part, read up to what is left of the upload cap."""
    ui = _user_import()
    filename = PurePath(upload.filename or "upload").name[:200]
    if upload.size is not None and upload.size > left:
        raise ApiError(413, "payload_too_large", f"the files are over the {cap:,}-byte upload limit", param)
    chosen = (fmt or ui.format_for(filename) or "").lower()
    if not chosen:
        raise ApiError(
            422,
            "invalid_request",
            f"format: cannot tell the format of {param} from its name {filename!r}; pass format ({_FORMATS})",
            "format",
        )
    data = upload.file.read(left + 1)
    if len(data) > left:
        raise ApiError(413, "payload_too_large", f"the files are over the {cap:,}-byte upload limit", param)
    return ui.DataFile(data, chosen, filename, split)


@router.post("/datasets", status_code=201, response_model=DatasetOut, dependencies=[rate_limit("upload")])
def upload_dataset(
    principal: Submitter,
    db: DB,
    file: Annotated[
        UploadFile,
        File(
            description="The dataset, or its train split when validation_file or "
            "test_file is given: JSON lines, a JSON array of objects (.json), "
            "CSV or TSV with a header row, Parquet or Arrow."
        ),
    ],
    name: Annotated[
        str,
        Form(
            description="Dataset name, unique among your datasets: 2-64 chars, a-z first, then "
            "a-z 0-9 _ -. Jobs use the returned task_name."
        ),
    ],
    text_fields: Annotated[str, Form(description="Comma-separated text column(s).")] = "text",
    label_field: Annotated[str, Form(description="The label column.")] = "label",
    validation_file: Annotated[UploadFile | None, File(description="The validation split (optional).")] = None,
    test_file: Annotated[UploadFile | None, File(description="The test split (optional).")] = None,
    split_field: Annotated[
        str,
        Form(
            description="Column giving each row's split (train, validation or val, "
            "test), used when present; empty to ignore it."
        ),
    ] = "split",
    format: Annotated[str | None, Form(description=f"{_FORMATS} (default: from each file name).")] = None,
    template: Annotated[
        str | None, Form(description="Jinja prompt template (default lists fields and options).")
    ] = None,
    label_names: Annotated[
        str | None, Form(description="Label order: comma-separated or a JSON list; integer labels index them.")
    ] = None,
    id_field: Annotated[str | None, Form(description="Optional column of unique row ids.")] = None,
    description: Annotated[
        str | None, Form(max_length=2000, description="What the dataset is, for humans (at most 2000 characters).")
    ] = None,
) -> DatasetOut:
    cap = get_settings().max_upload_bytes
    count = db.scalar(select(func.count()).select_from(Dataset).where(Dataset.owner == principal.owner)) or 0
    if count >= get_service_settings().max_datasets:
        raise ApiError(
            429,
            "quota_exceeded",
            f"this owner already has {count} datasets (limit {get_service_settings().max_datasets}); delete some first",
        )
    if db.scalar(select(Dataset.id).where(Dataset.owner == principal.owner, Dataset.name == name)) is not None:
        raise _taken(name)
    ui = _user_import()
    parts: list[tuple[str, UploadFile, str | None]] = [("file", file, None)]
    parts += [
        (p, u, s)
        for p, u, s in (("validation_file", validation_file, "validation"), ("test_file", test_file, "test"))
        if u is not None
    ]
    files: list[Any] = []
    for param, upload, split in parts:
        left = cap - sum(len(f.data) for f in files)
        files.append(_read(upload, param, left, cap, format, split or ("train" if len(parts) > 1 else None)))
    params = {ui.file_label(f): param for f, (param, _, _) in zip(files, parts, strict=True)}
    try:
        parsed = ui.validate_files(
            files,
            text_fields,
            label_field,
            template,
            ui.parse_label_names(label_names),
            id_field or None,
            name=name,
            split_field=split_field or None,
        )
    except ui.DatasetValidationError as exc:
        raise _invalid(exc, params) from None
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
    return _record(db, principal.owner, name, task.name, parsed, files, ui)


def _record(db: Session, owner: str, name: str, task_name: str, parsed: Any, files: list[Any], ui: Any) -> DatasetOut:
    """The dataset row and one artifact per uploaded file; on any failure the task and files are removed."""
    store = ArtifactStore()
    stored: list[StoredObject] = []
    try:
        ds_id = new_id("ds")
        arts = []
        for f in files:
            stored.append(store.put_bytes(f.data))
            arts.append(
                record_artifact(
                    db,
                    stored[-1],
                    owner=owner,
                    name=f.name,
                    meta={"dataset_id": ds_id, **({"split": f.split} if f.split else {})},
                )
            )
        spec = ui.user_task_spec(task_name)
        info = {
            k: spec.get(k)
            for k in (
                "label_names",
                "label_counts",
                "sizes",
                "text_fields",
                "label_field",
                "id_field",
                "template",
                "description",
                "split_source",
                "warnings",
            )
        }
        info["artifact_ids"] = [a.id for a in arts]
        ds = Dataset(
            id=ds_id,
            owner=owner,
            name=name,
            task_name=task_name,
            format=parsed.fmt[:16],
            filename=", ".join(f.name for f in files)[:500],
            size_bytes=sum(len(f.data) for f in files),
            sha256=parsed.sha256,
            num_rows=len(parsed.rows),
            artifact_id=arts[0].id,
            info=info,
        )
        db.add(ds)
        db.commit()
    except BaseException as exc:
        db.rollback()
        ui.delete_user_task(task_name)
        for obj in stored:
            release_object(db, store, obj.sha256, obj.path)
        if isinstance(exc, IntegrityError):  # the same owner uploaded the same name meanwhile
            raise _taken(name) from None
        raise
    return DatasetOut.of(ds)


def _find(db: Session, ref: str, principal: Any) -> Dataset:
    """The caller's dataset with id `ref`, else with name `ref`; 404 for anything else (another owner's too)."""
    row = db.get(Dataset, ref)
    if row is not None and owned(principal, row.owner):
        return row
    row = db.scalar(select(Dataset).where(Dataset.owner == principal.owner, Dataset.name == ref))
    if row is None:
        raise ApiError(404, "not_found", f"no dataset {ref!r}", "id")
    return row


@router.get("/datasets", response_model=ListResponse[DatasetOut])
def list_datasets(principal: Submitter, db: DB, after: Cursor = None, limit: PageSize = 20) -> ListResponse[DatasetOut]:
    rows, more = page(db, scoped(select(Dataset), Dataset, principal), Dataset.id, after, limit, principal=principal)
    data = [DatasetOut.of(d) for d in rows]
    return ListResponse[DatasetOut](
        data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/datasets/{dataset}", response_model=DatasetOut)
def get_dataset(dataset: str, principal: Submitter, db: DB) -> DatasetOut:
    """One dataset, by id or by name."""
    return DatasetOut.of(_find(db, dataset, principal))


@router.delete("/datasets/{dataset}", response_model=Deleted)
def delete_dataset(dataset: str, principal: Submitter, db: DB) -> Deleted:
    """Delete the dataset (by id or name), its task and its stored files; refused (409 dataset_in_use) while a
    queued or running job names its task. Jobs that already ran keep their artifacts."""
    ds = _find(db, dataset, principal)
    jobs = active_jobs_using(db, ds.task_name)
    if jobs:
        shown = ", ".join(jobs[:10]) + (f" and {len(jobs) - 10} more" if len(jobs) > 10 else "")
        raise ApiError(
            409,
            "dataset_in_use",
            f"dataset {ds.name!r} is used by queued or running job(s) {shown}; wait for them or cancel them first",
            "id",
        )
    ids = [*((ds.info or {}).get("artifact_ids") or []), *([ds.artifact_id] if ds.artifact_id else [])]
    arts = [a for a in (db.get(Artifact, i) for i in dict.fromkeys(ids)) if a is not None]
    dataset_id, task_name = ds.id, ds.task_name
    db.delete(ds)
    for art in arts:
        db.delete(art)
    db.commit()
    try:
        _user_import().delete_user_task(task_name)
    except ValueError:
        log.warning("dataset %s: task %s was already gone", dataset_id, task_name)
    for art in arts:
        release_object(db, ArtifactStore(), art.sha256, art.path)
    return Deleted(id=dataset_id, object="dataset")
