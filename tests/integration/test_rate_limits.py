"""The job API's rate limits and /metrics on real PostgreSQL + Redis: per-key token buckets (429 with
Retry-After in the one error shape; other keys unaffected), stricter buckets for job creation and dataset
uploads, per-IP buckets for requests without a valid key, the Redis-backed buckets shared by two API
processes (two apps here), and the Prometheus metrics (route templates, jobs created, jobs by status)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.integration.conftest import auth

pytestmark = pytest.mark.integration

SLOW = 0.001  # tokens per second: an emptied bucket stays empty for the whole test
EVAL = {"model": "tiny-llama", "tasks": ["cb", "rte"], "max_examples": 4}


def _owner(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


@contextmanager
def _app(**settings: Any) -> Iterator[TestClient]:
    """An API app (own metrics registry and rate limiter) with these ApiSettings; memory buckets unless
    rate_limit_redis_url is given."""
    from services.api.app import create_app
    from services.api.settings import ApiSettings

    settings.setdefault("rate_limit_redis_url", "memory")
    with TestClient(create_app(ApiSettings(**settings)), raise_server_exceptions=False) as client:
        yield client


def _assert_429(response: Any, kind_words: str) -> int:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"code", "message", "param"}
    assert error["code"] == "rate_limited" and kind_words in error["message"], error
    retry = response.headers["retry-after"]
    assert retry.isdigit() and int(retry) >= 1
    return int(retry)


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_per_key_limit_429_with_retry_after_other_keys_unaffected(stack_env, make_key):  # type: ignore[no-untyped-def]
    alice, bob = make_key(_owner("rl-a")), make_key(_owner("rl-b"))
    with _app(rate_limit_rate=SLOW, rate_limit_burst=3) as api:
        for _ in range(3):
            assert api.get("/v1/jobs", headers=auth(alice)).status_code == 200
        refused = api.get("/v1/jobs", headers=auth(alice))
        retry = _assert_429(refused, "for this API key")
        assert retry >= 900  # one token at 0.001/s: ~1000 s
        # Every route shares the key's general bucket; Bob's key has a bucket of its own.
        assert api.get("/v1/datasets", headers=auth(alice)).status_code == 429
        assert api.get("/v1/jobs", headers=auth(bob)).status_code == 200
        metrics = api.get("/metrics").text
        assert _metric(metrics, "chorus_api_rate_limited_total", limit="api") == 2
        assert _metric(metrics, "chorus_api_requests_total", method="GET", route="/v1/jobs", status="429") == 1


def test_job_creation_and_uploads_have_stricter_limits(stack_env, make_key):  # type: ignore[no-untyped-def]
    key, other = make_key(_owner("rl-c")), make_key(_owner("rl-c"))
    bad_job = {"type": "nonsense", "params": {}}  # refused after the limits: nothing is created or queued
    form = {"name": "Bad Name!", "text_fields": "text", "label_field": "label"}
    with _app(
        rate_limit_burst=50,
        rate_limit_create_rate=SLOW,
        rate_limit_create_burst=2,
        rate_limit_upload_rate=SLOW,
        rate_limit_upload_burst=1,
    ) as api:
        for _ in range(2):
            assert api.post("/v1/jobs", headers=auth(key), json=bad_job).status_code == 422
        _assert_429(api.post("/v1/jobs", headers=auth(key), json=bad_job), "job creation")
        # The general limit still has room: reads go on; the other key can still create.
        assert api.get("/v1/jobs", headers=auth(key)).status_code == 200
        assert api.post("/v1/jobs", headers=auth(other), json=bad_job).status_code == 422
        # Uploads have their own bucket (job creation being exhausted does not block them, and vice versa).
        upload = {"data": form, "files": {"file": ("d.jsonl", b'{"text": "a", "label": "x"}\n')}}
        assert api.post("/v1/datasets", headers=auth(key), **upload).status_code == 422
        _assert_429(api.post("/v1/datasets", headers=auth(key), **upload), "dataset upload")
        assert api.post("/v1/datasets", headers=auth(other), **upload).status_code == 422
        metrics = api.get("/metrics").text
        assert _metric(metrics, "chorus_api_rate_limited_total", limit="create") == 1
        assert _metric(metrics, "chorus_api_rate_limited_total", limit="upload") == 1
        # FastAPI reads a body before running dependencies: a broken multipart body shows which came first.
        broken = {
            "content": b"--zz\r\nnot multipart at all",
            "headers": {**auth(key), "content-type": "multipart/form-data; boundary=zz"},
        }
        assert api.post("/v1/datasets", **broken).status_code == 400  # key not cached: the body is parsed first
        from services.api.deps import Principal
        from services.api.key_cache import key_cache
        from shared.db.keys import hash_key, verify_key
        from shared.db.session import session_scope

        with session_scope() as session:
            row = verify_key(session, key)
            principal = Principal(row.id, row.owner, tuple(row.scopes))
        key_cache.put(hash_key(key), principal, 60)
        try:  # a cached key with an empty bucket is refused before its body is read
            _assert_429(api.post("/v1/datasets", **broken), "dataset upload")
            _assert_429(api.post("/v1/jobs", headers=auth(key), content=b"{not json"), "job creation")
        finally:
            key_cache.clear()


def test_requests_without_a_valid_key_are_limited_per_address(stack_env, make_key):  # type: ignore[no-untyped-def]
    from services.api.deps import Principal
    from services.api.key_cache import key_cache
    from shared.db.keys import hash_key

    key = make_key(_owner("rl-anon"))
    with _app(rate_limit_anon_rate=SLOW, rate_limit_anon_burst=3) as api:
        assert api.get("/v1/jobs").status_code == 401
        assert api.get("/v1/jobs", headers=auth("chorus_made-up-key-000000000000")).status_code == 401
        assert api.get("/v1/jobs", headers=auth("chorus_made-up-key-000000000001")).status_code == 401
        _assert_429(api.get("/v1/jobs"), "without a valid API key")
        # A made-up key from this address is now refused before any database lookup...
        _assert_429(api.get("/v1/jobs", headers=auth("chorus_made-up-key-000000000002")), "without a valid API key")
        # ...and so is a real key that is not in the auth cache (this session caches for 0 s) ...
        assert api.get("/v1/jobs", headers=auth(key)).status_code == 429
        # ...while a verified (cached) key is charged to its own bucket only.
        key_cache.put(hash_key(key), Principal("key-cached", "rl-anon", ("submit",)), 60)
        try:
            assert api.get("/v1/jobs", headers=auth(key)).status_code == 200
        finally:
            key_cache.clear()
        assert api.get("/health").status_code == 200  # infrastructure routes are not limited
        metrics = api.get("/metrics")
        assert metrics.status_code == 200
        assert _metric(metrics.text, "chorus_api_rate_limited_total", limit="anon") == 3


def test_a_request_takes_one_token_of_the_general_bucket(stack_env, make_key):  # type: ignore[no-untyped-def]
    """The stricter bucket's dependency reuses the route's authentication: a create costs one general token."""
    key = make_key(_owner("rl-once"))
    with _app(rate_limit_rate=SLOW, rate_limit_burst=4, rate_limit_create_burst=10) as api:
        codes = [api.post("/v1/jobs", headers=auth(key), json={"type": "nonsense"}).status_code for _ in range(4)]
        assert codes == [422] * 4
        _assert_429(api.post("/v1/jobs", headers=auth(key), json={"type": "nonsense"}), "for this API key")


def test_redis_buckets_are_shared_by_api_processes(stack_env, make_key):  # type: ignore[no-untyped-def]
    """Two apps = two API processes on one Redis: a key's requests to either come out of one bucket."""
    alice, bob = make_key(_owner("rl-r")), make_key(_owner("rl-r"))
    redis_url = stack_env["BROKER_URL"]
    settings = {"rate_limit_redis_url": None, "rate_limit_rate": SLOW, "rate_limit_burst": 4}  # None: BROKER_URL
    with _app(**settings) as one, _app(**settings) as two:
        assert one.app.state.rate_limiter.backend == "redis"  # type: ignore[attr-defined]
        assert one.app.state.rate_limiter.buckets.url == redis_url  # type: ignore[attr-defined]
        codes = [(one if i % 2 else two).get("/v1/jobs", headers=auth(alice)).status_code for i in range(4)]
        assert codes == [200] * 4
        _assert_429(one.get("/v1/jobs", headers=auth(alice)), "for this API key")
        _assert_429(two.get("/v1/jobs", headers=auth(alice)), "for this API key")
        assert two.get("/v1/jobs", headers=auth(bob)).status_code == 200
    import redis

    keys = redis.Redis.from_url(redis_url).keys("chorus:ratelimit:api:*")
    assert len(keys) >= 2  # one hash per key id, expiring once full again


