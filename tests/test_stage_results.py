"""The typed stage contract (shared.jobs.results), the stage Workspace, and ingest by declared kinds.

Fast: no model. Manifests and adapter folders are written by hand; the ingest tests use an embedded SQLite
CHORUS_HOME.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from shared.errors import StageFailed
from shared.jobs.results import StageArtifact, StageOutputError, StageResult
from shared.jobs.workspace import Workspace
from shared.storage import sha256_file
from tests.bad_input_apps import embedded_home


def _adapter(folder: Path, payload: bytes = b"weights") -> str:
    """A folder that looks like a PEFT adapter; the sha256 of its weights file."""
    from shared.ml.training.adapters import WEIGHTS_FILE

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    (folder / WEIGHTS_FILE).write_bytes(payload)
    return sha256_file(folder / WEIGHTS_FILE)


def _manifest(path: Path, sha: str = "ab" * 32, name: str = "ens") -> Any:
    """A valid, fingerprinted manifest at `path` with one adapter member g0 (adapters/g0)."""
    from shared.ml.training.ensemble import BaseIdentity, EnsembleManifest, Member, TaskWeights, write_manifest

    manifest = EnsembleManifest(
        name=name,
        base=BaseIdentity(base_model="tiny-llama", base_revision="tiny-llama-seed0", quantization="none"),
        members=[Member(name="g0", path="adapters/g0", sha256=sha, role="group", tasks=["sst2"])],
        tasks={"sst2": TaskWeights(weights={"g0": 1.0})},
    )
    return write_manifest(manifest, path)


def _kinds(result: StageResult) -> dict[str, tuple[str, str]]:
    return {name: (art.path, art.kind) for name, art in result.artifacts.items()}


# -- StageResult.from_summary -----------------------------------------------------------------------
def test_from_summary_decides_each_kind_once(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text(json.dumps({"members": ["not", "a", "manifest"]}))
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(b"png")
    _adapter(tmp_path / "adapters" / "g0")
    _manifest(tmp_path / "ensemble.json")
    _manifest(tmp_path / "deploy.json", name="deploy")  # a manifest under another name is still one
    (tmp_path / "ensemble.png").write_bytes(b"png")  # named ensemble*, but not JSON: a plain file
    summary = {
        "accuracy": 0.5,
        "artifacts": {
            "report": "report.json",
            "plots": "plots",
            "adapter:g0": "./adapters/g0",
            "ensemble": "ensemble.json",
            "deploy": "deploy.json",
            "chart": "ensemble.png",
        },
    }
    result = StageResult.from_summary(tmp_path, summary)
    assert result.summary == {"accuracy": 0.5}
    assert _kinds(result) == {
        "report": ("report.json", "file"),
        "plots": ("plots", "folder"),
        "adapter:g0": ("adapters/g0", "adapter"),  # normalised
        "ensemble": ("ensemble.json", "ensemble"),
        "deploy": ("deploy.json", "ensemble"),
        "chart": ("ensemble.png", "file"),
    }
    assert result.paths(tmp_path)["adapter:g0"] == (tmp_path / "adapters" / "g0").resolve()
    assert StageResult.from_summary(tmp_path, {"x": 1}) == StageResult(summary={"x": 1})


@pytest.mark.parametrize("rel", ["../outside.txt", "sub/../../outside.txt", "ABS", "link/secret.txt"])
def test_paths_outside_the_workdir_are_refused(tmp_path: Path, rel: str) -> None:
    workdir = tmp_path / "work"
    (workdir / "sub").mkdir(parents=True)
    (tmp_path / "outside.txt").write_text("x")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "secret.txt").write_text("x")
    (workdir / "link").symlink_to(tmp_path / "secret")
    listed = str(tmp_path / "outside.txt") if rel == "ABS" else rel
    with pytest.raises(StageOutputError, match="'out' points outside the stage workdir"):
        StageResult.from_summary(workdir, {"artifacts": {"out": listed}})


def test_missing_outputs_and_malformed_listings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="artifact 'a' listed by the stage does not exist: a.json"):
        StageResult.from_summary(tmp_path, {"artifacts": {"a": "a.json"}})
    with pytest.raises(StageOutputError, match="must be a mapping"):
        StageResult.from_summary(tmp_path, {"artifacts": ["a.json"]})
    with pytest.raises(StageOutputError, match="not list"):
        StageResult.from_summary(tmp_path, ["a.json"])  # type: ignore[arg-type]
    assert issubclass(StageOutputError, StageFailed) and issubclass(StageOutputError, ValueError)


@pytest.mark.parametrize(
    ("logical", "filename", "content"),
    [
        ("ensemble", "ensemble.json", {"members": [], "note": "a fake"}),
        ("weights", "ensemble.json", {"name": "x"}),  # the file's name is enough
        ("ensemble_single", "single.json", {"format": "chorus.ensemble/v1", "name": "x"}),  # the logical name too
        ("deploy", "deploy.json", {"format": "chorus.ensemble/v1", "name": "x", "members": []}),  # says it is one
        ("ensemble", "ensemble.json", "not json"),
    ],
)
def test_a_fake_ensemble_is_refused_clearly(tmp_path: Path, logical: str, filename: str, content: Any) -> None:
    path = tmp_path / filename
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(StageOutputError) as info:
        StageResult.from_summary(tmp_path, {"artifacts": {logical: filename}})
    message = str(info.value)
    assert filename in message and str(tmp_path) not in message  # names the file, not the server's path


def test_a_manifest_whose_content_changed_after_its_fingerprint_is_refused(tmp_path: Path) -> None:
    _manifest(tmp_path / "ensemble.json")
    raw = json.loads((tmp_path / "ensemble.json").read_text())
    raw["tasks"]["sst2"]["weights"]["g0"] = 2.0
    (tmp_path / "ensemble.json").write_text(json.dumps(raw))
    with pytest.raises(StageOutputError, match="does not match its content"):
        StageResult.from_summary(tmp_path, {"artifacts": {"ensemble": "ensemble.json"}})


def test_the_models_refuse_what_the_contract_forbids() -> None:
    for bad in ("/etc/passwd", "../x", "a/../../x", ""):
        with pytest.raises(ValidationError):
            StageArtifact(path=bad, kind="file")
    with pytest.raises(ValidationError):
        StageArtifact(path="x", kind="dataset")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not in its summary"):
        StageResult(summary={"artifacts": {"x": "x"}})


def test_checked_holds_declared_kinds_to_the_files(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "fake.json").write_text("{}")
    _adapter(tmp_path / "g0")
    cases = [
        ("adapter", "plain", "has no adapter_config.json"),
        ("adapter", "a.txt", "is not a folder"),
        ("folder", "a.txt", "is not a folder"),
        ("file", "plain", "is not a file"),
        ("ensemble", "fake.json", "fake.json"),
    ]
    for kind, rel, message in cases:
        result = StageResult(artifacts={"x": StageArtifact(path=rel, kind=kind)})  # type: ignore[arg-type]
        with pytest.raises(StageOutputError, match=message):
            result.checked(tmp_path)
    fine = StageResult(artifacts={"g0": StageArtifact(path="./g0", kind="adapter")}).checked(tmp_path)
    assert _kinds(fine) == {"g0": ("g0", "adapter")}
    with pytest.raises(FileNotFoundError):
        StageResult(artifacts={"x": StageArtifact(path="gone.txt", kind="file")}).checked(tmp_path)


# -- Workspace --------------------------------------------------------------------------------------
def test_workspace_done_is_every_output_present(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "stage")
    assert not ws.done() and not ws.done("a.json", "b.txt")
    ws.write_json("a.json", {"x": 1})
    assert ws.done("a.json") and not ws.done("a.json", "b.txt")
    ws.write_text("sub/b.txt", "hello")  # folders are made as needed
    assert ws.done("a.json", "sub/b.txt")
    assert json.loads((tmp_path / "stage" / "a.json").read_text()) == {"x": 1}
    # Without names: the declared artifacts.
    ws.artifact("a", "a.json")
    ws.artifact("c", "c.txt", "file")
    assert not ws.done()
    ws.write_text("c.txt", "c")
    assert ws.done()
    with pytest.raises(StageOutputError, match="outside the stage workdir"):
        ws.path("../escape.txt")
    with pytest.raises(StageOutputError, match="outside the stage workdir"):
        ws.write_text("../escape.txt", "x")
    assert not (tmp_path / "escape.txt").exists()


@pytest.mark.parametrize(
    ("write", "error"),
    [
        (lambda ws: ws.write_json("out.json", {"x": float("nan")}), ValueError),  # NaN is not JSON
        (lambda ws: ws.write_json("out.json", {"x": object()}), TypeError),
        (lambda ws: ws.write_text("out.json", "fine until here \udc80"), UnicodeEncodeError),  # fails mid-write
    ],
)
def test_workspace_writes_leave_nothing_half_written(tmp_path: Path, write: Any, error: type[Exception]) -> None:
    ws = Workspace(tmp_path)
    with pytest.raises(error):
        write(ws)
    assert os.listdir(tmp_path) == [] and not ws.done("out.json")  # no file, no temporary left behind
    ws.write_json("out.json", {"version": 1})
    with pytest.raises(error):
        write(ws)
    assert os.listdir(tmp_path) == ["out.json"]
    assert json.loads((tmp_path / "out.json").read_text()) == {"version": 1}  # the old whole file stays


def test_workspace_result_joins_declared_and_listed_artifacts(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    ws.write_json("report.json", {"ok": True})
    _adapter(tmp_path / "adapters" / "g0")
    _manifest(tmp_path / "deploy.json")
    ws.artifact("report", "report.json")
    ws.artifact("g0", "adapters/g0", "adapter")
    ws.artifact("deploy", "deploy.json", "ensemble")
    (tmp_path / "extra.txt").write_text("x")
    result = ws.result({"n": 3, "artifacts": {"extra": "extra.txt", "report": "./report.json"}})
    assert result.summary == {"n": 3}
    assert _kinds(result) == {
        "extra": ("extra.txt", "file"),
        "report": ("report.json", "file"),
        "g0": ("adapters/g0", "adapter"),
        "deploy": ("deploy.json", "ensemble"),
    }
    with pytest.raises(StageOutputError, match="'report' is both"):
        ws.result({"artifacts": {"report": "extra.txt"}})
    with pytest.raises(StageOutputError, match="declared twice"):
        ws.artifact("report", "extra.txt")
    ws.artifact("missing", "missing.txt", "file")
    with pytest.raises(FileNotFoundError, match="'missing'"):
        ws.result()


# -- the runner: a stage's return is checked right after it returns ---------------------------------
class _Stopped(Exception):
    pass


def _stage_result(workdir: Path, returned: Any) -> tuple[StageResult | None, dict[str, Any] | None]:
    """JobRunner._stage_result on `returned`, with the job's failure captured instead of written."""
    from shared.jobs.runner import JobRunner

    failures: list[dict[str, Any]] = []

    class Runner(JobRunner):
        def __init__(self) -> None:  # no database: only the checks run
            pass

        def _workdir(self) -> Path:
            return workdir

        def _fail(self, error: dict[str, Any], stage: str | None = None, detail: str | None = None) -> None:
            failures.append({**error, "stage": stage, "traceback": detail})
            raise _Stopped

    try:
        return Runner()._stage_result("s", returned), None
    except _Stopped:
        return None, failures[0]


