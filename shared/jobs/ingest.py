"""Turning a stage's outputs into stored artifacts, adapter rows and ensemble rows (idempotently)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import Adapter, Artifact, Ensemble, new_id
from shared.errors import StageFailed
from shared.files import json_safe
from shared.storage import ArtifactStore, media_type_for, record_artifact, sha256_file


class StageOutputError(StageFailed, ValueError):
    """A stage's outputs that cannot be recorded (listed wrongly, or an ensemble manifest that does not match
    the adapters the stage wrote): the stage's fault, never the user's. Also a ValueError for callers that
    catch one."""


def merge_stage_artifacts(stages: list[tuple[str, dict[str, str]]]) -> dict[str, str]:
    """{logical name: artifact id} over a job's stages; a name produced by several stages is keyed
    "stage/name" for each of them (e.g. two stages that both write a "report")."""
    counts = Counter(name for _, ids in stages for name in ids)
    return {
        (name if counts[name] == 1 else f"{stage}/{name}"): art for stage, ids in stages for name, art in ids.items()
    }


def stage_artifact_paths(workdir: Path, summary: dict[str, Any]) -> dict[str, Path]:
    """{logical name: absolute path} of the artifacts a stage listed; refuses paths outside workdir."""
    listed = summary.get("artifacts") or {}
    if not isinstance(listed, dict):
        raise StageOutputError("stage summary 'artifacts' must be a mapping of logical name -> relative path")
    root = workdir.resolve()
    out: dict[str, Path] = {}
    for name, rel in listed.items():
        path = (root / str(rel)).resolve()
        if not path.is_relative_to(root):
            raise StageOutputError(f"artifact {name!r} points outside the stage workdir: {rel}")
        if not path.exists():
            raise FileNotFoundError(f"artifact {name!r} listed by the stage does not exist: {rel}")
        out[str(name)] = path
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_ensemble(logical: str, path: Path) -> bool:
    """An ensemble manifest: a JSON file named ensemble* whose object lists members."""
    if not (
        path.is_file()
        and path.suffix == ".json"
        and (logical.startswith("ensemble") or path.name.startswith("ensemble"))
    ):
        return False
    return isinstance(_read_json(path).get("members"), list)


def ingest_stage(
    session: Session,
    store: ArtifactStore,
    *,
    job_id: str,
    owner: str,
    stage: str,
    workdir: Path,
    summary: dict[str, Any],
) -> dict[str, str]:
    """Store a stage's artifacts and record them; returns {logical name: artifact id}. Does not commit.

    Re-running this for the same job/stage (after a redelivery) updates rows in place: no duplicates.
    """
    paths = stage_artifact_paths(workdir, summary)
    ids: dict[str, str] = {}
    adapters: dict[Path, Adapter] = {}  # resolved adapter folder -> its row
    # Folders (adapters) first so an ensemble manifest can point at their ids.
    for name, path in sorted(paths.items(), key=lambda kv: (not kv[1].is_dir(), kv[0])):
        stored = store.put(path)
        meta = {"relpath": str(path.relative_to(workdir.resolve()))}
        art = record_artifact(
            session,
            stored,
            owner=owner,
            name=name,
            job_id=job_id,
            stage=stage,
            meta=meta,
            media_type=media_type_for(path.name, stored.kind),
        )
        ids[name] = art.id
        if stored.kind == "folder" and (path / "adapter_config.json").is_file():
            adapters[path] = _record_adapter(session, art, path, owner, job_id, path.name)
    for name, path in paths.items():
        if _is_ensemble(name, path):
            art = session.get(Artifact, ids[name])
            assert art is not None  # recorded above, in this session
            _record_ensemble(session, art, path, owner, job_id, adapters)
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
    from shared.ml.training.ensemble import compute_fingerprint, load_manifest

    try:
        manifest = load_manifest(path)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        message = str(exc).replace(str(path), path.name)  # no server paths in a job's error
        raise StageOutputError(
            message if path.name in message else f"ensemble manifest {path.name!r}: {message}"
        ) from exc
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
