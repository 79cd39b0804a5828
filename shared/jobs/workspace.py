"""A stage's folder: where it writes (whole files only), whether its outputs are there, and what it produced.

Writes go through shared.files, so a file is either absent or complete: `done` (every output present) is then
a sound resumability check. `result` turns the declared outputs, and any a dict summary lists under
"artifacts", into the StageResult the runner ingests.

This is the job layer's: the ML core never imports shared.jobs, so its stages write through shared.files and
return the dict contract. Were they to use a Workspace, this module and shared.jobs.results (which need only
pydantic, shared.errors and shared.files) would move into shared/ together.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shared.files import atomic_write_json, atomic_write_text
from shared.jobs.results import ArtifactKind, StageArtifact, StageOutputError, StageResult, check, detect


class Workspace:
    """The folder `root` of one stage (a job's workdir, shared by its stages)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self._declared: dict[str, tuple[str, ArtifactKind | None]] = {}  # logical -> (relpath, kind or None)

    def path(self, name: str | Path) -> Path:
        """root / name; StageOutputError for a name that leads outside the folder."""
        root = self.root.resolve()
        if not (root / name).resolve().is_relative_to(root):
            raise StageOutputError(f"{str(name)!r} is outside the stage workdir")
        return self.root / name

    def write_json(self, name: str | Path, data: Any) -> Path:
        """Write JSON (indent 2, no NaN) whole or not at all; its path."""
        path = self.path(name)
        atomic_write_json(path, data, newline=True)
        return path

    def write_text(self, name: str | Path, text: str) -> Path:
        path = self.path(name)
        atomic_write_text(path, text)
        return path

    def done(self, *names: str | Path) -> bool:
        """Whether every named output (default: every declared artifact) exists; False with nothing to check."""
        wanted = names or tuple(rel for rel, _ in self._declared.values())
        return bool(wanted) and all(self.path(name).exists() for name in wanted)

    def artifact(self, logical: str, relpath: str | Path, kind: ArtifactKind | None = None) -> Path:
        """Declare an output of the stage; `kind` None decides it from the files, as StageResult.from_summary
        does. Its path."""
        path = self.path(relpath)
        root = self.root.resolve()
        rel = (root / relpath).resolve().relative_to(root).as_posix()
        previous = self._declared.get(logical)
        if previous is not None and previous[0] != rel:
            raise StageOutputError(f"artifact {logical!r} is declared twice ({previous[0]}, {rel})")
        self._declared[logical] = (rel, kind)
        return path

    def result(self, summary: Mapping[str, Any] | None = None) -> StageResult:
        """The StageResult of `summary` (a dict summary, its "artifacts" included) and the declared artifacts,
        every one checked: inside the folder, present and of its kind."""
        result = StageResult.from_summary(self.root, summary if summary is not None else {})
        root = self.root.resolve()
        for logical, (rel, kind) in self._declared.items():
            art = (
                detect(root, logical, rel) if kind is None else check(root, logical, StageArtifact(path=rel, kind=kind))
            )
            listed = result.artifacts.get(logical)
            if listed is not None and listed.path != art.path:
                raise StageOutputError(f"artifact {logical!r} is both {listed.path} (summary) and {art.path}")
            result.artifacts[logical] = art
        return result
