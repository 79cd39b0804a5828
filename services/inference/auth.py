"""API-key authentication against the shared job database (`api_keys`: sha256 of the key + scopes).

`Authorization: Bearer <key>`. No key or an unknown/revoked key -> 401; a key without the route's scope
-> 403. Scopes: `infer` (classify, list: its owner's ensembles), `admin` (load/unload, every owner's
ensembles; implies every scope).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Annotated, Protocol

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool

from services.inference.errors import ApiError
from services.principal import Principal


class Authenticator(Protocol):
    def __call__(self, token: str) -> Principal | None: ...


class DbKeyAuthenticator:
    """Verifies keys with `shared.db.keys.verify_key`; verified keys are cached for `cache_seconds`
    (a revoked key stops working within that time)."""

    def __init__(self, cache_seconds: float = 5.0, db_url: str | None = None) -> None:
        self.cache_seconds = cache_seconds
        self.db_url = db_url
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Principal]] = {}

    def __call__(self, token: str) -> Principal | None:
        from shared.db.keys import hash_key, verify_key
        from shared.db.session import get_sessionmaker

        digest = hash_key(token)
        item = self._cache.get(digest)
        if item is not None and item[0] > time.monotonic():
            return item[1]
        with get_sessionmaker(self.db_url)() as session:
            row = verify_key(session, token)
            if row is None:
                return None
            principal = Principal(row.id, row.owner, tuple(row.scopes or ()))
        if self.cache_seconds > 0:
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = (time.monotonic() + self.cache_seconds, principal)
        return principal


def has_scope(granted: tuple[str, ...], required: str) -> bool:
    return "admin" in granted or required in granted


_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer chorus_...`")


def require(scope: str) -> Callable[..., object]:
    """A dependency that authenticates the request and checks `scope`."""

    async def dependency(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Principal:
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None or not credentials.credentials:
            raise ApiError(401, "unauthorized", "missing API key (Authorization: Bearer <key>)", headers=challenge)
        authenticator: Authenticator = request.app.state.authenticator
        principal = await run_in_threadpool(authenticator, credentials.credentials)
        if principal is None:
            raise ApiError(401, "unauthorized", "invalid or revoked API key", headers=challenge)
        if not has_scope(principal.scopes, scope):
            raise ApiError(403, "forbidden", f"this API key lacks the {scope!r} scope")
        return principal

    return dependency
