"""The one error shape of every chorus HTTP service: {"error": {"code", "message", "param"}}."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from shared.errors import ChorusError, classify

STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "rate_limited",
    500: "internal_error",
    501: "not_implemented",
    503: "unavailable",
}

LocFormatter = Callable[[Sequence[Any]], "str | None"]
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")  # what an `Allow` header may list

# An absolute server path of two or more segments (not part of a URL, a relative path or an API route):
# error messages never show one; `/srv/models/x/model.safetensors` becomes `.../model.safetensors`.
_ABS_PATH = re.compile(r"(?<![\w.~:/\\-])/(?!v1/)(?:[^\s'\"`/:,;()<>\[\]{}|]+/)+([^\s'\"`/:,;()<>\[\]{}|]*)")


class ErrorDetail(BaseModel):
    code: str
    message: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_DESCRIPTIONS = {
    400: "Malformed request (e.g. a NUL byte in the path or query).",
    401: "Missing, unknown or revoked API key.",
    403: "The API key lacks the route's scope.",
    404: "No such object (or not the caller's).",
    405: "Method not allowed on this path (`Allow` lists the methods).",
    409: "Conflict with the object's current state.",
    413: "Request body over the size cap.",
    422: "Invalid request: `param` names the field.",
    429: "Rate limited (`Retry-After` says when to retry).",
    500: "Internal error.",
    501: "Not available in this deployment.",
    503: "A dependency is unavailable.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for these status codes, each with the one error shape."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS.get(code, "Error.")} for code in codes}


def scrub_paths(message: str) -> str:
    """`message` without absolute server paths (each replaced by `.../<last segment>`)."""
    return _ABS_PATH.sub(lambda m: f".../{m.group(1)}" if m.group(1) else "...", message)


class ApiError(Exception):
    """Raise anywhere in a request to answer with the standard error body."""

    def __init__(
        self, status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param, self.headers = status, code, message, param, headers


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The standard body; absolute server paths in `message` are scrubbed (a backstop for messages that
    quote a file the server could not read)."""
    return {"error": {"code": code, "message": scrub_paths(message), "param": param}}


def error_response(
    status: int, code: str, message: str, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message, param), status_code=status, headers=headers)


def pydantic_message(
    exc: ValidationError | RequestValidationError, loc_param: LocFormatter, prefix: tuple[str, ...] = ()
) -> tuple[str, str | None]:
    """(message, param) naming the first invalid field, and how many more problems there are."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    param = loc_param((*prefix, *first.get("loc", ())))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "string_pattern_mismatch":  # our patterns are character classes
        msg = f"has characters that are not allowed here (pattern {(first.get('ctx') or {}).get('pattern')})"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def install_error_handlers(app: FastAPI, log: logging.Logger, loc_param: LocFormatter) -> None:
    """Answer every error (ours, Starlette's, validation, unhandled) with the standard body."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)

    @app.exception_handler(ChorusError)
    async def _chorus_error(request: Request, exc: ChorusError) -> JSONResponse:
        # One that no route turned into a more specific answer: the family's status and code.
        family = classify(exc)
        if family.http_status >= 500:
            log.error("%s on %s %s", family.__name__, request.method, request.url.path, exc_info=exc)
        return error_response(family.http_status, family.code, str(exc) or family.code, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(request))
        return error_response(
            exc.status_code, STATUS_CODES.get(exc.status_code, "error"), message, None, headers or None
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = pydantic_message(exc, loc_param)
        return error_response(422, "invalid_request", message, param)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "internal server error")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path (Starlette's own 405 names only the first
    matching route's methods): each candidate method is matched against the app's routes."""
    routes = request.app.router.routes
    scope = {
        k: v
        for k, v in request.scope.items()
        if k
        in ("type", "path", "raw_path", "root_path", "app_root_path", "headers", "query_string", "scheme", "server")
    }
    return [
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in routes)
    ]
