"""The job API is strict and describes itself: params are validated at submit with errors naming their full
path, unknown cursors and query parameters are refused, every job type's params (nested stage sections
included) are published with defaults and descriptions in /v1/job-types and OpenAPI, the main endpoints
carry examples that the API accepts, and /docs works without a CDN.

The real app (create_app) on a temporary SQLite CHORUS_HOME; accepted jobs go to the embedded broker,
which nothing consumes."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from tests.bad_input_apps import auth, isolated_home, job_api, make_keys, store_state

TASKS = ["cb", "rte", "copa"]
AFFINITY = {
    "tasks": ["cb", "rte", "copa", "wic"],
    "matrix": [[0.9, 0.8, 0.1, 0.2], [0.8, 0.9, 0.2, 0.1], [0.1, 0.2, 0.9, 0.8], [0.2, 0.1, 0.8, 0.9]],
}
GROUPING = {"affinity": AFFINITY, "groups": 2, "method": "sdp"}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with isolated_home(tmp_path_factory.mktemp("strict-home")):
        app = job_api(rate_limit_enabled=False)
        keys = make_keys("strict")
        with TestClient(app, raise_server_exceptions=False) as client:
            yield {"app": app, "client": client, "keys": keys}


def _submit(env: dict[str, Any], type_: str, params: dict[str, Any], key: str = "submit") -> Any:
    return env["client"].post("/v1/jobs", headers=auth(env["keys"][key]), json={"type": type_, "params": params})


def _error(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    return response.json()["error"]  # type: ignore[no-any-return]


# -- validation at submit ----------------------------------------------------------------------------
def test_an_unknown_model_is_refused_at_submit_and_nothing_is_stored(env: dict[str, Any]) -> None:
    before = store_state()
    err = _error(_submit(env, "training", {"model": "gpt-17", "groups": [["cb"], ["rte"]]}))
    assert err["param"] == "params.model" and "unknown model 'gpt-17'" in err["message"]
    err = _error(_submit(env, "pipeline", {"tasks": TASKS, "training": {"model": "/etc"}}))
    assert err["param"] == "params.training.model"
    assert store_state() == before


@pytest.mark.parametrize(
    ("job_type", "params", "param", "words"),
    [
        ("pipeline", {"training": {"epoch": 3}}, "params.training.epoch", "did you mean 'epochs'"),
        ("pipeline", {"training": {"epochs": 0}}, "params.training.epochs", "greater than or equal to 1"),
        ("pipeline", {"training": {"boosting": {"eta": 0}}}, "params.training.boosting.eta", "greater than 0"),
        ("pipeline", {"training": {"groups": [["cb"]]}}, "params.training.groups", "set by the grouping stage"),
        ("pipeline", {"affinity": {"dim": 0}}, "params.affinity.dim", "greater than or equal to 1"),
        ("pipeline", {"affinity": {"dimm": 64}}, "params.affinity.dimm", "did you mean 'dim'"),
        ("pipeline", {"grouping": {"method": "kmeans"}}, "params.grouping.method", "'auto', 'sdp' or 'spectral'"),
        (
            "pipeline",
            {"affinity": {"precision": "bf16"}, "quantization": "nf4"},
            "params.affinity.precision",
            "needs quantization 'none'",
        ),
        ("pipeline", {"epochs": 3}, "params.epochs", "params.training.epochs"),
        ("pipeline", {"groups": 5}, "params.groups", "more than the 3 tasks"),
        ("affinity", {"subset_size": 5}, "params.subset_size", "more than the 3 tasks"),
        ("study", {"training": {"epoch": 3}}, "params.training.epoch", "did you mean 'epochs'"),
        ("study", {"affinity": {"lam": -1}}, "params.affinity.lam", "greater than 0"),
        ("validate_affinity", {"training": {"epochs": 0}}, "params.training.epochs", "greater than or equal to 1"),
        ("validate_affinity", {"training": {"epoch": 3}}, "params.training.epoch", "did you mean 'epochs'"),
    ],
)
def test_nested_errors_keep_their_full_path(
    env: dict[str, Any], job_type: str, params: dict[str, Any], param: str, words: str
) -> None:
    err = _error(_submit(env, job_type, {"tasks": TASKS, **params}))
    assert err["code"] == "invalid_params"
    assert err["param"] == param and err["message"].startswith(f"{param}: ") and words in err["message"], err


def test_a_shared_field_error_stays_at_the_top_level(env: dict[str, Any]) -> None:
    err = _error(_submit(env, "pipeline", {"tasks": ["cb"], "training": {"epochs": 2}}))
    assert err["param"] == "params.tasks"


def test_valid_sections_are_accepted_and_stored_as_given(env: dict[str, Any]) -> None:
    r = _submit(
        env,
        "pipeline",
        {
            "tasks": TASKS,
            "model": "tiny-llama",
            "affinity": {"dim": 64},
            "grouping": {"method": "sdp"},
            "training": {"epochs": 2, "boosting": {"eta": 0.5}},
        },
    )
    assert r.status_code == 201, r.text
    params = r.json()["params"]
    assert params["affinity"] == {"dim": 64} and params["training"] == {"epochs": 2, "boosting": {"eta": 0.5}}


# -- cursors and query parameters --------------------------------------------------------------------
LISTS = [
    ("/v1/jobs", "job", "submit"),
    ("/v1/datasets", "ds", "submit"),
    ("/v1/artifacts", "art", "submit"),
    ("/v1/adapters", "ad", "submit"),
    ("/v1/ensembles", "ens", "submit"),
    ("/v1/keys", "key", "admin"),
]


@pytest.mark.parametrize(("path", "prefix", "scope"), LISTS)
def test_an_unknown_cursor_is_refused_naming_after(env: dict[str, Any], path: str, prefix: str, scope: str) -> None:
    headers = auth(env["keys"][scope])
    unknown = f"{prefix}-{'0' * 24}"  # well-formed, but no such object
    err = _error(env["client"].get(path, params={"after": unknown}, headers=headers))
    assert err["param"] == "after" and unknown in err["message"]
    assert _error(env["client"].get(path, params={"after": f"{prefix}-bogus"}, headers=headers))["param"] == "after"


def test_cursors_page_through_a_list_and_another_owners_id_is_unknown(env: dict[str, Any]) -> None:
    ids = [_submit(env, "grouping", GROUPING, "other").json()["id"] for _ in range(3)]
    headers = auth(env["keys"]["other"])
    first = env["client"].get("/v1/jobs", params={"limit": 2, "type": "grouping"}, headers=headers).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"]
    rest = (
        env["client"]
        .get("/v1/jobs", params={"limit": 2, "type": "grouping", "after": first["last_id"]}, headers=headers)
        .json()
    )
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    # the same id is not a cursor for another owner (nor does the answer tell that it exists)
    err = _error(env["client"].get("/v1/jobs", params={"after": ids[0]}, headers=auth(env["keys"]["submit"])))
    assert err["param"] == "after"


def _operations(env: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, path with placeholder ids) of every documented operation and every undocumented route."""
    spec = env["client"].get("/openapi.json").json()
    ops = [(method.upper(), path) for path, item in spec["paths"].items() for method in item]
    ops += [
        (m, r.path)
        for r in env["app"].routes
        if isinstance(r, APIRoute) and not r.include_in_schema
        for m in sorted(r.methods - {"HEAD"})
    ]
    return [(m, re.sub(r"\{[^}]+\}", "x-1", path)) for m, path in ops]


