"""The /v1 API on real PostgreSQL (+ Redis as the broker it publishes to): auth on every route, one error
shape, idempotent creates, validation, pagination, uploads with caps, owner isolation, key management."""

from __future__ import annotations

import json
import re
import threading
import uuid

import pytest
from sqlalchemy import func, select

from tests.integration.conftest import auth

pytestmark = pytest.mark.integration

EVAL = {"model": "tiny-llama", "tasks": ["cb", "rte"], "max_examples": 4}


def _owner(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _rows(n: int = 20) -> list[dict]:
    words = ["good", "bad", "great", "awful", "fine", "poor", "nice", "grim", "superb", "dull"]
    return [
        {"text": f"the film was {words[i % 10]} number {i}", "label": "pos" if i % 2 == 0 else "neg"} for i in range(n)
    ]


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _upload(api, key: str, name: str, data: bytes, filename: str = "data.jsonl", **fields):  # type: ignore[no-untyped-def]
    form = {"name": name, "text_fields": "text", "label_field": "label", **fields}
    return api.post("/v1/datasets", headers=auth(key), data=form, files={"file": (filename, data)})


def _store_state() -> tuple[int, int, list[str]]:
    """(dataset rows, artifact rows, stored objects) — to prove a refused upload stored nothing."""
    from shared.db.models import Artifact, Dataset
    from shared.db.session import session_scope
    from shared.storage import ArtifactStore

    with session_scope() as session:
        datasets = session.scalar(select(func.count()).select_from(Dataset)) or 0
        artifacts = session.scalar(select(func.count()).select_from(Artifact)) or 0
    return datasets, artifacts, sorted(p.name for p in ArtifactStore().iter_objects())


def _user_tasks() -> list[str]:
    from shared.config import get_settings

    root = get_settings().user_tasks
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# -- auth -------------------------------------------------------------------------------------------
def test_every_route_needs_a_key_and_its_scope(api, make_key):  # type: ignore[no-untyped-def]
    """Enumerated from the OpenAPI schema: no key -> 401, wrong key -> 401, key without the scope -> 403."""
    schema = api.get("/openapi.json").json()
    infer_only = make_key(_owner("scope"), "infer")
    submit = make_key(_owner("scope"), "submit,infer")
    checked = []
    for path, operations in schema["paths"].items():
        url = re.sub(r"\{[^}]+\}", "x-does-not-exist", path)
        for method, op in operations.items():
            required = op["security"][0]["HTTPBearer"]
            assert required in (["submit"], ["admin"]), (method, path, required)
            no_key = api.request(method.upper(), url)
            assert no_key.status_code == 401, (method, path, no_key.text)
            assert no_key.json()["error"]["code"] == "unauthorized"
            assert no_key.headers.get("www-authenticate") == "Bearer"
            bad_key = api.request(method.upper(), url, headers=auth("chorus_not-a-real-key-000000000"))
            assert bad_key.status_code == 401, (method, path)
            lacking = infer_only if required == ["submit"] else submit
            wrong = api.request(method.upper(), url, headers=auth(lacking))
            assert wrong.status_code == 403, (method, path, wrong.text)
            assert wrong.json()["error"] == {
                "code": "forbidden",
                "message": wrong.json()["error"]["message"],
                "param": None,
            }
            checked.append(f"{method.upper()} {path}")
    assert len(checked) >= 20, checked
    assert api.get("/health").json() == {"status": "ok"}


def test_one_error_shape(api, make_key):  # type: ignore[no-untyped-def]
    key = make_key(_owner("err"))
    for response, status in [
        (api.get("/v1/nope", headers=auth(key)), 404),
        (api.put("/v1/jobs", headers=auth(key), json={}), 405),
        (api.post("/v1/jobs", headers={**auth(key), "content-type": "application/json"}, content=b"{bad json"), 422),
        (api.get("/v1/jobs?limit=0", headers=auth(key)), 422),
        (api.get("/v1/jobs/job-missing", headers=auth(key)), 404),
    ]:
        assert response.status_code == status, response.text
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "param"}, body
    assert api.get("/v1/jobs?limit=0", headers=auth(key)).json()["error"]["param"] == "limit"