def test_redis_token_bucket_semantics(stack_env):  # type: ignore[no-untyped-def]
    """The Lua bucket: burst, refusal with the time to the next token, refill at `rate`, peek without taking."""
    from services.rate_limit import Limit, RedisBuckets

    async def main() -> None:
        buckets = RedisBuckets(stack_env["BROKER_URL"], prefix=f"chorus:test:{uuid.uuid4().hex}:")
        limit = Limit(rate=10.0, burst=3)
        taken = [await buckets.take("k", limit) for _ in range(3)]
        assert all(d.allowed for d in taken) and taken[-1].remaining < 1
        refused = await buckets.take("k", limit)
        assert not refused.allowed and 0 < refused.retry_after <= 0.1
        peek = await buckets.take("k", limit, consume=False)
        assert not peek.allowed
        await asyncio.sleep(0.25)  # 2.5 tokens back
        assert (await buckets.take("k", limit, consume=False)).allowed
        assert [(await buckets.take("k", limit)).allowed for _ in range(3)] == [True, True, False]
        assert (await buckets.take("other", limit)).allowed
        await buckets.aclose()

    asyncio.run(main())


def test_redis_outage_falls_back_to_process_buckets():  # type: ignore[no-untyped-def]
    from services.rate_limit import Limit, RedisBuckets

    async def main() -> None:
        buckets = RedisBuckets("redis://127.0.0.1:1/0", timeout=0.2)  # nothing listens on port 1
        limit = Limit(rate=SLOW, burst=2)
        assert [(await buckets.take("k", limit)).allowed for _ in range(3)] == [True, True, False]
        await buckets.aclose()

    asyncio.run(main())