def test_unknown_query_parameters_are_refused_on_every_route(env: dict[str, Any]) -> None:
    """Every route of the app: `?bogus=1` is a 422 naming `bogus` (after the API key is checked)."""
    operations = _operations(env)
    assert len(operations) > 25 and ("GET", "/health") in operations
    admin = auth(env["keys"]["admin"])
    before = store_state()
    for method, path in operations:
        r = env["client"].request(method, path, params={"bogus": "1"}, headers=admin, json={})
        assert r.status_code == 422, (method, path, r.text)
        assert r.json()["error"]["param"] == "bogus", (method, path, r.text)
    assert store_state() == before
    # known parameters still work; without a valid key the answer is 401 whatever the query
    assert env["client"].get("/v1/jobs", params={"limit": 1}, headers=admin).status_code == 200
    assert env["client"].get("/v1/jobs", params={"bogus": "1"}).status_code == 401
    assert env["client"].get("/v1/jobs", params={"bogus": "1"}, headers=auth("chorus_nope")).status_code == 401


# -- self-describing schemas -------------------------------------------------------------------------
def _undescribed(schema: dict[str, Any], defs: dict[str, Any], path: str = "") -> list[str]:
    """Properties (at any depth, following refs to definitions) without a description."""
    out: list[str] = []
    for name, prop in (schema.get("properties") or {}).items():
        ref = (prop.get("$ref") or "").rsplit("/", 1)[-1]
        target = defs.get(ref, {}) if ref else prop
        if not (prop.get("description") or target.get("description")):
            out.append(f"{path}{name}")
        out += _undescribed(target, defs, f"{path}{name}.")
    return out


