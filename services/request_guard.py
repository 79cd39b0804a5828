"""Refuse requests carrying NUL bytes in the path, the query or a header (400, the one error shape) before
any route sees them: PostgreSQL text cannot hold NUL, and no chorus identifier, name or cursor contains one.

    app.add_middleware(NulGuardMiddleware)
    document_nul_guard(app)  # the OpenAPI schema says so (string parameters get a NUL-free pattern)
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from services.http_errors import error_body


def nul_problem(scope: dict[str, Any]) -> tuple[str, str] | None:
    """(message, param) for the first NUL byte in the request's path, query or headers; None if clean."""
    if "\x00" in scope.get("path", ""):
        return "path: must not contain NUL bytes", "path"
    query = scope.get("query_string", b"").decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            param = name.replace("\x00", "") or "query"
            return f"{param}: query parameters must not contain NUL bytes", param
    for name, value in scope.get("headers") or []:
        if b"\x00" in value or b"\x00" in name:
            param = name.replace(b"\x00", b"").decode("latin-1") or "header"
            return f"{param}: headers must not contain NUL bytes", param
    return None


class NulGuardMiddleware:
    """Pure ASGI: 400 `bad_request` naming the parameter for a NUL byte anywhere outside the body."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        problem = nul_problem(scope) if scope["type"] == "http" else None
        if problem is None:
            await self.app(scope, receive, send)
            return
        body = json.dumps(error_body("bad_request", *problem)).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 400,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


NO_NUL = "^[^\\x00]*$"


def document_nul_guard(app: Any) -> None:
    """Make the app's OpenAPI schema say what NulGuardMiddleware enforces: every string parameter (path,
    query, header) without a pattern of its own gets one that excludes NUL."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                for parameter in operation.get("parameters", []) if isinstance(operation, dict) else []:
                    _forbid_nul(parameter.get("schema") or {})
        return schema

    app.openapi = openapi


def _forbid_nul(schema: dict[str, Any]) -> None:
    for option in schema.get("anyOf", []):
        _forbid_nul(option)
    if schema.get("type") == "string" and "pattern" not in schema and "enum" not in schema and "const" not in schema:
        schema["pattern"] = NO_NUL