def test_metrics_routes_jobs_created_and_jobs_by_status(stack_env, make_key):  # type: ignore[no-untyped-def]
    from sqlalchemy import func, select

    from shared.db.models import Job
    from shared.db.session import session_scope

    key = make_key(_owner("metrics"))
    with _app() as api:
        job = api.post("/v1/jobs", headers=auth(key), json={"type": "evaluation", "params": EVAL})
        assert job.status_code == 201, job.text
        replay_key = {**auth(key), "Idempotency-Key": uuid.uuid4().hex}
        replayed = [
            api.post("/v1/jobs", headers=replay_key, json={"type": "evaluation", "params": EVAL}) for _ in range(2)
        ]
        assert [r.status_code for r in replayed] == [201, 200]  # a replay is not a second creation
        job_id = job.json()["id"]
        assert api.get(f"/v1/jobs/{job_id}", headers=auth(key)).status_code == 200
        assert api.get("/v1/jobs/job-missing", headers=auth(key)).status_code == 404
        assert api.get("/no/such/route").status_code == 404
        for created in (job_id, replayed[0].json()["id"]):  # leave nothing queued for the worker tests
            assert api.post(f"/v1/jobs/{created}/cancel", headers=auth(key)).status_code == 200
        text = api.get("/metrics").text
        with session_scope() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
    assert _metric(text, "chorus_api_jobs_created_total", type="evaluation") == 2
    assert _metric(text, "chorus_api_requests_total", method="GET", route="/v1/jobs/{job_id}", status="200") == 1
    assert _metric(text, "chorus_api_requests_total", method="GET", route="/v1/jobs/{job_id}", status="404") == 1
    assert _metric(text, "chorus_api_requests_total", method="GET", route="unmatched", status="404") == 1
    assert _metric(text, "chorus_api_request_seconds_count", method="POST", route="/v1/jobs") == 3
    assert job_id not in text and key not in text  # route templates only: no ids, no keys
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert _metric(text, "chorus_api_jobs", status=status) == counts.get(status, 0), status
    assert counts.get("cancelled", 0) >= 1


def test_metrics_need_an_admin_key_when_not_public(stack_env, make_key):  # type: ignore[no-untyped-def]
    submit, admin = make_key(_owner("m"), "submit"), make_key(_owner("m"), "admin")
    with _app(metrics_public=False) as api:
        assert api.get("/metrics").status_code == 401
        denied = api.get("/metrics", headers=auth(submit))
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
        ok = api.get("/metrics", headers=auth(admin))
        assert ok.status_code == 200 and "chorus_api_requests_total" in ok.text
        assert ok.headers["content-type"].startswith("text/plain")
        assert "/metrics" not in api.get("/openapi.json").json()["paths"]
