"""Adding a job type is adding one file: a module that defines JOB_TYPE (its params model and stage function)
is discovered, listed by /v1/job-types, validated at submit and run by the real runner on the embedded stack."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.bad_input_apps import auth, embedded_home, job_api, make_keys

ECHO = '''
"""The `echo` job type (a test plug-in): write the text, repeated, to echo.txt."""

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from shared.jobs.job_type import JobType


class EchoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, description="what to write")
    repeat: int = Field(default=1, ge=1, le=10, description="how many times")


def run(params: EchoParams, workdir: Path, progress: Any) -> dict[str, Any]:
    (workdir / "echo.txt").write_text(params.text * params.repeat)
    progress("echo", 1, 1, "written")
    return {"length": len(params.text) * params.repeat, "artifacts": {"echo": "echo.txt"}}


JOB_TYPE = JobType("echo", "Write the text, repeated (a test plug-in).", "toyjobs.echo:EchoParams", "toyjobs.echo:run")
'''


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with embedded_home(tmp_path_factory.mktemp("plugin-home")) as path:
        yield path


@pytest.fixture
def echo_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The one file, in a package of its own on sys.path, registered like a deployment's plug-in would be."""
    from shared.jobs import registry

    package = tmp_path / "toyjobs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "echo.py").write_text(textwrap.dedent(ECHO))
    monkeypatch.syspath_prepend(str(tmp_path))
    for job_type in registry.discover("toyjobs").values():
        registry.register(job_type)
    yield
    registry.JOB_TYPES.pop("echo", None)
    sys.modules.pop("toyjobs.echo", None)
    sys.modules.pop("toyjobs", None)


def test_the_built_in_job_types_are_one_module_each() -> None:
    from shared.jobs.registry import JOB_TYPES, discover

    modules = sorted(p.stem for p in (Path(__file__).parent.parent / "shared/jobs/types").glob("*.py"))
    assert sorted(JOB_TYPES) == sorted(m for m in modules if m != "__init__")
    assert discover() == JOB_TYPES


def test_a_job_type_added_in_one_file_is_listed_validated_and_run(home, echo_type) -> None:  # type: ignore[no-untyped-def]
    from shared.jobs.registry import JobType, register
    from shared.jobs.runner import run_job

    with pytest.raises(ValueError, match="already registered"):
        register(JobType("echo", "again", "toyjobs.echo:EchoParams", "toyjobs.echo:run"))
    key = make_keys("plugin")["submit"]
    with TestClient(job_api(rate_limit_enabled=False), raise_server_exceptions=False) as api:
        listed = {t["name"]: t for t in api.get("/v1/job-types", headers=auth(key)).json()["data"]}
        assert listed["echo"]["description"] == "Write the text, repeated (a test plug-in)."
        bad = api.post("/v1/jobs", headers=auth(key), json={"type": "echo", "params": {"text": "ab", "repeat": 0}})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "params.repeat", bad.text
        r = api.post("/v1/jobs", headers=auth(key), json={"type": "echo", "params": {"text": "ab", "repeat": 3}})
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        assert run_job(job_id)["outcome"] == "succeeded"
        job = api.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
        assert job["status"] == "succeeded" and job["result"]["stages"]["echo"]["length"] == 6, job["result"]
        echo = job["result_artifacts"]["echo"]
        assert api.get(f"/v1/artifacts/{echo}/content", headers=auth(key)).text == "ababab"
