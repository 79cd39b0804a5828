"""The typed contract of what a stage produced: its summary and its artifacts, each of a declared kind.

Stages of the ML core return a dict summary whose "artifacts" key maps logical names to paths relative to the
workdir; `StageResult.from_summary` turns that into a StageResult, deciding each artifact's kind once, from the
files: a folder with adapter_config.json is an adapter, a JSON file that is an ensemble manifest (one that
`load_manifest` accepts) an ensemble, anything else a file or a folder. Ingest trusts the kinds and guesses
nothing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.errors import StageFailed

if TYPE_CHECKING:
    from shared.ml.training.ensemble import EnsembleManifest

ArtifactKind = Literal["file", "folder", "adapter", "ensemble"]
ADAPTER_CONFIG = "adapter_config.json"
# A JSON file that says it is in a chorus.ensemble format, or is named ensemble*, must be a valid manifest.
MANIFEST_FORMAT_PREFIX = "chorus.ensemble/"


class StageOutputError(StageFailed, ValueError):
    """A stage's outputs that cannot be recorded (listed wrongly, or an ensemble manifest that does not match
    the adapters the stage wrote): the stage's fault, never the user's. Also a ValueError for callers that
    catch one."""


class StageArtifact(BaseModel):
    """One output of a stage: where it is (relative to the stage's workdir) and what it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    kind: ArtifactKind

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        parts = PurePosixPath(value).parts
        if not value or value.startswith("/") or ".." in parts:
            raise ValueError(f"artifact path {value!r} must be relative to the stage workdir, without '..'")
        return value


class StageResult(BaseModel):
    """What a stage returns: a JSON-able summary (without "artifacts") and its artifacts by logical name."""

    model_config = ConfigDict(extra="forbid")

    summary: dict[str, Any] = Field(default_factory=dict)
    artifacts: dict[str, StageArtifact] = Field(default_factory=dict)

    @field_validator("summary")
    @classmethod
    def _no_artifacts_key(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "artifacts" in value:
            raise ValueError("a StageResult lists its artifacts in `artifacts`, not in its summary")
        return value

    @classmethod
    def from_summary(cls, workdir: Path, summary: Mapping[str, Any]) -> StageResult:
        """Today's dict contract as a StageResult: every listed artifact located in `workdir` (StageOutputError
        outside it, FileNotFoundError when missing) and given its kind."""
        if not isinstance(summary, Mapping):
            raise StageOutputError(f"a stage returns a dict summary, not {type(summary).__name__}")
        listed = summary.get("artifacts") or {}
        if not isinstance(listed, Mapping):
            raise StageOutputError("stage summary 'artifacts' must be a mapping of logical name -> relative path")
        root = workdir.resolve()
        artifacts = {str(name): detect(root, str(name), str(rel)) for name, rel in listed.items()}
        return cls(summary={k: v for k, v in summary.items() if k != "artifacts"}, artifacts=artifacts)

    def checked(self, workdir: Path) -> StageResult:
        """This result with its paths normalised, once every artifact is found inside `workdir` and is of its
        declared kind; StageOutputError (FileNotFoundError for a missing one) otherwise."""
        root = workdir.resolve()
        artifacts = {name: check(root, name, art) for name, art in self.artifacts.items()}
        return self.model_copy(update={"artifacts": artifacts})

    def paths(self, workdir: Path) -> dict[str, Path]:
        """{logical name: absolute path} of the artifacts in `workdir`."""
        root = workdir.resolve()
        return {name: locate(root, name, art.path) for name, art in self.artifacts.items()}


def locate(root: Path, name: str, rel: str) -> Path:
    """The resolved path of artifact `name` listed as `rel` in the (resolved) workdir `root`."""
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise StageOutputError(f"artifact {name!r} points outside the stage workdir: {rel}")
    if not path.exists():
        raise FileNotFoundError(f"artifact {name!r} listed by the stage does not exist: {rel}")
    return path


def detect(root: Path, name: str, rel: str) -> StageArtifact:
    """Artifact `name` at `rel` in `root`, of the kind its files show."""
    path = locate(root, name, rel)
    kind: ArtifactKind
    if path.is_dir():
        kind = "adapter" if (path / ADAPTER_CONFIG).is_file() else "folder"
    elif _claims_manifest(name, path):
        read_manifest(path)
        kind = "ensemble"
    else:
        kind = "file"
    return StageArtifact(path=path.relative_to(root).as_posix(), kind=kind)


def check(root: Path, name: str, art: StageArtifact) -> StageArtifact:
    """`art` with its path normalised, if it is in `root` and of its declared kind."""
    path = locate(root, name, art.path)
    if art.kind in ("folder", "adapter") and not path.is_dir():
        raise StageOutputError(f"artifact {name!r} ({art.kind}) is not a folder: {art.path}")
    if art.kind in ("file", "ensemble") and not path.is_file():
        raise StageOutputError(f"artifact {name!r} ({art.kind}) is not a file: {art.path}")
    if art.kind == "adapter" and not (path / ADAPTER_CONFIG).is_file():
        raise StageOutputError(f"artifact {name!r} is not an adapter: {art.path} has no {ADAPTER_CONFIG}")
    if art.kind == "ensemble":
        read_manifest(path)
    return StageArtifact(path=path.relative_to(root).as_posix(), kind=art.kind)


def read_manifest(path: Path) -> EnsembleManifest:
    """The ensemble manifest at `path` (validated by `load_manifest`, fingerprint included); StageOutputError,
    naming the file but not the server's path, when it is not a valid one."""
    from shared.ml.training.ensemble import load_manifest

    try:
        return load_manifest(path)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        message = str(exc).replace(str(path), path.name)  # no server paths in a job's error
        raise StageOutputError(
            message if path.name in message else f"ensemble manifest {path.name!r}: {message}"
        ) from exc


def _claims_manifest(name: str, path: Path) -> bool:
    """A JSON file named ensemble* (logical or file name), or one whose "format" is a chorus.ensemble one."""
    if path.suffix != ".json":
        return False
    if name.startswith("ensemble") or path.name.startswith("ensemble"):
        return True
    try:
        raw = path.read_bytes()
        # Most listed JSON files are reports, some large: parse only those that mention the format.
        data = json.loads(raw) if b"chorus.ensemble" in raw else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and str(data.get("format", "")).startswith(MANIFEST_FORMAT_PREFIX)
