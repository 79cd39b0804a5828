"""Where ensembles come from: an id is resolved to a validated manifest and its members' adapter folders.

Never a user-supplied path or URL: ids must match ENSEMBLE_ID and are looked up
* in the job database (`ensembles` rows written by training jobs; an id is the row's `ens-...` id or the
  `art-...` id of its ensemble.json artifact, as a job's result_artifacts lists it) with the files in the
  artifact store (`StoreEnsembleSource`), and/or
* as a folder `<root>/<id>/ensemble.json` with member paths relative to it (`DirectoryEnsembleSource`;
  default root `<artifacts>/ensembles`, for bundles deployed by hand).
Every resolved path must stay inside its root (no `..`, no symlink escapes).

Integrity: a folder manifest must record its fingerprint (checked against its content by `load_manifest`);
a stored manifest and each member's stored adapter folder must still have the sha256 of their artifact rows
(`IntegrityError` otherwise). Either way a file edited after the fact is refused before anything is loaded;
the engine then checks each adapter's weights against the sha256 the manifest records.

Ownership: a database ensemble carries its row's `owner` (the owner of the job that produced it); a folder
has none (the loading admin decides: see services/inference/app.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from shared.errors import BadInput

log = logging.getLogger("chorus.inference")

ENSEMBLE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MANIFEST_FILE = "ensemble.json"


class EnsembleNotFound(LookupError):
    pass


class InvalidEnsemble(BadInput):
    """The ensemble exists but its manifest or layout is unusable."""


class IntegrityError(InvalidEnsemble):
    """A stored file no longer matches its record (edited or corrupted after it was written)."""

    def __init__(self, message: str, param: str = "id") -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ResolvedEnsemble:
    id: str
    manifest: Any  # shared.ml.training.ensemble.EnsembleManifest
    member_folders: dict[str, Path]
    origin: str  # "store" | "directory"
    owner: str | None = None  # the job owner's, for "store"; None for "directory"


class EnsembleSource(Protocol):
    def resolve(self, ensemble_id: str) -> ResolvedEnsemble: ...


def check_id(ensemble_id: str) -> None:
    if not ENSEMBLE_ID.fullmatch(ensemble_id) or ".." in ensemble_id:
        raise EnsembleNotFound(f"invalid ensemble id {ensemble_id!r}")


def _inside(root: Path, path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise InvalidEnsemble(f"path {path.name!r} escapes its ensemble folder")
    return resolved


def _load_manifest(path: Path) -> Any:
    from shared.ml.training.ensemble import load_manifest

    try:
        return load_manifest(path)
    except ValueError as exc:  # pydantic ValidationError is a ValueError
        raise InvalidEnsemble(f"invalid ensemble manifest: {exc}") from exc


def _check_stored(path: Path, art: Any, what: str, param: str = "id") -> None:
    """IntegrityError unless the stored object at `path` still has its artifact row's sha256."""
    from shared.storage import folder_digest, folder_manifest, sha256_file

    try:
        actual = folder_digest(folder_manifest(path)) if art.kind == "folder" else sha256_file(path)
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{what} cannot be read from the artifact store", param) from exc
    if actual != art.sha256:
        raise IntegrityError(
            f"{what} was modified in the artifact store: sha256 {actual[:16]}... differs from the "
            f"recorded {art.sha256[:16]}...; refusing to load it",
            param,
        )


class DirectoryEnsembleSource:
    """`<root>/<id>/ensemble.json`; member paths relative to that folder."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def resolve(self, ensemble_id: str) -> ResolvedEnsemble:
        check_id(ensemble_id)
        folder = self.root / ensemble_id
        manifest_path = folder / MANIFEST_FILE
        if not manifest_path.is_file():
            raise EnsembleNotFound(f"ensemble {ensemble_id!r} not found")
        folder = _inside(self.root, folder)
        manifest = _load_manifest(_inside(folder, manifest_path))
        if manifest.fingerprint is None:  # nothing to check an edit against
            raise InvalidEnsemble(
                f"ensemble {ensemble_id!r}: {MANIFEST_FILE} records no fingerprint; write it with "
                "shared.ml.training.ensemble.write_manifest"
            )
        members = {}
        for member in manifest.members:
            if member.path is not None:
                members[member.name] = _inside(folder, folder / member.path)
        return ResolvedEnsemble(ensemble_id, manifest, members, "directory")


class StoreEnsembleSource:
    """Ensemble rows of the job database (id `ens-...`, or the `art-...` id of the ensemble's manifest artifact),
    files from the content-addressed artifact store."""

    def __init__(self, store: Any = None, db_url: str | None = None) -> None:
        self.store = store
        self.db_url = db_url

    def resolve(self, ensemble_id: str) -> ResolvedEnsemble:
        from sqlalchemy import select

        from shared.db.models import Adapter, Artifact, Ensemble
        from shared.db.session import get_sessionmaker
        from shared.storage import ArtifactStore

        check_id(ensemble_id)
        store = self.store or ArtifactStore()
        with get_sessionmaker(self.db_url)() as session:
            row = session.get(Ensemble, ensemble_id)
            if row is None and ensemble_id.startswith("art-"):  # the manifest's artifact id
                row = session.scalars(
                    select(Ensemble).where(Ensemble.artifact_id == ensemble_id).order_by(Ensemble.id)
                ).first()
            if row is None:
                raise EnsembleNotFound(f"ensemble {ensemble_id!r} not found")
            art = session.get(Artifact, row.artifact_id)
            if art is None:
                raise InvalidEnsemble(f"ensemble {ensemble_id!r}: its manifest artifact is missing")
            path = store.resolve(art.path)
            _check_stored(path, art, f"ensemble {ensemble_id!r}: its manifest")
            if path.is_dir():
                path = path / MANIFEST_FILE
            manifest = _load_manifest(path)
            members: dict[str, Path] = {}
            for index, member in enumerate(manifest.members):
                if member.path is None:
                    continue
                adapter_id = (row.members or {}).get(member.name)
                adapter = session.get(Adapter, adapter_id) if adapter_id else None
                adapter_art = session.get(Artifact, adapter.artifact_id) if adapter is not None else None
                if adapter_art is None:
                    raise InvalidEnsemble(f"ensemble {ensemble_id!r}: member {member.name!r} has no stored adapter")
                members[member.name] = store.resolve(adapter_art.path)
                _check_stored(
                    members[member.name],
                    adapter_art,
                    f"ensemble {ensemble_id!r}: member {member.name!r}'s adapter",
                    f"members[{index}]",
                )
            owner = row.owner
        return ResolvedEnsemble(ensemble_id, manifest, members, "store", owner)


class ChainSource:
    """The first source that knows the id (a source whose backend fails is logged and skipped)."""

    def __init__(self, sources: Sequence[EnsembleSource]) -> None:
        self.sources = list(sources)

    def resolve(self, ensemble_id: str) -> ResolvedEnsemble:
        check_id(ensemble_id)
        for source in self.sources:
            try:
                return source.resolve(ensemble_id)
            except EnsembleNotFound:
                continue
            except InvalidEnsemble:
                raise
            except Exception:  # e.g. the database is not reachable: try the next source
                log.warning("ensemble source %s failed for %r", type(source).__name__, ensemble_id, exc_info=True)
        raise EnsembleNotFound(f"ensemble {ensemble_id!r} not found")


def default_source(ensembles_dir: Path | None = None, use_database: bool = True) -> EnsembleSource:
    from shared.config import get_settings

    directory = DirectoryEnsembleSource(ensembles_dir or get_settings().artifacts / "ensembles")
    return ChainSource([StoreEnsembleSource(), directory] if use_database else [directory])