# -- jobs -------------------------------------------------------------------------------------------
def test_create_validates_params_against_the_job_type(api, make_key):  # type: ignore[no-untyped-def]
    key = make_key(_owner("val"))

    def create(body: dict) -> dict:
        r = api.post("/v1/jobs", headers=auth(key), json=body)
        assert r.status_code == 422, r.text
        return r.json()["error"]

    assert create({"type": "nonsense", "params": {}})["param"] == "type"
    assert create({"type": "evaluation", "params": {**EVAL, "tasks": ["no_such_task"]}})["param"] == "params.tasks"
    assert create({"type": "evaluation", "params": {**EVAL, "max_examples": 0}})["param"] == "params.max_examples"
    err = create({"type": "evaluation", "params": {**EVAL, "model": "/etc/passwd"}})
    assert err["param"] == "params.model" and "server paths" in err["message"]
    err = create({"type": "grouping", "params": {"affinity": "/tmp/affinity.json"}})
    assert err["param"] == "params.affinity"
    assert create({"type": "pipeline", "params": {"tasks": ["cb"], "model": "tiny-llama"}})["param"] == "params.tasks"
    assert create({"type": "evaluation", "params": EVAL, "extra": 1})["param"] == "extra"
    ok = api.post("/v1/jobs", headers=auth(key), json={"type": "evaluation", "params": EVAL})
    assert ok.status_code == 201, ok.text
    job = ok.json()
    assert job["status"] == "queued" and job["object"] == "job" and job["id"].startswith("job-")
    # Every knob is recorded, defaults filled in (a job is reproducible from its params).
    assert job["params"]["seed"] == 0 and job["params"]["split"] == "test" and job["params"]["batch_size"] == 16


