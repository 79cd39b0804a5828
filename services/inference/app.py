"""The inference service: one 4-bit base model, hot-swapped weighted ensembles of LoRA adapters.

    uvicorn --factory services.inference.app:create_app        (settings from CHORUS_INFERENCE_* env vars)
    chorus inference --host 127.0.0.1 --port 8001 [--model ...] [--quantization nf4|none]

Routes (Authorization: Bearer <API key>):
    POST   /v1/ensembles/{id}/load       admin   load (or hot-swap) an ensemble from the artifact store by id
    DELETE /v1/ensembles/{id}            admin   unload it (requests in flight finish on it)
    GET    /v1/ensembles                 infer   what is loaded
    GET    /v1/ensembles/{id}            infer   one loaded ensemble
    POST   /v1/ensembles/{id}/classify   infer   {"rows": [{"task", "fields": {...}} | {"task", "text"}]}
    GET    /health, GET /metrics (Prometheus)
Errors: {"error": {"code", "message", "param"}}.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from services.inference.auth import Authenticator, DbKeyAuthenticator, Principal, require
from services.inference.errors import ApiError, BodyLimitMiddleware, install_error_handlers
from services.inference.metrics import InferenceMetrics
from services.inference.service import InferenceService
from services.inference.settings import InferenceSettings
from services.inference.sources import EnsembleSource, default_source

log = logging.getLogger("chorus.inference")

Infer = Annotated[Principal, Depends(require("infer"))]
Admin = Annotated[Principal, Depends(require("admin"))]


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200, description="A task served by the ensemble.")
    fields: dict[str, Any] | None = Field(None, description="The task template's fields (strings or numbers).")
    text: str | None = Field(None, description="Shorthand for a task with a single text field.")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[Row] = Field(min_length=1, description="Rows to classify; each names its task.")


class MemberScores(BaseModel):
    weight: float
    logits: dict[str, float]


class RowOut(BaseModel):
    task: str
    label: str
    probabilities: dict[str, float]
    logits: dict[str, float]
    members: dict[str, MemberScores]


class ClassifyResponse(BaseModel):
    ensemble: str
    name: str
    version: int
    fingerprint: str
    results: list[RowOut]


def create_app(
    settings: InferenceSettings | None = None, *, base: Any = None, source: EnsembleSource | None = None,
    authenticator: Authenticator | None = None, **overrides: Any,
) -> FastAPI:
    """Build the app. The base model is loaded here, once (settings.model / settings.quantization, or the
    `base` given, e.g. by tests). `overrides` set InferenceSettings fields (model=..., quantization=...)."""
    from shared.ml.models import Base

    if settings is None:
        settings = InferenceSettings(**overrides)
    elif overrides:
        settings = InferenceSettings(**{**settings.model_dump(), **overrides})
    if base is None:
        base = Base.load(settings.model, settings.quantization, settings.device)
    else:  # the given base decides what is served
        settings = settings.model_copy(update={"model": base.info.name, "quantization": base.info.quantization})
    if authenticator is None:
        if settings.migrate_on_start:
            from shared.db.session import migrate

            migrate()
        authenticator = DbKeyAuthenticator(settings.auth_cache_seconds)
    source = source or default_source(settings.ensembles_dir, settings.use_database)
    metrics = InferenceMetrics()
    service = InferenceService(settings, base, source, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        if settings.preload_ids:
            await service.preload(settings.preload_ids)
        yield
        await service.close()

    app = FastAPI(
        title="chorus inference", version="1", lifespan=lifespan,
        docs_url="/docs" if settings.docs else None, redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    app.state.service = service
    app.state.settings = settings
    app.state.authenticator = authenticator
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)

    @app.middleware("http")
    async def observe(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            path = getattr(route, "path", "unmatched")
            metrics.requests.labels(request.method, path, str(status)).inc()
            metrics.latency.labels(request.method, path).observe(time.perf_counter() - start)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        info = base.info
        return {
            "status": "ok", "base": {"base_model": info.name, "quantization": info.quantization,
                                     "compute_dtype": info.compute_dtype},
            "device": str(service.engine.device), "ensembles": len(service.ensembles),
            "uptime_seconds": round(time.time() - service.started_at, 1),
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics_route(request: Request) -> Response:
        if not settings.metrics_public:
            await require("admin")(request, _bearer_from(request))
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/ensembles")
    async def list_ensembles(_: Infer) -> dict[str, Any]:
        return {
            "data": [e.describe(service.engine) for e in service.ensembles.values()],
            "base": base.info.identity(), "engine": service.engine.describe(),
        }

    @app.get("/v1/ensembles/{ensemble_id}")
    async def get_ensemble(ensemble_id: str, _: Infer) -> dict[str, Any]:
        ensemble = service.ensembles.get(ensemble_id)
        if ensemble is None:
            raise ApiError(404, "not_found", f"ensemble {ensemble_id!r} is not loaded", "id")
        return ensemble.describe(service.engine)

    @app.post("/v1/ensembles/{ensemble_id}/load")
    async def load_ensemble(ensemble_id: str, _: Admin) -> dict[str, Any]:
        ensemble, loaded = await service.load(ensemble_id)
        return {**ensemble.describe(service.engine), "loaded": loaded}

    @app.delete("/v1/ensembles/{ensemble_id}")
    async def unload_ensemble(ensemble_id: str, _: Admin) -> dict[str, Any]:
        ensemble = await service.unload(ensemble_id)
        return {"id": ensemble.id, "fingerprint": ensemble.fingerprint, "unloaded": True,
                "in_flight": ensemble.in_flight}

    @app.post("/v1/ensembles/{ensemble_id}/classify", response_model=ClassifyResponse)
    async def classify(ensemble_id: str, body: ClassifyRequest, _: Infer) -> dict[str, Any]:
        rows = [row.model_dump(exclude_none=True) for row in body.rows]
        ensemble, results = await service.classify(ensemble_id, rows)
        return {
            "ensemble": ensemble.id, "name": ensemble.manifest.name, "version": ensemble.manifest.version,
            "fingerprint": ensemble.fingerprint, "results": [r.to_dict() for r in results],
        }

    return app


def _bearer_from(request: Request) -> Any:
    from fastapi.security import HTTPAuthorizationCredentials

    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=token.strip())
