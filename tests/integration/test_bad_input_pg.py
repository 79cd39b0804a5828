"""Bad input that PostgreSQL itself would refuse (out-of-range integers, NUL bytes in text, an empty unique
key twice) is answered 4xx in the one error shape before it reaches the database, and stores nothing."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from tests.integration.conftest import auth

pytestmark = pytest.mark.integration

EVAL = {"model": "tiny-llama", "tasks": ["cb", "rte"], "max_examples": 4}


def _counts() -> tuple[int, int, int]:
    from shared.db.models import ApiKey, Job, JobEvent
    from shared.db.session import session_scope

    with session_scope() as session:
        counts = [session.scalar(select(func.count()).select_from(m)) or 0 for m in (ApiKey, Job, JobEvent)]
    return counts[0], counts[1], counts[2]


def _error(response, status: int, param: str | None) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "param"}
    assert body["error"]["param"] == param, body


def test_postgres_never_sees_values_it_would_refuse(api, make_key):  # type: ignore[no-untyped-def]
    owner = f"pg-{uuid.uuid4().hex[:6]}"
    key, admin = make_key(owner), make_key(f"{owner}-admin", "admin")
    job = api.post("/v1/jobs", headers=auth(key), json={"type": "evaluation", "params": EVAL})
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    before = _counts()
    for after in (2**63, 2**70, -1):
        _error(api.get(f"/v1/jobs/{job_id}/events", headers=auth(key), params={"after": after}), 422, "after")
    assert api.get(f"/v1/jobs/{job_id}/events", headers=auth(key), params={"after": 2**63 - 1}).status_code == 200
    for _ in range(2):  # the second one used to reach the unique index (owner, idempotency_key)
        _error(
            api.post(
                "/v1/jobs", headers={**auth(key), "Idempotency-Key": ""}, json={"type": "evaluation", "params": EVAL}
            ),
            422,
            "Idempotency-Key",
        )
    _error(api.post("/v1/keys", headers=auth(admin), json={"owner": "a\x00b", "scopes": ["submit"]}), 422, "owner")
    _error(
        api.post("/v1/keys", headers=auth(admin), json={"owner": "x", "scopes": ["submit"], "name": "\x00"}),
        422,
        "name",
    )
    _error(api.get("/v1/keys", headers=auth(admin), params={"owner": "\x00"}), 400, "owner")
    _error(api.get("/v1/jobs", headers=auth(key), params={"after": "job-\x00"}), 400, "after")
    _error(api.get("/v1/jobs/%00", headers=auth(key)), 400, "path")
    _error(
        api.post("/v1/jobs", headers=auth(key), json={"type": "evaluation", "params": {**EVAL, "model": "x\x00"}}),
        422,
        "params.model",
    )
    assert _counts() == before
    # NUL inside JSON values is stored as JSON (PostgreSQL json keeps the \u0000 escape), never a 5xx.
    stored = api.post(
        "/v1/jobs", headers=auth(key), json={"type": "evaluation", "params": EVAL, "metadata": {"note": "a\x00b"}}
    )
    assert stored.status_code in (201, 422), stored.text
    if stored.status_code == 201:
        assert api.get(f"/v1/jobs/{stored.json()['id']}", headers=auth(key)).json()["metadata"] == {"note": "a\x00b"}