def test_the_runner_turns_a_stage_return_into_a_stage_result(tmp_path: Path) -> None:
    _adapter(tmp_path / "adapters" / "g0")
    result, failure = _stage_result(tmp_path, {"where": tmp_path, "artifacts": {"g0": Path("adapters/g0")}})
    assert failure is None and result is not None
    assert result.summary == {"where": str(tmp_path)} and _kinds(result) == {"g0": ("adapters/g0", "adapter")}
    declared = StageResult(summary={"n": 1}, artifacts={"g0": StageArtifact(path="adapters/g0", kind="adapter")})
    assert _stage_result(tmp_path, declared) == (declared, None)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        ([1, 2], "stage s returned list, not a dict"),
        ({"artifacts": ["x"]}, "stage s outputs: stage summary 'artifacts' must be a mapping"),
        ({"artifacts": {"x": "missing.txt"}}, "stage s outputs: artifact 'x' listed by the stage does not exist"),
        ({"artifacts": {"ensemble": "ensemble.json"}}, "stage s outputs: "),
        ({"artifacts": {"x": "../up.txt"}}, "stage s outputs: artifact 'x' points outside"),
        (StageResult(artifacts={"x": StageArtifact(path="a.txt", kind="adapter")}), "stage s outputs: "),
    ],
)
def test_an_invalid_stage_return_fails_the_stage_not_the_params(tmp_path: Path, returned: Any, message: str) -> None:
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "ensemble.json").write_text("{}")
    result, failure = _stage_result(tmp_path, returned)
    assert result is None and failure is not None
    assert failure["code"] == StageFailed.code and failure["message"].startswith(message)
    assert failure["stage"] == "s" and failure["traceback"] is None


