"""The FastAPI application factory: `services.api.app:create_app()` (uvicorn --factory)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Security

from services.api.deps import authenticate, strict_query
from services.api.docs import install_docs
from services.api.errors import install_error_handlers
from services.api.metrics import ApiMetrics
from services.api.outage import install_outage_handling
from services.api.params_schema import document_job_params
from services.api.rate_limits import EarlyRefusalMiddleware, build_rate_limiter
from services.api.routers import artifacts, datasets, jobs, keys
from services.api.settings import ApiSettings, get_api_settings
from services.body_limit import BodyLimitMiddleware
from services.http_errors import error_responses
from services.http_metrics import RequestMetricsMiddleware, add_metrics_route
from services.request_guard import NulGuardMiddleware, document_nul_guard
from shared.config import get_settings
from shared.db.session import migrate
from shared.jobs.config import get_service_settings
from shared.jobs.registry import JOB_TYPES

log = logging.getLogger("chorus.api")
API_VERSION = "0.1.0"
_ERRORS = error_responses(400, 401, 403, 404, 405, 409, 413, 422, 429, 500, 501, 503)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if get_service_settings().migrate_on_start:
        migrate()
    yield
    limiter = app.state.rate_limiter
    if limiter is not None and hasattr(limiter.buckets, "aclose"):
        await limiter.buckets.aclose()


def create_app(api_settings: ApiSettings | None = None) -> FastAPI:
    """`api_settings`: rate limits and /metrics access (default: from CHORUS_* environment variables)."""
    svc = get_service_settings()
    edge = api_settings or get_api_settings()
    docs = svc.api_docs
    app = FastAPI(
        title="chorus job API",
        version=API_VERSION,
        lifespan=lifespan,
        description="Datasets, jobs (affinity, grouping, training, pipeline, ...), artifacts, adapters and "
        "ensembles. Every /v1 route needs `Authorization: Bearer <API key>`; errors are "
        '`{"error": {"code", "message", "param"}}`. Requests are rate-limited per key (job creation '
        "and dataset uploads more strictly): 429 `rate_limited` with `Retry-After`.\n\n"
        "Strict input: a job's params are validated against its job type's model when it is "
        "submitted (an unknown option, model or task is a 422 whose `param` is the full path, e.g. "
        "`params.training.epochs`); an unknown query parameter is a 422 naming it; a list's `after` "
        "must be the `last_id` of the previous page. GET /v1/job-types returns every params schema, "
        "with defaults and descriptions; they are also in this document's schemas.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
        dependencies=[Depends(strict_query)],
    )
    install_error_handlers(app)
    metrics = ApiMetrics()
    app.state.metrics = metrics
    app.state.api_settings = edge
    app.state.rate_limiter = build_rate_limiter(
        edge, get_settings().broker_url, lambda kind: metrics.rate_limited.labels(kind).inc()
    )
    for router in (datasets.router, jobs.router, artifacts.router, keys.router):
        app.include_router(router, prefix="/v1", responses=_ERRORS)

    install_outage_handling(app)  # database down: 503 + Retry-After; /health

    # /metrics: no key when CHORUS_METRICS_PUBLIC (default, as the inference service), else an admin key.
    add_metrics_route(app, metrics, [] if edge.metrics_public else [Security(authenticate, scopes=["admin"])])
    app.add_middleware(
        BodyLimitMiddleware,
        limit=lambda: get_service_settings().max_json_bytes,
        routes=[("POST", r"/v1/datasets/?", lambda: get_settings().max_upload_bytes + 64 * 1024)],
    )
    app.add_middleware(EarlyRefusalMiddleware, limiter=app.state.rate_limiter)
    app.add_middleware(NulGuardMiddleware)
    document_nul_guard(app)
    if docs:
        document_job_params(app, JOB_TYPES)
        install_docs(app)  # /docs and /redoc, with their assets served here (no CDN)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)  # outermost: sees 413s
    return app
