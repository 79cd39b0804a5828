"""The job API's error helpers (the shape itself lives in services/http_errors.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import DataError

from services import http_errors
from services.http_errors import ApiError, error_body, error_response

__all__ = ["ApiError", "error_body", "error_response", "install_error_handlers", "loc_param", "pydantic_error"]

log = logging.getLogger("chorus.api")


def loc_param(loc: Sequence[Any], drop_source: bool = True) -> str | None:
    """("body", "params", "tasks") -> "params.tasks"; ("query", "limit") -> "limit"."""
    parts = [str(p) for p in loc]
    if drop_source and parts and parts[0] in ("body", "query", "path", "header", "cookie", "form"):
        parts = parts[1:]
    return ".".join(parts) or None


def pydantic_error(
    exc: ValidationError | RequestValidationError, prefix: tuple[str, ...] = ()
) -> tuple[str, str | None]:
    return http_errors.pydantic_message(exc, loc_param, prefix)


def install_error_handlers(app: FastAPI) -> None:
    http_errors.install_error_handlers(app, log, loc_param)

    @app.exception_handler(DataError)
    async def _data_error(request: Request, exc: DataError) -> JSONResponse:
        # A value the database refused (out of range, too long, a character it cannot store): the routes
        # validate their input first, so this is a backstop that keeps such a request a 4xx.
        log.warning(
            "database refused a value on %s %s: %s",
            request.method,
            request.url.path,
            str(exc.orig).splitlines()[0][:300] if exc.orig else type(exc).__name__,
        )
        return error_response(422, "invalid_request", "a value in the request cannot be stored")
