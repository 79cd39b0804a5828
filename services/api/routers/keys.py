"""/v1/keys (admin scope): create, list and revoke API keys. A key's secret is shown once, at creation."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from services.api.common import Cursor, PageSize, page
from services.api.deps import DB, Admin
from services.api.errors import ApiError
from services.api.key_cache import key_cache
from services.api.schemas import KeyCreate, KeyOut, ListResponse
from shared.db.keys import create_key
from shared.db.models import ApiKey, utcnow

router = APIRouter(tags=["keys"])


@router.post("/keys", status_code=201, response_model=KeyOut)
def create_api_key(body: KeyCreate, principal: Admin, db: DB) -> KeyOut:
    row, plaintext = create_key(db, body.owner, body.scopes, body.name)
    db.commit()
    return KeyOut.of(row, plaintext)


@router.get("/keys", response_model=ListResponse[KeyOut])
def list_api_keys(
    principal: Admin,
    db: DB,
    owner: Annotated[str | None, Query(description="Only this owner's keys.")] = None,
    after: Cursor = None,
    limit: PageSize = 20,
) -> ListResponse[KeyOut]:
    stmt = select(ApiKey)
    if owner:
        stmt = stmt.where(ApiKey.owner == owner)
    rows, more = page(db, stmt, ApiKey.id, after, limit, principal=principal)
    data = [KeyOut.of(r) for r in rows]
    return ListResponse[KeyOut](
        data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.delete("/keys/{key_id}", response_model=KeyOut)
def revoke_api_key(key_id: str, principal: Admin, db: DB) -> KeyOut:
    """Revoke a key (effective within CHORUS_AUTH_CACHE_SECONDS on every API process)."""
    row = db.get(ApiKey, key_id)
    if row is None:
        raise ApiError(404, "not_found", f"no API key {key_id!r}", "id")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        db.commit()
    key_cache.clear()
    return KeyOut.of(row)
