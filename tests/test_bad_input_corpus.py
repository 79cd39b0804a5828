"""A corpus of bad requests against the real job API (SQLite CHORUS_HOME) and the real inference service
(tiny-llama): every one is answered 4xx in the one error shape, naming the parameter where one is at
fault, stores nothing, and leaves the service answering good requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.bad_input_apps import ENSEMBLE, auth, inference_app, isolated_home, job_api, make_keys, store_state

INT64_MAX = 2**63 - 1
EVAL = {"model": "tiny-llama", "tasks": ["cb", "rte"], "max_examples": 4}
BAD_MODELS = [
    "tmp",
    "/etc",
    "/tmp/../etc/passwd",
    "../models/x",
    "~/models/x",
    "tiny-llama-seed8",
    "tiny-llama-seed" + "9" * 30,
    "tiny-llama-seed01",
    "tiny-llama-seed-1",
    "smollm2-135m\x00",
    "",
    "SmolLM2-135M",
    "tiny-llama ",
    "HuggingFaceTB/SmolLM2-135M-Instruct",
]


@dataclass
class Bad:
    """One bad request: `key` names the scope whose key is sent (None: no Authorization header)."""

    id: str
    method: str
    path: str
    key: str | None = "submit"
    json: Any = None
    content: bytes | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    status: int | None = None  # the exact status expected, when one is
    param: str | None = None  # the `param` the error must name, when one is

    def send(self, client: Any, keys: dict[str, str], job_id: str = "") -> httpx.Response:
        headers = {**(auth(keys[self.key]) if self.key else {}), **self.headers}
        kwargs: dict[str, Any] = {"headers": headers, "params": self.params}
        if self.json is not None:
            kwargs["json"] = self.json
        if self.content is not None:
            kwargs["content"] = self.content
            headers.setdefault("Content-Type", "application/json")
        return client.request(self.method, self.path.replace("{job}", job_id), **kwargs)


def _job(params: dict[str, Any], type: str = "evaluation", **body: Any) -> dict[str, Any]:
    return {"type": type, "params": params, **body}


JOB_CASES = [
    # cursors and query parameters
    Bad(
        "events-after-int64+1",
        "GET",
        "/v1/jobs/{job}/events",
        params={"after": INT64_MAX + 1},
        status=422,
        param="after",
    ),
    Bad("events-after-2^70", "GET", "/v1/jobs/{job}/events", params={"after": 2**70}, status=422, param="after"),
    Bad("events-after-negative", "GET", "/v1/jobs/{job}/events", params={"after": -1}, status=422, param="after"),
    Bad("events-after-text", "GET", "/v1/jobs/{job}/events", params={"after": "abc"}, status=422, param="after"),
    Bad("events-after-float", "GET", "/v1/jobs/{job}/events", params={"after": "1.5"}, status=422, param="after"),
    Bad("events-after-nul", "GET", "/v1/jobs/{job}/events", params={"after": "\x00"}, status=400, param="after"),
    Bad("events-limit-0", "GET", "/v1/jobs/{job}/events", params={"limit": 0}, status=422, param="limit"),
    Bad("events-limit-huge", "GET", "/v1/jobs/{job}/events", params={"limit": 10**30}, status=422, param="limit"),
    Bad("jobs-limit-huge", "GET", "/v1/jobs", params={"limit": 10**30}, status=422, param="limit"),
    Bad("jobs-status", "GET", "/v1/jobs", params={"status": "bogus"}, status=422, param="status"),
    Bad("jobs-after-nul", "GET", "/v1/jobs", params={"after": "job-\x00"}, status=400, param="after"),
    Bad("jobs-type-nul", "GET", "/v1/jobs", params={"type": "\x00"}, status=400, param="type"),
    Bad("artifacts-after-nul", "GET", "/v1/artifacts", params={"after": "\x00"}, status=400, param="after"),
    Bad("artifact-format", "GET", "/v1/artifacts/art-x/content", params={"format": "rar"}, status=422, param="format"),
    Bad("job-id-nul", "GET", "/v1/jobs/%00", status=400, param="path"),
    Bad("job-id-unknown", "GET", "/v1/jobs/job-unknown", status=404, param="id"),
    Bad("job-id-huge", "GET", "/v1/jobs/" + "j" * 5000, status=404),
    Bad("cancel-unknown", "POST", "/v1/jobs/job-unknown/cancel", status=404),
    Bad("options-jobs", "OPTIONS", "/v1/jobs", status=405),
    # idempotency keys (the empty one twice: the second used to hit the unique index)
    Bad(
        "idem-empty",
        "POST",
        "/v1/jobs",
        json=_job(EVAL),
        headers={"Idempotency-Key": ""},
        status=422,
        param="Idempotency-Key",
    ),
    Bad(
        "idem-empty-again",
        "POST",
        "/v1/jobs",
        json=_job(EVAL),
        headers={"Idempotency-Key": ""},
        status=422,
        param="Idempotency-Key",
    ),
    Bad(
        "idem-spaces",
        "POST",
        "/v1/jobs",
        json=_job(EVAL),
        headers={"Idempotency-Key": "   "},
        status=422,
        param="Idempotency-Key",
    ),
    Bad(
        "idem-long",
        "POST",
        "/v1/jobs",
        json=_job(EVAL),
        headers={"Idempotency-Key": "k" * 256},
        status=422,
        param="Idempotency-Key",
    ),
    Bad(
        "idem-latin1",
        "POST",
        "/v1/jobs",
        json=_job(EVAL),
        headers={"Idempotency-Key": b"caf\xe9"},
        status=422,
        param="Idempotency-Key",
    ),
    Bad(
        "idem-tab",
        "POST",
        "/v1/jobs",
        json=_job(EVAL),
        headers={"Idempotency-Key": "a\tb"},
        status=422,
        param="Idempotency-Key",
    ),
    # job bodies and params
    *(
        Bad(f"model-{i}", "POST", "/v1/jobs", json=_job({**EVAL, "model": m}), status=422, param="params.model")
        for i, m in enumerate(BAD_MODELS)
    ),
    Bad("model-number", "POST", "/v1/jobs", json=_job({**EVAL, "model": 123}), status=422, param="params.model"),
    Bad(
        "pipeline-training-model",
        "POST",
        "/v1/jobs",
        status=422,
        param="params.training.model",
        json=_job({"model": "tiny-llama", "tasks": ["cb", "rte"], "training": {"model": "tmp"}}, "pipeline"),
    ),
    Bad(
        "pipeline-affinity-model",
        "POST",
        "/v1/jobs",
        status=422,
        param="params.affinity.model",
        json=_job({"model": "tiny-llama", "tasks": ["cb", "rte"], "affinity": {"model": "/srv/m"}}, "pipeline"),
    ),
    Bad(
        "affinity-model",
        "POST",
        "/v1/jobs",
        status=422,
        param="params.model",
        json=_job({"model": "tiny-llama-seed123456", "tasks": ["cb", "rte"]}, "affinity"),
    ),
    Bad("training-empty", "POST", "/v1/jobs", json=_job({}, "training"), status=422, param="params.groups"),
    Bad(
        "training-groups-null",
        "POST",
        "/v1/jobs",
        json=_job({"groups": None}, "training"),
        status=422,
        param="params.groups",
    ),
    Bad(
        "training-groups-path",
        "POST",
        "/v1/jobs",
        json=_job({"groups": "/etc/passwd"}, "training"),
        status=422,
        param="params.groups",
    ),
    Bad(
        "training-groups-empty-group",
        "POST",
        "/v1/jobs",
        json=_job({"groups": [[]]}, "training"),
        status=422,
        param="params.groups",
    ),
    Bad(
        "grouping-affinity-path",
        "POST",
        "/v1/jobs",
        json=_job({"affinity": "/tmp/affinity.json"}, "grouping"),
        status=422,
        param="params.affinity",
    ),
    Bad(
        "affinity-seed-huge",
        "POST",
        "/v1/jobs",
        json=_job({"tasks": ["cb", "rte"], "seed": 2**70}, "affinity"),
        status=422,
        param="params.seed",
    ),
    Bad("eval-no-tasks", "POST", "/v1/jobs", json=_job({**EVAL, "tasks": []}), status=422, param="params.tasks"),
    Bad(
        "eval-unknown-task",
        "POST",
        "/v1/jobs",
        json=_job({**EVAL, "tasks": ["nope\x00"]}),
        status=422,
        param="params.tasks",
    ),
    Bad(
        "eval-max-examples-0",
        "POST",
        "/v1/jobs",
        json=_job({**EVAL, "max_examples": 0}),
        status=422,
        param="params.max_examples",
    ),
    Bad("type-unknown", "POST", "/v1/jobs", json=_job(EVAL, "nonsense"), status=422, param="type"),
    Bad("type-nul", "POST", "/v1/jobs", json=_job(EVAL, "evaluation\x00"), status=422, param="type"),
    Bad("params-list", "POST", "/v1/jobs", json={"type": "evaluation", "params": []}, status=422, param="params"),
    Bad("body-list", "POST", "/v1/jobs", json=[], status=422),
    Bad("body-not-json", "POST", "/v1/jobs", content=b"{not json", status=422),
    Bad("body-empty", "POST", "/v1/jobs", content=b"", status=422),
    Bad("body-nan", "POST", "/v1/jobs", content=b'{"type": "evaluation", "params": {"max_examples": NaN}}', status=422),
    Bad("body-huge", "POST", "/v1/jobs", content=b'{"x": "' + b"a" * (1 << 20) + b'"}', status=413),
    Bad(
        "metadata-17",
        "POST",
        "/v1/jobs",
        json=_job(EVAL, metadata={str(i): "v" for i in range(17)}),
        status=422,
        param="metadata",
    ),
    Bad("metadata-number", "POST", "/v1/jobs", json=_job(EVAL, metadata={"a": 1}), status=422, param="metadata.a"),
    Bad("extra-field", "POST", "/v1/jobs", json=_job(EVAL, extra=1), status=422, param="extra"),
    # API keys and their owners
    Bad(
        "key-owner-nul",
        "POST",
        "/v1/keys",
        "admin",
        json={"owner": "a\x00b", "scopes": ["submit"]},
        status=422,
        param="owner",
    ),
    Bad(
        "key-owner-newline",
        "POST",
        "/v1/keys",
        "admin",
        json={"owner": "a\nb", "scopes": ["submit"]},
        status=422,
        param="owner",
    ),
    Bad(
        "key-owner-empty",
        "POST",
        "/v1/keys",
        "admin",
        json={"owner": "", "scopes": ["submit"]},
        status=422,
        param="owner",
    ),
    Bad(
        "key-owner-long",
        "POST",
        "/v1/keys",
        "admin",
        json={"owner": "o" * 201, "scopes": ["submit"]},
        status=422,
        param="owner",
    ),
    Bad(
        "key-name-nul",
        "POST",
        "/v1/keys",
        "admin",
        json={"owner": "x", "scopes": ["submit"], "name": "\x00"},
        status=422,
        param="name",
    ),
    Bad("key-scopes-empty", "POST", "/v1/keys", "admin", json={"owner": "x", "scopes": []}, status=422, param="scopes"),
    Bad(
        "key-scopes-unknown",
        "POST",
        "/v1/keys",
        "admin",
        json={"owner": "x", "scopes": ["root"]},
        status=422,
        param="scopes.0",
    ),
    Bad(
        "key-extra",
        "POST",
        "/v1/keys",
        "admin",
        json={"owner": "x", "scopes": ["submit"], "secret": "s"},
        status=422,
        param="secret",
    ),
    Bad("keys-owner-nul", "GET", "/v1/keys", "admin", params={"owner": "\x00"}, status=400, param="owner"),
    Bad("key-revoke-nul", "DELETE", "/v1/keys/%00", "admin", status=400, param="path"),
    # authentication and scopes
    Bad("no-key", "GET", "/v1/jobs", None, status=401),
    Bad("bad-key", "GET", "/v1/jobs", None, headers={"Authorization": "Bearer chorus_nope"}, status=401),
    Bad("basic-auth", "GET", "/v1/jobs", None, headers={"Authorization": "Basic YTpi"}, status=401),
    Bad("key-nul", "GET", "/v1/jobs", None, headers={"Authorization": "Bearer chorus_\x00"}, status=400),
    Bad("infer-key-on-jobs", "GET", "/v1/jobs", "infer", status=403),
    Bad("submit-key-on-keys", "POST", "/v1/keys", "submit", json={"owner": "x", "scopes": ["admin"]}, status=403),
]

CLASSIFY = f"/v1/ensembles/{ENSEMBLE}/classify"


def _rows(*rows: dict[str, Any]) -> dict[str, Any]:
    return {"rows": list(rows)}


INFERENCE_CASES = [
    # classify bodies
    Bad("no-rows", "POST", CLASSIFY, "infer", json={}, status=422, param="rows"),
    Bad("rows-empty", "POST", CLASSIFY, "infer", json=_rows(), status=422, param="rows"),
    Bad("rows-not-list", "POST", CLASSIFY, "infer", json={"rows": "x"}, status=422, param="rows"),
    Bad(
        "text-empty",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "sst2", "text": ""}),
        status=422,
        param="rows[0].text",
    ),
    Bad(
        "text-spaces",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "sst2", "text": "   "}),
        status=422,
        param="rows[0].text",
    ),
    Bad(
        "text-whitespace",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "sst2", "text": "\n\t\u00a0\u2003"}),
        status=422,
        param="rows[0].text",
    ),
    Bad(
        "text-second-row",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "sst2", "text": "fine"}, {"task": "sst2", "text": " "}),
        status=422,
        param="rows[1].text",
    ),
    Bad(
        "field-empty",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "sst2", "fields": {"sentence": ""}}),
        status=422,
        param="rows[0].fields.sentence",
    ),
    Bad(
        "field-spaces",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "rte", "fields": {"premise": "a cat", "hypothesis": "  \n"}}),
        status=422,
        param="rows[0].fields.hypothesis",
    ),
    Bad(
        "field-object",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "sst2", "fields": {"sentence": {"a": 1}}}),
        status=422,
        param="rows[0].fields.sentence",
    ),
    Bad(
        "field-missing",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "rte", "fields": {"premise": "a cat"}}),
        status=422,
        param="rows[0].fields.hypothesis",
    ),
    Bad(
        "text-and-fields",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "sst2", "text": "a", "fields": {"sentence": "a"}}),
        status=422,
        param="rows[0]",
    ),
    Bad("neither", "POST", CLASSIFY, "infer", json=_rows({"task": "sst2"}), status=422, param="rows[0].fields"),
    Bad(
        "task-empty", "POST", CLASSIFY, "infer", json=_rows({"task": "", "text": "a"}), status=422, param="rows[0].task"
    ),
    Bad(
        "task-unknown",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "nope", "text": "a"}),
        status=422,
        param="rows[0].task",
    ),
    Bad(
        "text-multi-field-task",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "rte", "text": "a"}),
        status=422,
        param="rows[0].text",
    ),
    Bad(
        "text-number",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "sst2", "text": 5}),
        status=422,
        param="rows[0].text",
    ),
    Bad(
        "row-extra",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "sst2", "text": "a", "label": "x"}),
        status=422,
        param="rows[0].label",
    ),
    Bad(
        "too-many-rows",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows(*[{"task": "sst2", "text": "a"}] * 17),
        status=422,
        param="rows",
    ),
    Bad(
        "text-too-long",
        "POST",
        CLASSIFY,
        "infer",
        json=_rows({"task": "sst2", "text": "a" * 2001}),
        status=422,
        param="rows[0].fields.sentence",
    ),
    Bad("body-not-json", "POST", CLASSIFY, "infer", content=b"rows", status=422),
    Bad("body-huge", "POST", CLASSIFY, "infer", content=b'{"rows": "' + b"a" * 70_000 + b'"}', status=413),
    # paths, methods, keys
    Bad(
        "ensemble-unknown",
        "POST",
        "/v1/ensembles/nope/classify",
        "infer",
        json=_rows({"task": "sst2", "text": "a"}),
        status=404,
    ),
    Bad("ensemble-nul", "GET", "/v1/ensembles/%00", "infer", status=400, param="path"),
    Bad("options-classify", "OPTIONS", CLASSIFY, "infer", status=405),
    Bad("no-key", "POST", CLASSIFY, None, json=_rows({"task": "sst2", "text": "a"}), status=401),
    Bad("bad-key", "GET", "/v1/ensembles", None, headers={"Authorization": "Bearer chorus_nope"}, status=401),
    Bad("submit-key", "POST", CLASSIFY, "submit", json=_rows({"task": "sst2", "text": "a"}), status=403),
    Bad("load-infer-key", "POST", f"/v1/ensembles/{ENSEMBLE}/load", "infer", status=403),
    Bad("load-traversal", "POST", "/v1/ensembles/..%2F..%2Fetc/load", "admin"),
    Bad(
        "load-owner-nul",
        "POST",
        f"/v1/ensembles/{ENSEMBLE}/load",
        "admin",
        json={"owner": "a\x00"},
        status=422,
        param="owner",
    ),
    Bad(
        "load-extra", "POST", f"/v1/ensembles/{ENSEMBLE}/load", "admin", json={"path": "/etc"}, status=422, param="path"
    ),
]


def _check_error(response: httpx.Response, case: Bad) -> None:
    assert 400 <= response.status_code < 500, (case.id, response.status_code, response.text)
    if case.status is not None:
        assert response.status_code == case.status, (case.id, response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "param"}, (case.id, body)
    error = body["error"]
    assert isinstance(error["code"], str) and error["code"] and isinstance(error["message"], str), (case.id, body)
    if case.param is not None:
        assert error["param"] == case.param, (case.id, body)
    assert "/tmp/" not in error["message"] and "/work/" not in error["message"], (case.id, body)
    if response.status_code == 405:
        assert response.headers["allow"], case.id


# -- job API ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jobs_env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with isolated_home(tmp_path_factory.mktemp("corpus-home")):
        keys = make_keys("corpus")
        with TestClient(job_api(rate_limit_enabled=False), raise_server_exceptions=False) as client:
            created = client.post("/v1/jobs", headers=auth(keys["submit"]), json=_job(EVAL))
            assert created.status_code == 201, created.text
            yield client, keys, created.json()["id"]


@pytest.mark.parametrize("case", JOB_CASES, ids=[c.id for c in JOB_CASES])
def test_job_api_refuses_bad_input(jobs_env, case: Bad) -> None:  # type: ignore[no-untyped-def]
    client, keys, job_id = jobs_env
    before = store_state()
    _check_error(case.send(client, keys, job_id), case)
    assert store_state() == before, case.id
    ok = client.get(f"/v1/jobs/{job_id}/events", headers=auth(keys["submit"]))  # still answering
    assert ok.status_code == 200 and ok.json()["data"], ok.text


def test_allow_lists_every_method_of_the_path(jobs_env) -> None:  # type: ignore[no-untyped-def]
    client, keys, job_id = jobs_env
    assert client.options("/v1/jobs", headers=auth(keys["submit"])).headers["allow"] == "GET, POST"
    assert client.put("/v1/keys/key-x", headers=auth(keys["admin"])).headers["allow"] == "DELETE"
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(keys["submit"])).headers["allow"] == "GET"


# -- inference service -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inference_env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with isolated_home(tmp_path_factory.mktemp("corpus-inference-home")):
        keys = make_keys("corpus")
        app = inference_app(tmp_path_factory.mktemp("corpus-ensembles"))
        with TestClient(app, raise_server_exceptions=False) as client:
            loaded = client.post(
                f"/v1/ensembles/{ENSEMBLE}/load", headers=auth(keys["admin"]), json={"owner": "corpus-infer"}
            )
            assert loaded.status_code == 200, loaded.text
            yield client, keys, app.state.service


def _served(service: Any) -> dict[str, Any]:
    return {i: (e.fingerprint, service.owners.get(i)) for i, e in service.ensembles.items()}


@pytest.mark.parametrize("case", INFERENCE_CASES, ids=[c.id for c in INFERENCE_CASES])
def test_inference_refuses_bad_input(inference_env, case: Bad) -> None:  # type: ignore[no-untyped-def]
    client, keys, service = inference_env
    before = (store_state(), _served(service))
    _check_error(case.send(client, keys), case)
    assert (store_state(), _served(service)) == before, case.id
    good = _rows(
        {"task": "sst2", "text": "a fine film"}, {"task": "rte", "fields": {"premise": "a", "hypothesis": "b"}}
    )
    ok = client.post(CLASSIFY, headers=auth(keys["infer"]), json=good)
    assert ok.status_code == 200 and len(ok.json()["results"]) == 2, ok.text
