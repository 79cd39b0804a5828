"""/v1/artifacts, /v1/adapters, /v1/ensembles: metadata and downloads (folders as .tar.gz or .zip)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse
from sqlalchemy import select

from services.api.common import Cursor, JobFilter, PageSize, get_owned, page, scoped
from services.api.deps import DB, Submitter
from services.api.errors import ApiError
from services.api.schemas import AdapterOut, ArtifactOut, EnsembleOut, ListResponse, artifact_filename
from shared.db.models import Adapter, Artifact, Ensemble
from shared.storage import ArtifactStore, safe_name, sha256_file

router = APIRouter(tags=["artifacts"])
ArchiveFormat = Literal["tar.gz", "zip"]
Format = Annotated[ArchiveFormat, Query(description="The archive format of a folder (a file is sent as it is).")]
_ARCHIVE_TYPES = {"tar.gz": "application/gzip", "zip": "application/zip"}


def download(art: Artifact, fmt: ArchiveFormat, name: str | None = None) -> FileResponse:
    store = ArtifactStore()
    label = safe_name(name) if name else artifact_filename(art)
    try:
        if art.kind == "folder":
            path = store.archive(art.path, art.sha256, label, fmt)
            return FileResponse(
                path,
                media_type=_ARCHIVE_TYPES[fmt],
                filename=f"{label}.{fmt}",
                headers={"X-Content-SHA256": art.sha256},
            )
        path = store.resolve(art.path)
    except (OSError, ValueError) as exc:
        raise ApiError(500, "artifact_unavailable", f"artifact {art.id} cannot be read from the store") from exc
    if not path.is_file():
        raise ApiError(500, "artifact_unavailable", f"artifact {art.id} is missing from the store")
    return FileResponse(path, media_type=art.media_type, filename=label, headers={"X-Content-SHA256": art.sha256})


OutT = TypeVar("OutT", ArtifactOut, AdapterOut, EnsembleOut)


def _listing(rows: Sequence[Any], more: bool, out: type[OutT]) -> ListResponse[OutT]:
    data = [out.of(r) for r in rows]
    # Parametrised with the class itself (the route's response model), which mypy cannot check statically.
    return ListResponse[out](  # type: ignore[valid-type]
        data=data,
        has_more=more,
        first_id=data[0].id if data else None,
        last_id=data[-1].id if data else None,
    )


@router.get("/artifacts", response_model=ListResponse[ArtifactOut])
def list_artifacts(
    principal: Submitter, db: DB, job_id: JobFilter = None, after: Cursor = None, limit: PageSize = 20
) -> ListResponse[ArtifactOut]:
    stmt = scoped(select(Artifact), Artifact, principal)
    if job_id:
        stmt = stmt.where(Artifact.job_id == job_id)
    rows, more = page(db, stmt, Artifact.id, after, limit, principal=principal)
    return _listing(rows, more, ArtifactOut)


@router.get("/artifacts/{artifact_id}", response_model=ArtifactOut)
def get_artifact(artifact_id: str, principal: Submitter, db: DB) -> ArtifactOut:
    return ArtifactOut.of(get_owned(db, Artifact, artifact_id, principal, "artifact"))


@router.get(
    "/artifacts/{artifact_id}/content",
    response_class=FileResponse,
    responses={200: {"description": "The file, or a folder as an archive (format=tar.gz|zip)."}},
)
def artifact_content(artifact_id: str, principal: Submitter, db: DB, format: Format = "tar.gz") -> FileResponse:
    return download(get_owned(db, Artifact, artifact_id, principal, "artifact"), format)


@router.get("/adapters", response_model=ListResponse[AdapterOut], tags=["adapters"])
def list_adapters(
    principal: Submitter, db: DB, job_id: JobFilter = None, after: Cursor = None, limit: PageSize = 20
) -> ListResponse[AdapterOut]:
    stmt = scoped(select(Adapter), Adapter, principal)
    if job_id:
        stmt = stmt.where(Adapter.job_id == job_id)
    rows, more = page(db, stmt, Adapter.id, after, limit, principal=principal)
    return _listing(rows, more, AdapterOut)


@router.get("/adapters/{adapter_id}", response_model=AdapterOut, tags=["adapters"])
def get_adapter(adapter_id: str, principal: Submitter, db: DB) -> AdapterOut:
    return AdapterOut.of(get_owned(db, Adapter, adapter_id, principal, "adapter"))


@router.get(
    "/adapters/{adapter_id}/content",
    response_class=FileResponse,
    tags=["adapters"],
    responses={200: {"description": "The PEFT adapter folder as an archive (format=tar.gz|zip)."}},
)
def adapter_content(adapter_id: str, principal: Submitter, db: DB, format: Format = "tar.gz") -> FileResponse:
    adapter = get_owned(db, Adapter, adapter_id, principal, "adapter")
    art = db.get(Artifact, adapter.artifact_id)
    if art is None:
        raise ApiError(500, "artifact_unavailable", f"adapter {adapter_id} has no stored files")
    return download(art, format, adapter.name)


@router.get("/ensembles", response_model=ListResponse[EnsembleOut], tags=["ensembles"])
def list_ensembles(
    principal: Submitter, db: DB, job_id: JobFilter = None, after: Cursor = None, limit: PageSize = 20
) -> ListResponse[EnsembleOut]:
    stmt = scoped(select(Ensemble), Ensemble, principal)
    if job_id:
        stmt = stmt.where(Ensemble.job_id == job_id)
    rows, more = page(db, stmt, Ensemble.id, after, limit, principal=principal)
    return _listing(rows, more, EnsembleOut)


@router.get("/ensembles/{ensemble_id}", response_model=EnsembleOut, tags=["ensembles"])
def get_ensemble(ensemble_id: str, principal: Submitter, db: DB) -> EnsembleOut:
    return EnsembleOut.of(get_owned(db, Ensemble, ensemble_id, principal, "ensemble"))


@router.get(
    "/ensembles/{ensemble_id}/content",
    response_class=FileResponse,
    tags=["ensembles"],
    responses={200: {"description": "The ensemble manifest (JSON) exactly as stored."}},
)
def ensemble_content(ensemble_id: str, principal: Submitter, db: DB) -> FileResponse:
    ens = get_owned(db, Ensemble, ensemble_id, principal, "ensemble")
    art = db.get(Artifact, ens.artifact_id)
    if art is None:
        raise ApiError(500, "artifact_unavailable", f"ensemble {ensemble_id} has no stored manifest")
    _check_unmodified(art, f"ensemble {ensemble_id}: its stored manifest")
    return download(art, "tar.gz", f"{ens.name}.json")


def _check_unmodified(art: Artifact, what: str) -> None:
    """409 when a stored file no longer has its artifact row's sha256 (edited after it was stored)."""
    try:
        path = ArtifactStore().resolve(art.path)
        actual = sha256_file(path) if art.kind == "file" and path.is_file() else art.sha256
    except (OSError, ValueError) as exc:
        raise ApiError(500, "artifact_unavailable", f"{what} cannot be read from the store") from exc
    if actual != art.sha256:
        raise ApiError(
            409,
            "artifact_integrity",
            f"{what} was modified in the store (sha256 {actual[:16]}... differs "
            f"from the recorded {art.sha256[:16]}...); refusing to serve it",
        )
