"""The HTTP edge shared by the job API and the inference service, on a bare FastAPI app (no database):
the body cap (services/body_limit.py), request metrics (services/http_metrics.py), the in-process token
bucket (services/rate_limit.py), and the client's handling of 429 + Retry-After (services/client.py)."""

from __future__ import annotations

import re

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient

from services.body_limit import BodyLimitMiddleware
from services.http_errors import ApiError, install_error_handlers
from services.http_metrics import HttpMetrics, RequestMetricsMiddleware, add_metrics_route
from services.rate_limit import Limit, MemoryBuckets, retry_after_header


def _app(limit, routes=None) -> tuple[FastAPI, HttpMetrics]:  # type: ignore[no-untyped-def]
    import logging

    app = FastAPI()
    install_error_handlers(app, logging.getLogger("test"), lambda loc: ".".join(map(str, loc[1:])) or None)
    metrics = HttpMetrics("chorus_test")

    @app.post("/echo/{name}")
    async def echo(name: str, request: Request) -> dict:
        return {"name": name, "bytes": len(await request.body())}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    @app.get("/teapot")
    async def teapot() -> None:
        raise ApiError(429, "rate_limited", "slow down", headers={"Retry-After": "7"})

    add_metrics_route(app, metrics)
    app.add_middleware(BodyLimitMiddleware, limit=limit, routes=routes)  # type: ignore[arg-type]
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)  # type: ignore[arg-type]
    return app, metrics


def _sample(text: str, line_start: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


def test_body_limit_one_shape_declared_streamed_and_per_route() -> None:
    cap = {"value": 100}
    app, _ = _app(lambda: cap["value"], routes=[("POST", r"/echo/big", 1000)])
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.post("/echo/x", content=b"a" * 100).json() == {"name": "x", "bytes": 100}
        declared = client.post("/echo/x", content=b"a" * 101)
        assert declared.status_code == 413
        assert declared.json() == {
            "error": {"code": "payload_too_large", "message": "request body is over the 100-byte limit", "param": None}
        }
        streamed = client.post("/echo/x", content=iter([b"a" * 60, b"a" * 60]))  # chunked: no Content-Length
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"
        assert client.post("/echo/big", content=b"a" * 900).status_code == 200  # per-route override
        assert client.post("/echo/big", content=b"a" * 1001).status_code == 413
        cap["value"] = 1000  # a callable limit is read per request
        assert client.post("/echo/x", content=b"a" * 500).status_code == 200
    app, _ = _app(50)  # a plain int (the inference service's form)
    with TestClient(app) as client:
        assert client.post("/echo/x", content=b"a" * 51).status_code == 413


def test_request_metrics_by_route_template_and_status() -> None:
    app, _ = _app(100)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.post("/echo/alpha", content=b"{}")
        client.post("/echo/beta", content=b"{}")
        client.post("/echo/gamma", content=b"a" * 200)  # refused by the body cap (outer middleware)
        assert client.get("/boom").status_code == 500
        teapot = client.get("/teapot")
        assert teapot.status_code == 429 and teapot.headers["retry-after"] == "7"
        client.get("/nowhere/123")
        text = client.get("/metrics").text
    assert _sample(text, 'chorus_test_requests_total{method="POST",route="/echo/{name}",status="200"}') == 2
    assert _sample(text, 'chorus_test_requests_total{method="GET",route="/boom",status="500"}') == 1
    assert _sample(text, 'chorus_test_requests_total{method="GET",route="/teapot",status="429"}') == 1
    assert _sample(text, 'chorus_test_requests_total{method="GET",route="unmatched",status="404"}') == 1
    assert _sample(text, 'chorus_test_requests_total{method="POST",route="unmatched",status="413"}') == 1
    assert _sample(text, 'chorus_test_request_seconds_count{method="POST",route="/echo/{name}"}') == 2
    routes = set(re.findall(r'route="([^"]*)"', text))  # templates only, never ids from the path
    assert routes == {"/echo/{name}", "/boom", "/teapot", "unmatched"}


def test_memory_token_bucket() -> None:
    now = {"t": 0.0}
    buckets = MemoryBuckets(max_buckets=3, clock=lambda: now["t"])
    limit = Limit(rate=2.0, burst=3)
    assert [buckets.take_now("a", limit).allowed for _ in range(4)] == [True, True, True, False]
    refused = buckets.take_now("a", limit)
    assert refused.retry_after == pytest.approx(0.5) and retry_after_header(refused.retry_after) == "1"
    assert buckets.take_now("b", limit).allowed  # other buckets are unaffected
    now["t"] = 0.5  # one token back
    assert buckets.take_now("a", limit, consume=False).allowed  # a peek sees it...
    assert buckets.take_now("a", limit).allowed  # ...and does not take it
    assert not buckets.take_now("a", limit).allowed
    now["t"] = 100.0  # refills to the burst, not beyond
    assert [buckets.take_now("a", limit).allowed for _ in range(4)] == [True, True, True, False]
    for name in ("c", "d", "e"):  # at most max_buckets: the least recently used is dropped (comes back full)
        buckets.take_now(name, limit)
    assert "a" not in buckets._buckets and buckets.take_now("a", limit).allowed
    assert retry_after_header(0.0) == "1" and retry_after_header(12.01) == "13"
    assert Limit(0.5, 20).describe() == "30/min, burst 20" and Limit(20, 100).describe() == "20/s, burst 100"


def test_client_retries_rate_limited_requests() -> None:
    from services.client import ChorusError, Client

    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if request.url.path == "/v1/jobs/job-1" and calls["n"] < 3:
            return httpx.Response(
                429,
                headers={"Retry-After": "0"},
                json={"error": {"code": "rate_limited", "message": "slow down", "param": None}},
            )
        if request.url.path == "/v1/jobs/job-2":
            return httpx.Response(
                429,
                headers={"Retry-After": "120"},
                json={"error": {"code": "rate_limited", "message": "slow down", "param": None}},
            )
        if request.url.path == "/v1/jobs":
            return httpx.Response(429, json={"error": {"code": "quota_exceeded", "message": "too many", "param": None}})
        return httpx.Response(200, json={"id": "job-1", "status": "queued"})

    with Client("http://api", "k", transport=httpx.MockTransport(handler)) as client:
        assert client.get_job("job-1")["id"] == "job-1" and calls["n"] == 3  # two waits of 0 s, then 200
        calls["n"] = 0
        with pytest.raises(ChorusError) as too_long:  # the server asks for longer than max_retry_wait
            client.get_job("job-2")
        assert calls["n"] == 1 and too_long.value.retry_after == 120 and too_long.value.code == "rate_limited"
        calls["n"] = 0
        with pytest.raises(ChorusError) as quota:  # a 429 without Retry-After (a quota) is not retried
            client.create_job("evaluation")
        assert calls["n"] == 1 and quota.value.retry_after is None
