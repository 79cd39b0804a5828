"""The job API's rate limits (OWASP API4): token buckets per API key and, for requests without a valid
key, per client IP. Every route's request is charged to the key's general bucket; job creation and
dataset uploads are also charged to a stricter bucket of their own. A refusal is 429 `rate_limited` in the
one error shape, with Retry-After.

Which buckets a request takes (see `services.api.deps.authenticate`):
* valid key: `api:<key id>`; plus `create:<key id>` (POST /v1/jobs) or `upload:<key id>` (POST /v1/datasets);
* no key, or an unknown/revoked key: `anon:<client ip>`. A key that is not in the auth cache is only looked
  up in the database while its address still has `anon` tokens, so a flood of made-up keys cannot turn into
  a flood of database queries.

FastAPI reads a request's body before it runs the route's dependencies, so an upload refused by the
dependency would already have been received (up to the body cap). `EarlyRefusalMiddleware` therefore
refuses uploads and job creations of a key whose bucket is already empty before reading the body, when the
key is in the auth cache (no database lookup there); the dependency still takes the token.

The client IP is the ASGI client address. chorus starts uvicorn without proxy headers unless
CHORUS_FORWARDED_ALLOW_IPS names the reverse proxies to trust (services/cli/serve.py); uvicorn's own default
would trust X-Forwarded-For from 127.0.0.1, letting a local caller pick the address it is limited by.

Buckets are in-process on the embedded defaults and in Redis when BROKER_URL (or CHORUS_RATE_LIMIT_REDIS_URL)
is redis://..., so several API processes share each limit (services/rate_limit.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from services.api.key_cache import key_cache
from services.api.settings import ApiSettings
from services.http_errors import ApiError, error_response
from services.rate_limit import Buckets, MemoryBuckets, RedisBuckets, retry_after_header
from shared.db.keys import hash_key

# Routes with a stricter bucket of their own: (method, path regex, bucket kind).
STRICT_ROUTES = [("POST", r"/v1/jobs/?", "create"), ("POST", r"/v1/datasets/?", "upload")]

_WHAT = {
    "api": "rate limit exceeded for this API key",
    "create": "job creation rate limit exceeded for this API key",
    "upload": "dataset upload rate limit exceeded for this API key",
    "anon": "too many requests without a valid API key from this address",
}


class ApiRateLimiter:
    def __init__(
        self, settings: ApiSettings, buckets: Buckets, on_refused: Callable[[str], None] | None = None
    ) -> None:
        self.limits = settings.limits()
        self.buckets = buckets
        self.on_refused = on_refused

    async def charge(self, kind: str, who: str) -> None:
        """Take a token from bucket `kind:who`; 429 when there is none."""
        await self._take(kind, who, consume=True)

    async def check(self, kind: str, who: str) -> None:
        """429 when bucket `kind:who` is empty, without taking a token."""
        await self._take(kind, who, consume=False)

    async def _take(self, kind: str, who: str, consume: bool) -> None:
        limit = self.limits[kind]
        decision = await self.buckets.take(f"{kind}:{who}", limit, consume)
        if decision.allowed:
            return
        if self.on_refused is not None:
            self.on_refused(kind)
        retry = retry_after_header(decision.retry_after)
        raise ApiError(
            429,
            "rate_limited",
            f"{_WHAT[kind]} ({limit.describe()}); retry in {retry} s",
            headers={"Retry-After": retry},
        )

    @property
    def backend(self) -> str:
        return "redis" if isinstance(self.buckets, RedisBuckets) else "memory"


def build_rate_limiter(
    settings: ApiSettings, broker_url: str | None, on_refused: Callable[[str], None] | None = None
) -> ApiRateLimiter | None:
    """None when rate limits are off; Redis buckets when a Redis URL is configured, else in-process."""
    if not settings.rate_limit_enabled:
        return None
    url = settings.redis_url(broker_url)
    buckets: Buckets = RedisBuckets(url) if url else MemoryBuckets()
    return ApiRateLimiter(settings, buckets, on_refused)


class EarlyRefusalMiddleware:
    """Pure ASGI: a request to a STRICT_ROUTES route whose (cached) key has an empty general or route
    bucket is answered 429 before its body is read. Anything else passes to the app untouched."""

    def __init__(self, app: Any, limiter: ApiRateLimiter | None) -> None:
        self.app = app
        self.limiter = limiter
        self.routes = [(method, re.compile(pattern), kind) for method, pattern, kind in STRICT_ROUTES]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        kind = self._kind(scope) if self.limiter is not None and scope["type"] == "http" else None
        key_id = _cached_key_id(scope) if kind else None
        if kind and key_id and self.limiter is not None:
            try:
                await self.limiter.check("api", key_id)
                await self.limiter.check(kind, key_id)
            except ApiError as exc:
                response = error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _kind(self, scope: dict[str, Any]) -> str | None:
        for method, pattern, kind in self.routes:
            if scope.get("method") == method and pattern.fullmatch(scope.get("path", "")):
                return kind
        return None


def _cached_key_id(scope: dict[str, Any]) -> str | None:
    header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    principal = key_cache.get(hash_key(token.strip()))
    return principal.key_id if principal is not None else None
