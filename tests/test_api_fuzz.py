"""Property-based fuzzing of both HTTP services with schemathesis, in-process (ASGI): schemathesis' own
engine (what `schemathesis run` does: explicit examples, coverage of boundary and invalid values and of
undocumented methods, random generation) with a valid key of each scope (admin, submit, infer). No answer
may be a 5xx, and every answer must conform to the app's OpenAPI schema (documented status code, content
type, headers and body, `Allow` on 405, invalid data refused, valid data accepted).

The job API runs on a temporary SQLite CHORUS_HOME; the jobs it accepts go to the embedded broker, which
nothing consumes (no model work starts). The inference service runs tiny-llama on the CPU. How many
requests were made is printed at the end of the module."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import events

from tests.bad_input_apps import ENSEMBLE, SCOPES, auth, inference_app, isolated_home, job_api, make_keys

# (phases, max examples per operation) by service and scope: everything for the scopes each service is
# for; random generation only for the others, whose requests mostly end at 403 (keeps the module ~1.5 min).
FULL = (["examples", "coverage", "fuzzing"], 8)
PLAN = {
    "job API": {"admin": FULL, "submit": (["examples", "fuzzing"], 5), "infer": (["fuzzing"], 3)},
    "inference": {"admin": FULL, "infer": FULL, "submit": (["fuzzing"], 3)},
}
SEEN: Counter[str] = Counter()
# Operations validated beyond what their schema can say: a job's `params` against the job type's own model
# (GET /v1/job-types publishes those schemas), an upload's file as a dataset, a classify row against the
# tasks and templates of the ensemble, a list's `after` cursor against the ids the caller can see. Schema-valid
# requests may rightly be refused there, so only the "valid data is accepted" check is left out for them.
LISTS = ("jobs", "datasets", "artifacts", "adapters", "ensembles", "keys")
SEMANTIC = {
    "POST /v1/jobs",
    "POST /v1/datasets",
    "POST /v1/ensembles/{ensemble_id}/classify",
    *(f"GET /v1/{name}" for name in LISTS),
}


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    yield
    line = f"schemathesis: {sum(SEEN.values())} requests ({', '.join(f'{k}: {v}' for k, v in sorted(SEEN.items()))})"
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write("\n")
            reporter.write_line(line)


def _problems(app: Any, key: str, service: str, scope: str) -> list[str]:
    """Run schemathesis against `app` with `key` (of `scope`); the failed checks and errors it reports."""
    phases, max_examples = PLAN[service][scope]
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    schema.config.update(headers=auth(key))
    schema.config.generation.update(max_examples=max_examples, deterministic=True)
    schema.config.phases.update(phases=phases)
    problems: list[str] = []
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            SEEN[service] += len(event.recorder.interactions)
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    if check.failure_info is None:
                        continue
                    if check.name == "positive_data_acceptance" and event.label in SEMANTIC:
                        continue
                    interaction = event.recorder.interactions.get(case_id)
                    response = interaction.response if interaction else None
                    problems.append(
                        f"{event.label} [{check.name}] {check.failure_info.failure.title}: "
                        f"{check.failure_info.failure.message[:300]}\n  {check.failure_info.code_sample}"
                        + (
                            f"\n  -> {response.status_code} {response.content[:300]!r}"
                            if response is not None and response.content
                            else ""
                        )
                    )
        elif isinstance(event, (events.NonFatalError, events.FatalError)):
            problems.append(f"{type(event).__name__}: {getattr(event, 'info', event)}")
    return sorted(set(problems))


@pytest.fixture(scope="module")
def job_env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with isolated_home(tmp_path_factory.mktemp("fuzz-home")):
        yield job_api(rate_limit_enabled=False), make_keys("fuzz")


@pytest.mark.parametrize("scope", SCOPES)
def test_job_api_fuzz(job_env, scope: str) -> None:  # type: ignore[no-untyped-def]
    app, keys = job_env
    problems = _problems(app, keys[scope], "job API", scope)
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def inference_env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    with isolated_home(tmp_path_factory.mktemp("fuzz-inference-home")):
        keys = make_keys("fuzz")
        app = inference_app(tmp_path_factory.mktemp("fuzz-ensembles"), docs=True)
        with TestClient(app) as client:  # runs the app's lifespan for the whole module
            loaded = client.post(
                f"/v1/ensembles/{ENSEMBLE}/load", headers=auth(keys["admin"]), json={"owner": "fuzz-infer"}
            )
            assert loaded.status_code == 200, loaded.text
            yield app, keys


@pytest.mark.parametrize("scope", SCOPES)
def test_inference_fuzz(inference_env, scope: str) -> None:  # type: ignore[no-untyped-def]
    app, keys = inference_env
    problems = _problems(app, keys[scope], "inference", scope)
    assert not problems, "\n".join(problems)
