"""Request dependencies: the database session, the authenticated principal (API key + scopes) and the
rate limits charged to it (services/api/rate_limits.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Request, Security, params
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from sqlalchemy.orm import Session

from services.api.errors import ApiError
from services.api.key_cache import key_cache
from services.api.rate_limits import ApiRateLimiter
from services.api.strict_query import check_query, depends_on, route_dependant
from services.principal import Principal
from shared.db.keys import has_scope, hash_key, verify_key
from shared.db.session import get_sessionmaker
from shared.jobs.config import get_service_settings


async def get_db() -> AsyncIterator[Session]:
    """A session per request. Creating one costs nothing (no connection until first use), so this runs on
    the event loop; the endpoints that use it are sync and run in the threadpool."""
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


DB = Annotated[Session, Depends(get_db)]


bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer chorus_...`")


def _lookup(token: str) -> Principal | None:
    digest = hash_key(token)
    principal = key_cache.get(digest)
    if principal is not None:
        return principal
    with get_sessionmaker()() as session:
        row = verify_key(session, token)
        if row is None:
            return None
        principal = Principal(row.id, row.owner, tuple(row.scopes or ()))
    key_cache.put(digest, principal, get_service_settings().auth_cache_seconds)
    return principal


def _limiter(request: Request) -> ApiRateLimiter | None:
    return getattr(request.app.state, "rate_limiter", None)


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def authenticate(
    request: Request,
    security_scopes: SecurityScopes,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """401 without a valid key, 403 when the key lacks a scope this route requires, 429 over a rate limit
    (the key's, or the client IP's for requests without a valid key). Verified keys are cached for
    CHORUS_AUTH_CACHE_SECONDS, so the database is asked only on a cache miss (in a thread), and only while
    the client IP has not used up its allowance of requests without a valid key."""
    challenge = {"WWW-Authenticate": "Bearer"}
    limiter = _limiter(request)
    if credentials is None or not credentials.credentials:
        if limiter is not None:
            await limiter.charge("anon", client_ip(request))
        raise ApiError(401, "unauthorized", "missing API key (Authorization: Bearer <key>)", headers=challenge)
    token = credentials.credentials
    principal = key_cache.get(hash_key(token))
    if principal is None:
        if limiter is not None:
            await limiter.check("anon", client_ip(request))
        principal = await run_in_threadpool(_lookup, token)
    if principal is None:
        if limiter is not None:
            await limiter.charge("anon", client_ip(request))
        raise ApiError(401, "unauthorized", "invalid or revoked API key", headers=challenge)
    if limiter is not None:
        await limiter.charge("api", principal.key_id)
    for scope in security_scopes.scopes:
        if not has_scope(principal.scopes, scope):
            raise ApiError(403, "forbidden", f"this API key lacks the {scope!r} scope")
    check_query(request)  # here, not before: a request without a valid key gets 401 whatever its query
    return principal


_KEYED: dict[int, tuple[Any, bool]] = {}


async def strict_query(request: Request) -> None:
    """App-wide dependency: 422 for a query parameter the route does not declare. Routes that take an API key
    check in `authenticate` instead, after the key."""
    dependant = route_dependant(request)
    cached = _KEYED.get(id(dependant))
    if cached is None or cached[0] is not dependant:
        cached = (dependant, depends_on(dependant, authenticate))
        _KEYED[id(dependant)] = cached
    if not cached[1]:
        check_query(request)


Submitter = Annotated[Principal, Security(authenticate, scopes=["submit"])]
Admin = Annotated[Principal, Security(authenticate, scopes=["admin"])]


def rate_limit(kind: str) -> params.Depends:
    """A route dependency charging the caller's key to the stricter `kind` bucket ("create", "upload") on
    top of the general one (after authentication: the principal dependency is shared, not run twice)."""

    async def dependency(request: Request, principal: Submitter) -> None:
        limiter = _limiter(request)
        if limiter is not None:
            await limiter.charge(kind, principal.key_id)

    return Depends(dependency)


def owned(principal: Principal, owner: str) -> bool:
    """Objects are visible to their owner and to admin keys only."""
    return principal.is_admin or owner == principal.owner
