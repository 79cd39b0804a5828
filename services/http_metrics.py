"""Prometheus metrics shared by every chorus HTTP service: per-app registry, request counter and latency
histogram by route template, the ASGI middleware that fills them, and the `/metrics` route.

Labels are bounded: `route` is the matched route's template (`/v1/jobs/{job_id}`), never the raw path
(requests that match no route are counted as `unmatched`), and no label carries an id, owner or key.

/metrics access is the same in every service: open when the service's `metrics_public` setting is true
(the default; Prometheus scrapes without a secret, so keep the port on a private network or block
/metrics at the proxy), otherwise an admin API key is required.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, params
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UNMATCHED = "unmatched"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes


class HttpMetrics:
    """`<prefix>_requests_total{method,route,status}` and `<prefix>_request_seconds{method,route}` in a
    registry of the app's own (several apps can live in one process, e.g. in tests). Subclasses add
    their metrics to `self.registry`. `blocking_render`: collectors do I/O (render in a thread)."""

    blocking_render = False

    def __init__(self, prefix: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            f"{prefix}_requests", "HTTP requests.", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            f"{prefix}_request_seconds",
            "HTTP request latency.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Pure ASGI: counts every HTTP request by method, route template and final status, and its latency.
    Add it last (outermost) so refusals by other middleware (413) are counted too; an exception that
    escapes the app is counted as 500."""

    def __init__(self, app: Any, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.observe_request(
                scope.get("method", ""), route_template(scope), status, time.perf_counter() - start
            )


def route_template(scope: dict[str, Any]) -> str:
    """The full template of the route that handled the request (`/v1/jobs/{job_id}`), or `unmatched`.
    FastAPI (0.16x, pinned) leaves the route of an included router in scope["route"] without the include
    prefix and records the full template in its effective route context; plain routes carry it directly."""
    context = (scope.get("fastapi") or {}).get("effective_route_context")
    template = getattr(context, "path_format", None)
    if template:
        return str(template)
    route = scope.get("route")
    return str(getattr(route, "path_format", None) or getattr(route, "path", None) or UNMATCHED)


def add_metrics_route(app: FastAPI, metrics: HttpMetrics, dependencies: Sequence[params.Depends] = ()) -> None:
    """GET /metrics (Prometheus text format), not in the OpenAPI schema. `dependencies`: e.g. an admin-key
    check when metrics are not public."""

    @app.get("/metrics", include_in_schema=False, dependencies=list(dependencies))
    async def metrics_route() -> Response:
        body = await run_in_threadpool(metrics.render) if metrics.blocking_render else metrics.render()
        return Response(body, media_type=CONTENT_TYPE)
