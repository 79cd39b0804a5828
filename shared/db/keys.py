"""API keys: random secrets shown once, stored as sha256 with a short visible prefix, with scopes.

Scopes: `admin` (key management, every owner's objects), `submit` (datasets, jobs, artifacts of its
owner), `infer` (the inference service only). `admin` implies the others.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db.models import SCOPES, ApiKey, new_id, utcnow

KEY_PREFIX = "chorus_"
PREFIX_CHARS = len(KEY_PREFIX) + 8


def hash_key(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def parse_scopes(scopes: str | Iterable[str]) -> list[str]:
    """ "submit, infer" -> ["infer", "submit"]; ValueError for an unknown scope."""
    items = scopes.split(",") if isinstance(scopes, str) else list(scopes)
    out = sorted({s.strip() for s in items if s.strip()})
    unknown = [s for s in out if s not in SCOPES]
    if unknown or not out:
        raise ValueError(f"scopes must be a non-empty subset of {list(SCOPES)}, got {items}")
    return out


def has_scope(granted: Iterable[str], required: str) -> bool:
    granted = set(granted)
    return "admin" in granted or required in granted


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_key(
    session: Session, owner: str, scopes: str | Iterable[str], name: str = "", plaintext: str | None = None
) -> tuple[ApiKey, str]:
    """A new key row and its plaintext (shown once). Does not commit."""
    if not owner or len(owner) > 200:
        raise ValueError("owner must be 1-200 characters")
    plaintext = plaintext or generate_key()
    if len(plaintext) < 16:
        raise ValueError("an API key must be at least 16 characters")
    row = ApiKey(
        id=new_id("key"),
        name=name,
        owner=owner,
        prefix=plaintext[:PREFIX_CHARS],
        key_hash=hash_key(plaintext),
        scopes=parse_scopes(scopes),
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row, plaintext


def verify_key(session: Session, plaintext: str) -> ApiKey | None:
    """The active key row for a plaintext key, or None."""
    digest = hash_key(plaintext)
    row = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).one_or_none()
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return row


def ensure_admin_key(session: Session, env_key: str | None) -> str | None:
    """Bootstrap: register `env_key` (CHORUS_ADMIN_KEY) as an admin key if it is not yet known; otherwise,
    when no active admin key exists, create one and return its plaintext (to print once). Commits."""
    if env_key:
        row = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_key(env_key))).one_or_none()
        if row is None:
            create_key(session, "admin", ["admin"], "bootstrap (CHORUS_ADMIN_KEY)", plaintext=env_key)
            session.commit()
        return None
    active = session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))).all()
    if any("admin" in (k.scopes or []) for k in active):
        return None
    _, plaintext = create_key(session, "admin", ["admin"], "bootstrap")
    session.commit()
    return plaintext


def key_summary(row: ApiKey) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "owner": row.owner,
        "prefix": row.prefix,
        "scopes": list(row.scopes),
        "created_at": row.created_at,
        "revoked_at": row.revoked_at,
    }
