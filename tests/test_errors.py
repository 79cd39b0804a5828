"""The error hierarchy (shared/errors.py): each family's job error code and HTTP status through the one mapping
(`classify`), the domain errors' families, the job statuses, and real jobs on the embedded stack (SQLite job
database, the API in-process, the runner in-process): a stage that fails for a reason that is not the user's
ends `stage_failed`, the user's own mistakes stay `invalid_params` / `bad_input`.

The `errors_test` job type registered here for a few tests runs ML-core code that fails as it would in a real
stage: merging gradient shards that are missing, or one of which a killed pass left truncated."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ConfigDict

from shared.errors import BadInput, ChorusError, Infrastructure, InvalidParams, StageFailed, classify
from tests.bad_input_apps import auth, embedded_home, job_api, make_keys

FAMILIES = {
    InvalidParams: ("invalid_params", 422),
    BadInput: ("bad_input", 422),
    StageFailed: ("stage_failed", 500),
    Infrastructure: ("infrastructure", 503),
}
TASKS4 = ["cb", "rte", "copa", "wic"]
MATRIX = [[0.9, 0.8, 0.1, 0.2], [0.8, 0.9, 0.2, 0.1], [0.1, 0.2, 0.9, 0.8], [0.2, 0.1, 0.8, 0.9]]


# -- the mapping ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES), ids=lambda f: f.__name__)
def test_each_family_maps_to_its_job_code_and_http_status(family: type[ChorusError]) -> None:
    code, status = FAMILIES[family]
    exc = family("boom", param="params.x")
    for in_stage in (False, True):
        assert classify(exc, in_stage=in_stage) is family
    assert (family.code, family.http_status) == (code, status) and exc.param == "params.x"
    assert isinstance(exc, ValueError) == (family in (InvalidParams, BadInput))  # old `except ValueError` still work


def test_exceptions_outside_the_hierarchy() -> None:
    from pydantic import ValidationError

    class Strict(BaseModel):
        n: int

    with pytest.raises(ValidationError) as info:
        Strict.model_validate({"n": "x"})
    # Validating a request: a ValueError (pydantic's too) is the params' fault.
    assert classify(ValueError("bad")) is InvalidParams and classify(info.value) is InvalidParams
    # Inside a running stage the params were validated already: nothing but a ChorusError is the user's.
    for exc in (ValueError("bad"), info.value, RuntimeError("x"), KeyError("k"), OSError("disk")):
        assert classify(exc, in_stage=True) is StageFailed, exc
    assert classify(RuntimeError("x")) is StageFailed


def test_domain_errors_belong_to_their_family() -> None:
    from services.inference.sources import IntegrityError, InvalidEnsemble
    from shared.jobs.ingest import StageOutputError
    from shared.ml.model_names import ModelNameError
    from shared.ml.serving.ensemble_runner import EnsembleLoadError, RowError
    from shared.ml.serving.export import ExportError
    from shared.ml.serving.multi_lora import AdapterFormatError, AdapterShapeError
    from shared.ml.tasks.import_errors import DatasetValidationError, TaskExistsError
    from shared.ml.tasks.import_errors import RowError as DatasetRow
    from shared.ml.tasks.templates import TemplateError
    from shared.ml.tasks.user_import import UserTaskError
    from shared.ml.training.adapters import AdapterFormatError as AdapterFileFormat
    from shared.ml.training.adapters import AdapterIntegrityError, AdapterMismatchError

    rows = [DatasetRow(None, None, "a message")]
    expected: list[tuple[BaseException, type[ChorusError]]] = [
        (ModelNameError("m"), InvalidParams),
        (DatasetValidationError(rows), BadInput),
        (TaskExistsError(rows), BadInput),
        (UserTaskError("u"), BadInput),
        (TemplateError("t", 1, "{{"), BadInput),
        (AdapterIntegrityError("a"), BadInput),
        (AdapterFileFormat("a"), BadInput),
        (AdapterMismatchError("a"), BadInput),
        (AdapterFormatError("a"), BadInput),
        (AdapterShapeError("a"), BadInput),
        (ExportError("e"), BadInput),
        (RowError(0, "rows[0]", "r"), BadInput),
        (EnsembleLoadError("base_mismatch", "e"), BadInput),
        (InvalidEnsemble("i"), BadInput),
        (IntegrityError("i", "members[0]"), BadInput),
        (StageOutputError("s"), StageFailed),
    ]
    for exc, family in expected:
        assert classify(exc, in_stage=True) is family, exc
        assert isinstance(exc, ValueError), exc  # every one of them still is one
    # Their messages and attributes are what they were.
    assert str(TemplateError("t", 1, "{{")) == "template line 1 ('{{'): t"
    assert IntegrityError("i", "members[0]").param == "members[0]" and RowError(3, "rows[3]", "r").param == "rows[3]"


def test_the_ml_core_raises_stage_failed_for_missing_gradients(tmp_path: Path) -> None:
    from shared.ml.affinity.store import merge_gradients

    with pytest.raises(StageFailed, match="gradients of split 'train' are incomplete: 4 rows missing"):
        merge_gradients(tmp_path, "train", 4, 2)


def _raising_app(exc: BaseException) -> FastAPI:
    from services.api.errors import install_error_handlers

    app = FastAPI()
    install_error_handlers(app)

    @app.get("/raise")
    def _raise() -> None:
        raise exc

    return app


@pytest.mark.parametrize("family", list(FAMILIES), ids=lambda f: f.__name__)
def test_each_family_answers_its_http_status_and_code(family: type[ChorusError]) -> None:
    code, status = FAMILIES[family]
    with TestClient(_raising_app(family("the message", param="params.x")), raise_server_exceptions=False) as client:
        r = client.get("/raise")
    assert r.status_code == status and r.json() == {
        "error": {"code": code, "message": "the message", "param": "params.x"}
    }, r.text


def test_a_domain_error_no_route_caught_is_not_a_500() -> None:
    from shared.ml.tasks.templates import TemplateError

    with TestClient(_raising_app(TemplateError("refused", 2, "{%")), raise_server_exceptions=False) as client:
        r = client.get("/raise")
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_input", r.text


# -- job statuses --------------------------------------------------------------------------------------
def test_job_status_is_a_str_enum_of_the_database_values() -> None:
    from services.api.schemas import JobStatus as ApiJobStatus
    from shared.db.models import JOB_STATUSES, STAGE_STATUSES, TERMINAL_STATUSES, JobStatus, StageStatus
    from shared.jobs import state

    assert state.JobStatus is JobStatus and state.StageStatus is StageStatus
    assert JOB_STATUSES == ("queued", "running", "succeeded", "failed", "cancelled") == tuple(JobStatus)
    assert get_args(ApiJobStatus) == JOB_STATUSES and set(TERMINAL_STATUSES) < set(JOB_STATUSES)
    assert STAGE_STATUSES == ("pending", "running", "succeeded", "failed", "cancelled") == tuple(StageStatus)
    # The CHECK constraint and JSON hold plain strings.
    assert all(type(s) is str for s in (*JOB_STATUSES, *TERMINAL_STATUSES, *STAGE_STATUSES))
    assert JobStatus.FAILED == "failed" and json.dumps({"status": JobStatus.FAILED}) == '{"status": "failed"}'


# -- real jobs -----------------------------------------------------------------------------------------
class ErrorsTestParams(BaseModel):
    """Params of the `errors_test` job type: which gradient shards the stage finds when it merges them."""

    model_config = ConfigDict(extra="forbid")

    shards: Literal["missing", "truncated"]


def merge_shards_stage(params: ErrorsTestParams, workdir: Path, progress: Any) -> dict[str, Any]:
    """Merge the gradient shards of split "train" (4 rows, d=2) as the affinity stage does, after a pass that
    wrote none ("missing") or whose g.npy was cut short when it was killed ("truncated")."""
    from shared.files import atomic_save_npy
    from shared.ml.affinity.store import batches_dir, merge_gradients

    if params.shards == "truncated":
        folder = batches_dir(workdir, "train", 4, 0, 1)
        atomic_save_npy(folder / "rows.npy", np.arange(4, dtype=np.int64))
        atomic_save_npy(folder / "done.npy", np.ones(4, dtype=bool))
        atomic_save_npy(folder / "f0.npy", np.zeros(4, dtype=np.float32))
        atomic_save_npy(folder / "g.npy", np.ones((4, 2), dtype=np.float32))
        with (folder / "g.npy").open("r+b") as fh:
            fh.truncate((folder / "g.npy").stat().st_size - 8)
    merge_gradients(workdir, "train", 4, 2)
    return {}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with embedded_home(tmp_path_factory.mktemp("errors-home")) as path:
        yield path


@pytest.fixture(scope="module")
def api(home: Path) -> Iterator[TestClient]:
    with TestClient(job_api(rate_limit_enabled=False), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def key(home: Path) -> str:
    return make_keys("errors")["submit"]


@pytest.fixture
def errors_test_type(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.jobs.registry import JOB_TYPES, JobType

    monkeypatch.setitem(
        JOB_TYPES,
        "errors_test",
        JobType(
            "errors_test",
            "Merge gradient shards (tests).",
            "tests.test_errors:ErrorsTestParams",
            "tests.test_errors:merge_shards_stage",
        ),
    )


def _submit(api: TestClient, key: str, type_: str, params: dict[str, Any]) -> dict[str, Any]:
    r = api.post("/v1/jobs", headers=auth(key), json={"type": type_, "params": params})
    assert r.status_code == 201, r.text
    return r.json()


def _run_to_failure(api: TestClient, key: str, job_id: str) -> dict[str, Any]:
    from shared.jobs.runner import run_job

    assert run_job(job_id)["outcome"] == "failed"
    r = api.get(f"/v1/jobs/{job_id}", headers=auth(key))
    assert r.status_code == 200 and r.json()["status"] == "failed", r.text
    return r.json()


def _events(api: TestClient, key: str, job_id: str) -> list[dict[str, Any]]:
    return api.get(f"/v1/jobs/{job_id}/events", headers=auth(key), params={"limit": 1000}).json()["data"]


def test_a_plain_value_error_mid_stage_is_stage_failed(api, key, errors_test_type) -> None:  # type: ignore[no-untyped-def]
    job = _submit(api, key, "errors_test", {"shards": "truncated"})
    failed = _run_to_failure(api, key, job["id"])
    error = failed["error"]
    assert error["code"] == "stage_failed" and error["param"] is None, error
    assert error["message"].startswith("stage errors_test: ValueError: Failed to read all data"), error
    assert failed["stages"][0]["status"] == "failed"
    last = _events(api, key, job["id"])[-1]
    assert last["level"] == "error" and "traceback" in last["data"]  # ours: the traceback is kept for operators


def test_missing_gradients_are_stage_failed(api, key, errors_test_type) -> None:  # type: ignore[no-untyped-def]
    job = _submit(api, key, "errors_test", {"shards": "missing"})
    error = _run_to_failure(api, key, job["id"])["error"]
    assert error["code"] == "stage_failed", error
    assert error["message"] == "stage errors_test: gradients of split 'train' are incomplete: 4 rows missing (first 0)"


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_stored_input_is_stage_failed_not_the_users(api, key, damage) -> None:  # type: ignore[no-untyped-def]
    from shared.db.models import Artifact
    from shared.db.session import session_scope
    from shared.storage import ArtifactStore

    shift = {"truncated": 0.01, "deleted": 0.02}[damage]
    matrix = [[round(v + shift, 2) for v in row] for row in MATRIX]  # content of its own in the store
    job = _submit(api, key, "grouping", {"affinity": {"tasks": TASKS4, "matrix": matrix}, "groups": 2})
    ref = job["params"]["affinity"]
    with session_scope() as session:
        stored = ArtifactStore().resolve(session.get(Artifact, ref).path)
    if damage == "truncated":  # cut short in the store after it was recorded
        stored.chmod(0o644)
        stored.write_bytes(stored.read_bytes()[:-20])
    else:
        stored.unlink()
    error = _run_to_failure(api, key, job["id"])["error"]
    assert error["code"] == "stage_failed", error
    assert (
        error["message"]
        == {
            "truncated": f"params.affinity: artifact {ref!r} is corrupt in the artifact store: its sha256 is not the "
            "recorded one",
            "deleted": f"params.affinity: artifact {ref!r} is missing from the artifact store (FileNotFoundError)",
        }[damage]
    )


def test_bad_params_are_refused_at_submit_as_invalid_params(api, key) -> None:  # type: ignore[no-untyped-def]
    bad = [
        ("grouping", {"affinity": {"tasks": TASKS4, "matrix": MATRIX}, "groups": 2, "colour": "red"}, "params.colour"),
        ("grouping", {"affinity": {"tasks": TASKS4, "matrix": MATRIX}, "groups": 0}, "params.groups"),
        ("evaluation", {"model": "/etc", "tasks": ["cb"]}, "params.model"),  # ModelNameError
    ]
    for type_, params, param in bad:
        r = api.post("/v1/jobs", headers=auth(key), json={"type": type_, "params": params})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "invalid_params" and r.json()["error"]["param"] == param, r.text


def test_an_inline_affinity_that_does_not_fit_the_params_is_invalid_params(api, key) -> None:  # type: ignore[no-untyped-def]
    params = {"affinity": {"tasks": TASKS4, "matrix": MATRIX}, "groups": 2, "tasks": ["cb", "rte", "copa", "boolq"]}
    job = _submit(api, key, "grouping", params)
    failed = _run_to_failure(api, key, job["id"])
    error = failed["error"]
    assert error["code"] == "invalid_params" and error["param"] == "params.affinity", error
    assert error["message"].startswith("params.affinity: affinity file tasks ['cb', 'rte', 'copa', 'wic'] differ")
    assert failed["stages"][0]["status"] == "failed"


def test_a_named_affinity_artifact_that_is_malformed_is_bad_input(api, key) -> None:  # type: ignore[no-untyped-def]
    from shared.db.session import session_scope
    from shared.storage import ArtifactStore, record_artifact

    data = json.dumps({"tasks": TASKS4, "matrix": [[1.0, 2.0]]}).encode()
    with session_scope() as session:
        art = record_artifact(session, ArtifactStore().put_bytes(data), owner="errors-submit", name="affinity.json")
        ref = art.id
    job = _submit(api, key, "grouping", {"affinity": ref, "groups": 2})
    error = _run_to_failure(api, key, job["id"])["error"]
    assert error["code"] == "bad_input" and error["param"] == "params.affinity", error
    assert error["message"] == (
        f"params.affinity: affinity file {ref!r}: 'matrix' must be a 4 x 4 list of lists (one row per task)"
    )