# -- ingest by declared kinds -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with embedded_home(tmp_path_factory.mktemp("stage-results-home")) as path:
        yield path


def _ingest(workdir: Path, result: StageResult | dict[str, Any]) -> tuple[dict[str, str], str]:
    from shared.db.models import Job, new_id
    from shared.db.session import session_scope
    from shared.jobs.ingest import ingest_result, ingest_stage
    from shared.storage import ArtifactStore

    with session_scope() as session:
        job = Job(id=new_id("job"), type="training", status="running", owner="ingest-owner")
        session.add(job)
        session.flush()
        common: dict[str, Any] = {"job_id": job.id, "owner": "ingest-owner", "stage": "training", "workdir": workdir}
        if isinstance(result, StageResult):
            ids = ingest_result(session, ArtifactStore(), result=result, **common)
        else:
            ids = ingest_stage(session, ArtifactStore(), summary=result, **common)
        return ids, job.id


def _rows(job_id: str) -> tuple[list[Any], list[Any]]:
    from sqlalchemy import select

    from shared.db.models import Adapter, Ensemble
    from shared.db.session import session_scope

    with session_scope() as session:
        adapters = list(session.scalars(select(Adapter).where(Adapter.job_id == job_id)))
        ensembles = list(session.scalars(select(Ensemble).where(Ensemble.job_id == job_id)))
        session.expunge_all()
        return adapters, ensembles


