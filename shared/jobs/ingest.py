"""Turning a stage's outputs (a StageResult) into stored artifacts, adapter rows and ensemble rows (idempotently).

Adapters and ensembles are the artifacts of those kinds; nothing is guessed from names here (see
shared.jobs.results)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import Adapter, Artifact, Ensemble, new_id
from shared.files import json_safe
from shared.jobs.results import StageOutputError, StageResult, read_manifest
from shared.storage import ArtifactStore, media_type_for, record_artifact, sha256_file

__all__ = ["StageOutputError", "ingest_result", "ingest_stage", "merge_stage_artifacts"]


def merge_stage_artifacts(stages: list[tuple[str, dict[str, str]]]) -> dict[str, str]:
    """{logical name: artifact id} over a job's stages; a name produced by several stages is keyed
    "stage/name" for each of them (e.g. two stages that both write a "report")."""
    counts = Counter(name for _, ids in stages for name in ids)
    return {
        (name if counts[name] == 1 else f"{stage}/{name}"): art for stage, ids in stages for name, art in ids.items()
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def ingest_stage(
    session: Session, store: ArtifactStore, *, workdir: Path, summary: Mapping[str, Any], **where: str
) -> dict[str, str]:
    """ingest_result for a stage's dict summary (its "artifacts" listed by relative path); `where` is job_id,
    owner and stage."""
    result = StageResult.from_summary(workdir, summary)
    return ingest_result(session, store, workdir=workdir, result=result, **where)


def ingest_result(
    session: Session,
    store: ArtifactStore,
    *,
    job_id: str,
    owner: str,
    stage: str,
    workdir: Path,
    result: StageResult,
) -> dict[str, str]:
    """Store a stage's artifacts and record them (adapter and ensemble rows by their declared kind); returns
    {logical name: artifact id}. Does not commit.

    Re-running this for the same job/stage (after a redelivery) updates rows in place: no duplicates.
    """
    result = result.checked(workdir)
    root = workdir.resolve()
    paths = result.paths(workdir)
    ids: dict[str, str] = {}
    adapters: dict[Path, Adapter] = {}  # resolved adapter folder -> its row
    # Folders (adapters) first so an ensemble manifest can point at their ids.
    order = sorted(result.artifacts.items(), key=lambda kv: (kv[1].kind not in ("folder", "adapter"), kv[0]))
    for name, artifact in order:
        path = paths[name]
        stored = store.put(path)
        art = record_artifact(
            session,
            stored,
            owner=owner,
            name=name,
            job_id=job_id,
            stage=stage,
            meta={"relpath": str(path.relative_to(root))},
            media_type=media_type_for(path.name, stored.kind),
        )
        ids[name] = art.id
        if artifact.kind == "adapter":
            adapters[path] = _record_adapter(session, art, path, owner, job_id, path.name)
    for name, artifact in result.artifacts.items():
        if artifact.kind == "ensemble":
            row = session.get(Artifact, ids[name])
            assert row is not None  # recorded above, in this session
            _record_ensemble(session, row, paths[name], owner, job_id, adapters)
    session.flush()
    return ids


def _record_adapter(session: Session, art: Artifact, folder: Path, owner: str, job_id: str, name: str) -> Adapter:
    config = _read_json(folder / "adapter_config.json")
    extra = {}
    for candidate in ("chorus_adapter.json", "chorus.json", "adapter_meta.json"):
        if (folder / candidate).is_file():
            extra = _read_json(folder / candidate)
            break
    info = {
        "rank": config.get("r"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": config.get("target_modules"),
        "peft_type": config.get("peft_type"),
        **extra,
    }
    row = session.scalars(select(Adapter).where(Adapter.job_id == job_id, Adapter.name == name)).one_or_none()
    if row is None:
        row = Adapter(id=new_id("ad"), owner=owner, job_id=job_id, name=name)
        session.add(row)
    row.artifact_id, row.sha256 = art.id, art.sha256
    base = extra.get("base_model")
    if not base and isinstance(extra.get("base"), dict):
        base = extra["base"].get("base_model")
    row.base_model = str(base or config.get("base_model_name_or_path") or "") or None
    row.info = json_safe(info)
    return row


def _record_ensemble(
    session: Session, art: Artifact, path: Path, owner: str, job_id: str | None, folders: dict[Path, Adapter]
) -> Ensemble:
    """The ensemble row of a manifest: validated with `load_manifest` (a recorded fingerprint must match its
    content); `fingerprint` is the manifest's fingerprint, the one the inference service reports (the file's
    own sha256 stays on the artifact row). Every adapter member must be one of the job's stored adapters whose
    weights have the sha256 the manifest records; anything else is a StageOutputError naming the member."""
    from shared.ml.training.adapters import WEIGHTS_FILE
    from shared.ml.training.ensemble import compute_fingerprint

    manifest = read_manifest(path)
    # Adapters of the job's earlier stages, by folder name (this stage's own are matched by folder).
    earlier = select(Adapter).where(Adapter.job_id == job_id, Adapter.owner == owner)
    known = {a.name: a for a in session.scalars(earlier)}
    members: dict[str, str] = {}
    for member in manifest.members:
        if member.path is None:
            continue
        folder = (path.parent / member.path).resolve()
        adapter = folders.get(folder) or known.get(folder.name) or known.get(member.name)
        if adapter is None:
            raise StageOutputError(
                f"ensemble manifest {path.name!r}: member {member.name!r} ({member.path}) is not an "
                "adapter folder stored by this job"
            )
        weights = folder / WEIGHTS_FILE
        if folder in folders and (not weights.is_file() or sha256_file(weights) != member.sha256):
            raise StageOutputError(
                f"ensemble manifest {path.name!r}: member {member.name!r}: {member.path}/{WEIGHTS_FILE} "
                "does not have the sha256 the manifest records"
            )
        members[member.name] = adapter.id
    raw = _read_json(path)
    name = manifest.name or path.stem
    row = session.scalars(select(Ensemble).where(Ensemble.job_id == job_id, Ensemble.name == name)).one_or_none()
    if row is None:
        row = Ensemble(id=new_id("ens"), owner=owner, job_id=job_id, name=name)
        session.add(row)
    row.artifact_id = art.id
    row.fingerprint = manifest.fingerprint or compute_fingerprint(manifest)
    row.base_model = manifest.base.base_model
    row.manifest = json_safe(raw)
    row.members = members
    return row
