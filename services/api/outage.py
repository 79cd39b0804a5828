"""Database outages in the job API: any request that cannot reach the database answers 503 `unavailable`
with Retry-After in the standard error shape (not a 500), and /health reports the database without
the driver's error text (host, port and user stay in the server log)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from services.http_errors import error_response
from shared.db.session import UNAVAILABLE, get_engine

log = logging.getLogger("chorus.api")
RETRY_AFTER_SECONDS = 5
MESSAGE = "the job database is unavailable; retry later"


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)}


async def _outage(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, str(exc).splitlines()[0][:300])
    return error_response(503, "unavailable", MESSAGE, None, _retry_after())


def health() -> JSONResponse:
    """200 {"status": "ok"} when the database answers, else 503 {"status": "error", "database": "unavailable"}."""
    try:
        with get_engine().connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:
        log.warning(
            "health: database unavailable: %s", str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        )
        return JSONResponse({"status": "error", "database": "unavailable"}, status_code=503, headers=_retry_after())
    return JSONResponse({"status": "ok"})


def install_outage_handling(app: FastAPI) -> None:
    """Register the 503 handler for database connection errors and the /health route."""
    for cls in UNAVAILABLE:
        app.add_exception_handler(cls, _outage)
    app.add_api_route("/health", health, methods=["GET"], include_in_schema=False)