def test_idempotency_key(api, make_key):  # type: ignore[no-untyped-def]
    owner = _owner("idem")
    key = make_key(owner)
    body = {"type": "evaluation", "params": EVAL, "metadata": {"run": "1"}}
    headers = {**auth(key), "Idempotency-Key": "abc-123"}
    first = api.post("/v1/jobs", headers=headers, json=body)
    again = api.post("/v1/jobs", headers=headers, json=body)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    other = api.post("/v1/jobs", headers=headers, json={**body, "metadata": {"run": "2"}})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    assert other.json()["error"]["param"] == "Idempotency-Key"
    # Keys are per owner: another owner may use the same key string.
    stranger = api.post("/v1/jobs", headers={**auth(make_key(_owner("idem"))), "Idempotency-Key": "abc-123"}, json=body)
    assert stranger.status_code == 201 and stranger.json()["id"] != first.json()["id"]
    # Concurrent retries of one request create one job.
    results: list[str] = []
    race_headers = {**auth(key), "Idempotency-Key": f"race-{uuid.uuid4().hex}"}

    def post() -> None:
        results.append(api.post("/v1/jobs", headers=race_headers, json=body).json()["id"])

    threads = [threading.Thread(target=post) for _ in range(6)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(results) == 6 and len(set(results)) == 1
    listed = api.get("/v1/jobs?limit=100", headers=auth(key)).json()["data"]
    assert len(listed) == 2


def test_list_pagination_filters_and_cancel_queued(api, make_key):  # type: ignore[no-untyped-def]
    key = make_key(_owner("page"))
    ids = [
        api.post("/v1/jobs", headers=auth(key), json={"type": "evaluation", "params": {**EVAL, "seed": i}}).json()["id"]
        for i in range(5)
    ]
    seen, after = [], None
    while True:
        page = api.get("/v1/jobs", headers=auth(key), params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += [j["id"] for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == list(reversed(ids))  # newest first, no gaps, no repeats
    cancelled = api.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(key))
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert api.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(key)).json()["status"] == "cancelled"
    only = api.get("/v1/jobs", headers=auth(key), params={"status": "cancelled"}).json()["data"]
    assert [j["id"] for j in only] == [ids[0]]
    assert api.get("/v1/jobs", headers=auth(key), params={"type": "grouping"}).json()["data"] == []
    events = api.get(f"/v1/jobs/{ids[0]}/events", headers=auth(key)).json()
    assert [e["message"] for e in events["data"]][-1].startswith("cancelled by request")
    later = api.get(f"/v1/jobs/{ids[0]}/events", headers=auth(key), params={"after": events["last_id"]}).json()
    assert later["data"] == [] and later["has_more"] is False


# -- datasets ---------------------------------------------------------------------------------------
def test_dataset_upload_use_and_delete(api, make_key):  # type: ignore[no-untyped-def]
    owner = _owner("ds")
    key = make_key(owner)
    name = f"reviews_{uuid.uuid4().hex[:6]}"
    r = _upload(api, key, name, _jsonl(_rows()))
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["num_rows"] == 20 and ds["label_names"] == ["neg", "pos"] and ds["task_name"].startswith(name + "-")
    task = ds["task_name"]  # names are per owner; jobs name the task
    assert sum(ds["sizes"].values()) == 20
    assert api.get(f"/v1/datasets/{ds['id']}", headers=auth(key)).json()["sha256"] == ds["sha256"]
    raw = api.get(f"/v1/artifacts/{ds['artifact_id']}/content", headers=auth(key))
    assert raw.status_code == 200 and raw.content == _jsonl(_rows())
    assert _upload(api, key, name, _jsonl(_rows())).status_code == 409
    # The owner can train on it; nobody else can even see that it exists.
    mine = api.post(
        "/v1/jobs", headers=auth(key), json={"type": "evaluation", "params": {**EVAL, "tasks": [task, "cb"]}}
    )
    assert mine.status_code == 201, mine.text
    other = make_key(_owner("ds"))
    theirs = api.post("/v1/jobs", headers=auth(other), json={"type": "evaluation", "params": {**EVAL, "tasks": [task]}})
    assert theirs.status_code == 422 and theirs.json()["error"]["param"] == "params.tasks"
    assert task in theirs.json()["error"]["message"] and "unknown task" in theirs.json()["error"]["message"]
    busy = api.delete(f"/v1/datasets/{ds['id']}", headers=auth(key))  # the queued job names the task
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "dataset_in_use", busy.text
    assert api.post(f"/v1/jobs/{mine.json()['id']}/cancel", headers=auth(key)).status_code == 200
    gone = api.delete(f"/v1/datasets/{ds['id']}", headers=auth(key))
    assert gone.json() == {"id": ds["id"], "object": "dataset", "deleted": True}
    assert api.get(f"/v1/datasets/{ds['id']}", headers=auth(key)).status_code == 404
    assert task not in _user_tasks()


def test_bad_uploads_are_refused_and_store_nothing(api, make_key, monkeypatch):  # type: ignore[no-untyped-def]
    key = make_key(_owner("bad"))
    before, tasks_before = _store_state(), _user_tasks()
    bad_rows = _rows()
    bad_rows[3] = {"text": "", "label": "pos"}
    bad_rows[7] = {"label": "neg"}
    r = _upload(api, key, "badrows", _jsonl(bad_rows) + b"{not json\n")
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_dataset"
    message = r.json()["error"]["message"]
    assert "line 4" in message and "line 8" in message and "line 21" in message, message
    assert _upload(api, key, "badcsv", b'text,label\n"unclosed,pos\n', filename="d.csv").status_code == 422
    assert _upload(api, key, "badfmt", b"whatever", filename="d.bin").json()["error"]["param"] == "format"
    assert _upload(api, key, "Bad Name!", _jsonl(_rows())).json()["error"]["param"] == "name"
    assert _upload(api, key, "nolabel", _jsonl(_rows()), label_field="missing").status_code == 422
    # Over the cap: refused by Content-Length before reading, or while streaming (chunked, no length).
    monkeypatch.setenv("CHORUS_MAX_UPLOAD_BYTES", "4096")
    from shared.config import get_settings

    get_settings.cache_clear()
    try:
        big = _jsonl(_rows(400))
        huge = big * 40  # over the cap plus the multipart allowance
        declared = _upload(api, key, "toolarge", huge)
        assert declared.status_code == 413 and declared.json()["error"]["code"] == "payload_too_large"

        def chunks():  # type: ignore[no-untyped-def]
            boundary = "b0undary"
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nstreamed\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="s.jsonl"\r\n\r\n'
            ).encode()
            for _ in range(200):
                yield big

        streamed = api.post(
            "/v1/datasets",
            headers={**auth(key), "content-type": "multipart/form-data; boundary=b0undary"},
            content=chunks(),
        )
        assert streamed.status_code == 413, streamed.text
        # Over the file cap but under the body allowance: refused after parsing, still nothing kept.
        small_over = _upload(api, key, "slightlybig", _jsonl(_rows(200)))
        assert small_over.status_code == 413, small_over.text
    finally:
        monkeypatch.delenv("CHORUS_MAX_UPLOAD_BYTES")
        get_settings.cache_clear()
    assert _store_state() == before
    assert _user_tasks() == tasks_before


