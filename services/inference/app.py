"""The inference service: one 4-bit base model, hot-swapped weighted ensembles of LoRA adapters.

    uvicorn --factory services.inference.app:create_app        (settings from CHORUS_INFERENCE_* env vars)
    chorus inference --host 127.0.0.1 --port 8001 [--model ...] [--quantization nf4|none]

Routes (Authorization: Bearer <API key>):
    POST   /v1/ensembles/{id}/load       admin   load (or hot-swap) an ensemble by id; optional {"owner": ...}
    DELETE /v1/ensembles/{id}            admin   unload it (requests in flight finish on it)
    GET    /v1/ensembles                 infer   what is loaded (of the key's owner)
    GET    /v1/ensembles/{id}            infer   one loaded ensemble (of the key's owner)
    POST   /v1/ensembles/{id}/classify   infer   {"rows": [{"task", "fields": {...}} | {"task", "text"}]}
                                                 (lazy_load: loads a not-yet-loaded ensemble first, see below)
    GET    /health, GET /metrics (Prometheus; no key when metrics_public, else an admin key)
    GET    /docs, /redoc, /openapi.json (settings.docs, on by default; assets served locally, no CDN)
Errors: {"error": {"code", "message", "param"}}.

Ensembles are owner-scoped (OWASP API1): one recorded by a job (the job database) belongs to that job's
owner; one deployed by hand as a folder belongs to the owner named in the load request, else keeps the
owner it has (hot swap), else belongs to the owner of the admin key that loaded it (a folder preloaded at
startup has no owner: admin keys only). A key sees, lists and classifies only its owner's ensembles
(another owner's id is 404, as if not loaded); admin keys see all.

Lazy loading (CHORUS_INFERENCE_LAZY_LOAD, off by default because it lets `infer` keys make the service load
ensembles, each holding adapter slots until an admin unloads it): a classify request naming an ensemble that
is not loaded loads it first, like LoRAX loads an adapter on its first request, when the key may see it: a
key of the job's owner for a job's ensemble (named by its ens- id or by the art- id of its ensemble.json),
an admin key for any ensemble (a folder ensemble then belongs to that key's owner). Otherwise 404, as for
an ensemble that is not loaded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Path as PathParam

from services.api.docs import install_docs
from services.body_limit import BodyLimitMiddleware
from services.http_errors import error_responses
from services.http_metrics import RequestMetricsMiddleware, add_metrics_route
from services.inference.auth import Authenticator, DbKeyAuthenticator, Principal, require
from services.inference.errors import install_error_handlers
from services.inference.metrics import InferenceMetrics
from services.inference.schemas import ClassifyRequest, ClassifyResponse, LoadRequest, check_field_text
from services.inference.service import InferenceService
from services.inference.settings import InferenceSettings
from services.inference.sources import ENSEMBLE_ID, EnsembleSource, default_source
from services.request_guard import NulGuardMiddleware, document_nul_guard
from shared.ml.model_names import portable_name

log = logging.getLogger("chorus.inference")

Infer = Annotated[Principal, Depends(require("infer"))]
Admin = Annotated[Principal, Depends(require("admin"))]
# The error answers of the /v1 routes, documented with the one error shape.
READ_ERRORS = error_responses(400, 401, 403, 404, 405, 422, 500)
LOAD_ERRORS = error_responses(400, 401, 403, 404, 405, 409, 413, 422, 500)
CLASSIFY_ERRORS = error_responses(400, 401, 403, 404, 405, 413, 422, 500)
# The ids `load` accepts (sources.check_id answers 422 for others), documented for clients.
LoadId = Annotated[
    str,
    PathParam(
        description="An ensemble id: a job's ensemble id, or a folder under the ensembles directory.",
        json_schema_extra={"pattern": r"^(?!.*\.\.)" + ENSEMBLE_ID.pattern.lstrip("^")},
    ),
]


def create_app(
    settings: InferenceSettings | None = None,
    *,
    base: Any = None,
    source: EnsembleSource | None = None,
    authenticator: Authenticator | None = None,
    **overrides: Any,
) -> FastAPI:
    """Build the app. The base model is loaded here, once (settings.model / settings.quantization, or the
    `base` given, e.g. by tests). `overrides` set InferenceSettings fields (model=..., quantization=...)."""
    served = _served(settings, base, overrides)
    settings, base = served.settings, served.base
    if authenticator is None:
        authenticator = _db_authenticator(settings)
    source = source or default_source(settings.ensembles_dir, settings.use_database)
    metrics = InferenceMetrics()
    service = InferenceService(settings, base, source, metrics)
    app = _new_app(settings, service, authenticator, metrics)
    app.include_router(_health_router(service, base))
    add_metrics_route(app, metrics, [] if settings.metrics_public else [Depends(require("admin"))])
    app.include_router(_ensembles_router(service, base))
    return app


@dataclass(frozen=True)
class _Served:
    """The settings the service runs with and the base model it serves."""

    settings: InferenceSettings
    base: Any


def _served(settings: InferenceSettings | None, base: Any, overrides: dict[str, Any]) -> _Served:
    """The settings with `overrides` applied, and the base model: loaded from them, or the one given (which
    then decides the settings' model and quantization)."""
    from shared.ml.models import Base

    if settings is None:
        settings = InferenceSettings(**overrides)
    elif overrides:
        settings = InferenceSettings(**{**settings.model_dump(), **overrides})
    if base is None:
        base = Base.load(settings.model, settings.quantization, settings.device)
    else:  # the given base decides what is served
        settings = settings.model_copy(update={"model": base.info.name, "quantization": base.info.quantization})
    return _Served(settings, base)


def _db_authenticator(settings: InferenceSettings) -> Authenticator:
    """API keys checked against the job database (migrated first when settings.migrate_on_start)."""
    if settings.migrate_on_start:
        from shared.db.session import migrate

        migrate()
    return DbKeyAuthenticator(settings.auth_cache_seconds)


def _lifespan(
    settings: InferenceSettings, service: InferenceService
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Preload settings.preload_ids at startup; close the service at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.preload_ids:
            await service.preload(settings.preload_ids)
        yield
        await service.close()

    return lifespan


def _new_app(
    settings: InferenceSettings, service: InferenceService, authenticator: Authenticator, metrics: InferenceMetrics
) -> FastAPI:
    """The app without its routes: docs, state, error handlers and middleware."""
    app = FastAPI(
        title="chorus inference",
        version="1",
        lifespan=_lifespan(settings, service),
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs else None,
    )
    if settings.docs:
        install_docs(app)  # /docs and /redoc with their assets served here (no CDN), as the job API does
    app.state.service = service
    app.state.settings = settings
    app.state.authenticator = authenticator
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(NulGuardMiddleware)
    document_nul_guard(app)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)  # outermost: sees 413s
    return app


def _health_router(service: InferenceService, base: Any) -> APIRouter:
    """GET /health: the base model, device, number of loaded ensembles and uptime (no key)."""
    router = APIRouter()

    @router.get("/health")
    async def health() -> dict[str, Any]:
        info = base.info
        return {
            "status": "ok",
            "base": {
                "base_model": portable_name(info.name),
                "quantization": info.quantization,
                "compute_dtype": info.compute_dtype,
            },
            "device": str(service.engine.device),
            "ensembles": len(service.ensembles),
            "uptime_seconds": round(time.time() - service.started_at, 1),
        }

    return router


def _ensembles_router(service: InferenceService, base: Any) -> APIRouter:
    """The /v1/ensembles routes: list, describe, load, unload, classify."""
    router = APIRouter()

    @router.get("/v1/ensembles", responses=READ_ERRORS)
    async def list_ensembles(principal: Infer) -> dict[str, Any]:
        return {
            "data": [service.describe(e) for e in service.visible(principal.owner_filter)],
            "base": base.info.identity(),
            "engine": service.engine.describe(),
        }

    @router.get("/v1/ensembles/{ensemble_id}", responses=READ_ERRORS)
    async def get_ensemble(ensemble_id: str, principal: Infer) -> dict[str, Any]:
        return service.describe(service.get(ensemble_id, principal.owner_filter))

    @router.post("/v1/ensembles/{ensemble_id}/load", responses=LOAD_ERRORS)
    async def load_ensemble(ensemble_id: LoadId, principal: Admin, body: LoadRequest | None = None) -> dict[str, Any]:
        ensemble, loaded = await service.load(
            ensemble_id, owner=body.owner if body else None, default_owner=principal.owner
        )
        return {**service.describe(ensemble), "loaded": loaded}

    @router.delete("/v1/ensembles/{ensemble_id}", responses=READ_ERRORS)
    async def unload_ensemble(ensemble_id: str, _: Admin) -> dict[str, Any]:
        ensemble = await service.unload(ensemble_id)
        return {
            "id": ensemble.id,
            "fingerprint": ensemble.fingerprint,
            "unloaded": True,
            "in_flight": ensemble.in_flight,
        }

    @router.post("/v1/ensembles/{ensemble_id}/classify", response_model=ClassifyResponse, responses=CLASSIFY_ERRORS)
    async def classify(ensemble_id: str, body: ClassifyRequest, principal: Infer) -> dict[str, Any]:
        check_field_text(body.rows)
        rows = [row.model_dump(exclude_none=True) for row in body.rows]
        ensemble, results = await service.classify(ensemble_id, rows, principal.owner_filter, principal.owner)
        return {
            "ensemble": ensemble.id,
            "name": ensemble.manifest.name,
            "version": ensemble.manifest.version,
            "fingerprint": ensemble.fingerprint,
            "results": [r.to_dict() for r in results],
        }

    return router