# EvalParams lives in shared/ml/eval_params.py, outside the params modules described so far.
DESCRIBED_TYPES = (
    "affinity",
    "grouping",
    "approximation_error",
    "validate_estimates",
    "validate_affinity",
    "training",
    "pipeline",
    "study",
)


def test_job_types_show_every_knob_with_its_default_and_description(env: dict[str, Any]) -> None:
    r = env["client"].get("/v1/job-types", headers=auth(env["keys"]["submit"]))
    types = {t["name"]: t for t in r.json()["data"]}
    pipeline = types["pipeline"]["params_schema"]
    training = pipeline["properties"]["training"]
    assert training["additionalProperties"] is False and "groups" not in training["properties"]
    epochs = training["properties"]["epochs"]
    assert epochs["default"] == 3 and epochs["minimum"] == 1 and epochs["description"]
    assert training["properties"]["boosting"]["$ref"] == "#/$defs/BoostingOptions"
    assert pipeline["$defs"]["BoostingOptions"]["properties"]["eta"]["default"] == 1.0
    # shared knobs take the job's value: no stage default is shown for them
    max_train = training["properties"]["max_train"]
    assert "default" not in max_train and "top-level `max_train`" in max_train["description"]
    affinity = pipeline["properties"]["affinity"]["properties"]
    assert affinity["dim"]["default"] == 400 and affinity["init"]["enum"] == ["base", "meta"]
    assert "training.rank" in affinity["rank"]["description"] and affinity["rank"]["default"] == 4
    assert "affinity" not in pipeline["properties"]["grouping"]["properties"]
    assert "seeds" in types["study"]["params_schema"]["properties"]["training"]["properties"]["seed"]["description"]
    for name in DESCRIBED_TYPES:
        schema = types[name]["params_schema"]
        assert not _undescribed(schema, schema.get("$defs", {})), (name, _undescribed(schema, schema.get("$defs", {})))


def test_openapi_publishes_the_params_models_descriptions_and_examples(env: dict[str, Any]) -> None:
    from services.api.routers.jobs import JOB_EXAMPLES

    spec = env["client"].get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    params = schemas["JobCreate"]["properties"]["params"]
    refs = {a.get("$ref", "").rsplit("/", 1)[-1] for a in params["anyOf"]}
    assert {"PipelineParams", "TrainingParams", "StudyParams", "GroupingParams"} <= refs
    assert {"type": "object", "additionalProperties": True} in params["anyOf"]  # the job type picks the model
    boosting = schemas["PipelineParams"]["properties"]["training"]["properties"]["boosting"]
    assert boosting["$ref"] == "#/components/schemas/BoostingOptions" and "BoostingOptions" in schemas
    ours = [
        n
        for n in schemas
        if n.endswith("Out")
        or n.startswith("ListResponse")
        or n in ("JobCreate", "KeyCreate", "Deleted", *(f"{c}Params" for c in ("Pipeline", "Training", "Study")))
    ]
    for name in ours:
        assert not _undescribed(schemas[name], schemas), (name, _undescribed(schemas[name], schemas))
    for name in ("JobOut", "JobCreate", "DatasetOut", "ArtifactOut"):
        assert schemas[name].get("examples"), name
    examples = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == set(JOB_EXAMPLES)
    for name, example in examples.items():  # the documented requests are accepted as they are
        r = env["client"].post("/v1/jobs", headers=auth(env["keys"]["submit"]), json=example["value"])
        assert r.status_code == 201, (name, r.text)
    for example in schemas["JobCreate"]["examples"]:
        assert env["client"].post("/v1/jobs", headers=auth(env["keys"]["submit"]), json=example).status_code == 201


def test_the_docs_pages_load_their_assets_from_the_api_itself(env: dict[str, Any]) -> None:
    client = env["client"]
    for page, kinds in (("/docs", {"js", "css", "png"}), ("/redoc", {"js", "png"})):
        html = client.get(page).text
        urls = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert not [u for u in urls if "//" in u], (page, urls)  # nothing from another host
        assert {u.rsplit(".", 1)[-1] for u in urls} >= kinds, (page, urls)
        for url in urls:
            asset = client.get(url)
            assert asset.status_code == 200 and len(asset.content) > 1000, url
    bundle = client.get("/docs-assets/swagger-ui-bundle.js")
    assert "javascript" in bundle.headers["content-type"] and b"SwaggerUIBundle" in bundle.content
    assert "/openapi.json" in client.get("/docs").text