# -- owner isolation --------------------------------------------------------------------------------
def test_owner_isolation_datasets_jobs_artifacts(api, make_key):  # type: ignore[no-untyped-def]
    alice, bob = make_key(_owner("alice")), make_key(_owner("bob"))
    ds = _upload(api, alice, f"iso_{uuid.uuid4().hex[:6]}", _jsonl(_rows())).json()
    job = api.post("/v1/jobs", headers=auth(alice), json={"type": "evaluation", "params": EVAL}).json()
    affinity = {"tasks": ["cb", "rte", "copa"], "matrix": [[0.7, 0.6, 0.5], [0.6, 0.7, 0.5], [0.5, 0.5, 0.8]]}
    grouping = api.post(
        "/v1/jobs", headers=auth(alice), json={"type": "grouping", "params": {"affinity": affinity, "groups": 2}}
    )
    assert grouping.status_code == 201, grouping.text
    inline_art = grouping.json()["params"]["affinity"]
    assert inline_art.startswith("art-")
    for url in [
        f"/v1/datasets/{ds['id']}",
        f"/v1/jobs/{job['id']}",
        f"/v1/jobs/{job['id']}/events",
        f"/v1/jobs/{job['id']}/artifacts",
        f"/v1/artifacts/{inline_art}",
        f"/v1/artifacts/{inline_art}/content",
        f"/v1/artifacts/{ds['artifact_id']}",
    ]:
        assert api.get(url, headers=auth(alice)).status_code == 200, url
        denied = api.get(url, headers=auth(bob))
        assert denied.status_code == 404 and denied.json()["error"]["code"] == "not_found", url
    assert api.post(f"/v1/jobs/{job['id']}/cancel", headers=auth(bob)).status_code == 404
    assert api.delete(f"/v1/datasets/{ds['id']}", headers=auth(bob)).status_code == 404
    for listing in ("/v1/jobs", "/v1/datasets", "/v1/artifacts", "/v1/adapters", "/v1/ensembles"):
        assert api.get(listing, headers=auth(bob)).json()["data"] == [], listing
    # Bob cannot point his grouping job at Alice's artifact either.
    stolen = api.post("/v1/jobs", headers=auth(bob), json={"type": "grouping", "params": {"affinity": inline_art}})
    assert stolen.status_code == 422 and stolen.json()["error"]["param"] == "params.affinity"
    assert api.get(f"/v1/jobs/{job['id']}", headers=auth(alice)).json()["status"] == "queued"


def test_admin_manages_keys(api, make_key, stack_env):  # type: ignore[no-untyped-def]
    admin = make_key("root", "admin")
    created = api.post("/v1/keys", headers=auth(admin), json={"owner": "carol", "scopes": ["submit"], "name": "ci"})
    assert created.status_code == 201
    secret = created.json()["key"]
    assert secret.startswith("chorus_") and created.json()["prefix"] == secret[: len(created.json()["prefix"])]
    assert api.get("/v1/jobs", headers=auth(secret)).status_code == 200
    listed = api.get("/v1/keys", headers=auth(admin), params={"owner": "carol"}).json()["data"]
    assert [k["id"] for k in listed] == [created.json()["id"]] and all(k["key"] is None for k in listed)
    assert api.post("/v1/keys", headers=auth(admin), json={"owner": "x", "scopes": ["root"]}).status_code == 422
    assert api.delete(f"/v1/keys/{created.json()['id']}", headers=auth(admin)).json()["revoked_at"] is not None
    assert api.get("/v1/jobs", headers=auth(secret)).status_code == 401
    # The database never holds a secret.
    from shared.db.models import ApiKey
    from shared.db.session import session_scope

    with session_scope() as session:
        hashes = session.scalars(select(ApiKey.key_hash)).all()
    assert secret not in hashes and all(len(h) == 64 for h in hashes)
