"""Request body caps of every chorus HTTP service, enforced while the body streams in (pure ASGI middleware).

A declared Content-Length over the cap is refused before reading anything; otherwise bytes are counted as
they arrive and the request is answered 413 (the one error shape, code `payload_too_large`) the moment the
cap is passed, the application sees a client disconnect, and whatever it would have answered is dropped.
Multipart uploads are therefore never spooled past the cap.

    app.add_middleware(BodyLimitMiddleware, limit=4 << 20)                       # one cap
    app.add_middleware(BodyLimitMiddleware, limit=lambda: settings().max_json,   # read per request
                       routes=[("POST", r"/v1/datasets/?", lambda: settings().max_upload)])
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from services.http_errors import error_body

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]
Limit = int | Callable[[], int]


def _value(limit: Limit) -> int:
    return limit() if callable(limit) else limit


class BodyLimitMiddleware:
    """`limit` (bytes, or a callable read per request) for every request with a body; `routes` are
    (method, path regex, limit) overrides, first full match wins. GET/HEAD/OPTIONS pass untouched."""

    def __init__(self, app: Any, limit: Limit, routes: list[tuple[str, str, Limit]] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.routes = [(method, re.compile(pattern), lim) for method, pattern, lim in routes or []]

    def limit_for(self, scope: Scope) -> int:
        for method, pattern, limit in self.routes:
            if scope.get("method") == method and pattern.fullmatch(scope.get("path", "")):
                return _value(limit)
        return _value(self.limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_413(send, limit)
            return
        received = 0
        answered = False
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, answered
            if answered:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    answered = True
                    if not started:
                        await _send_413(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if answered:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)


async def _send_413(send: Send, limit: int) -> None:
    body = json.dumps(error_body("payload_too_large", f"request body is over the {limit:,}-byte limit")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