def test_ingest_records_adapters_and_ensembles_by_declared_kind(home: Path, tmp_path: Path) -> None:
    from shared.db.models import Artifact
    from shared.db.session import session_scope

    sha = _adapter(tmp_path / "adapters" / "g0")
    manifest = _manifest(tmp_path / "deploy.json", sha=sha, name="deployed")
    (tmp_path / "notes.json").write_text(json.dumps({"members": ["g0"]}))
    result = StageResult(
        summary={},
        artifacts={
            "deploy": StageArtifact(path="deploy.json", kind="ensemble"),
            "g0": StageArtifact(path="adapters/g0", kind="adapter"),
            "notes": StageArtifact(path="notes.json", kind="file"),
        },
    )
    ids, job_id = _ingest(tmp_path, result)
    adapters, ensembles = _rows(job_id)
    assert [(a.name, a.artifact_id, a.sha256 is not None, a.info["rank"]) for a in adapters] == [
        ("g0", ids["g0"], True, 4)
    ]
    (ensemble,) = ensembles
    assert (ensemble.name, ensemble.artifact_id, ensemble.members) == (
        "deployed",
        ids["deploy"],
        {"g0": adapters[0].id},
    )
    # One fingerprint: the manifest's, as the inference service reports it; the file's sha256 stays on the artifact.
    assert ensemble.fingerprint == manifest.fingerprint
    with session_scope() as session:
        stored = session.get(Artifact, ids["deploy"])
        assert stored is not None and stored.sha256 == sha256_file(tmp_path / "deploy.json") != manifest.fingerprint
    # Ingest again (a redelivery): the same rows, updated in place.
    again, _ = _ingest(tmp_path, result)
    assert set(again) == set(ids)


def test_ingest_trusts_kinds_and_sniffs_no_names(home: Path, tmp_path: Path) -> None:
    sha = _adapter(tmp_path / "adapters" / "g0")
    _manifest(tmp_path / "ensemble.json", sha=sha)
    declared_file = StageResult(
        artifacts={
            "ensemble": StageArtifact(path="ensemble.json", kind="file"),
            "g0": StageArtifact(path="adapters/g0", kind="folder"),
        }
    )
    _, job_id = _ingest(tmp_path, declared_file)
    assert _rows(job_id) == ([], [])
    # The dict contract decides the kinds once (from_summary): the same files become an adapter and an ensemble.
    ids, job_id = _ingest(tmp_path, {"artifacts": {"ensemble": "ensemble.json", "adapter:g0": "adapters/g0"}})
    adapters, ensembles = _rows(job_id)
    assert [a.artifact_id for a in adapters] == [ids["adapter:g0"]] and len(ensembles) == 1


def test_ingest_refuses_a_manifest_whose_member_is_not_the_stored_adapter(home: Path, tmp_path: Path) -> None:
    _adapter(tmp_path / "adapters" / "g0")
    _manifest(tmp_path / "ensemble.json", sha="cd" * 32)
    with pytest.raises(StageOutputError, match="does not have the sha256 the manifest records"):
        _ingest(tmp_path, {"artifacts": {"ensemble": "ensemble.json", "adapter:g0": "adapters/g0"}})
