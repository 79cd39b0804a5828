"""One error shape for every 4xx/5xx of the inference service: {"error": {"code", "message", "param"}}."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI

from services import http_errors
from services.http_errors import ApiError, error_body, error_response

__all__ = ["ApiError", "BodyLimitMiddleware", "error_body", "error_response", "install_error_handlers", "loc_param"]

log = logging.getLogger("chorus.inference")


def loc_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """("body", "rows", 3, "fields", "premise") -> "rows[3].fields.premise"."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or None


def install_error_handlers(app: FastAPI) -> None:
    http_errors.install_error_handlers(app, log, loc_param)


class BodyLimitMiddleware:
    """Refuse request bodies over `limit` bytes (declared Content-Length, or counted while streaming) with 413."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._send_413(send)
            return
        received = 0
        over = False
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, over
            if over:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    over = True
                    if not started:
                        await self._send_413(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if over:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _send_413(self, send: Any) -> None:
        body = json.dumps(error_body("payload_too_large", f"request body is over the {self.limit:,}-byte limit")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
