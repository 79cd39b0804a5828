"""Helpers shared by the routers: owner-scoped lookups and cursor pagination."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import Session

from services.api.deps import Principal, owned
from services.api.errors import ApiError

M = TypeVar("M")
MAX_LIMIT = 100


def get_owned(db: Session, model: type[M], object_id: str, principal: Principal, label: str,
              options: list[Any] | None = None) -> M:
    """The object if it exists and the caller may see it; 404 otherwise (never 403: no existence leak)."""
    row = db.get(model, object_id, options=options or [])
    if row is None or not owned(principal, row.owner):  # type: ignore[attr-defined]
        raise ApiError(404, "not_found", f"no {label} {object_id!r}", "id")
    return row


def scoped(stmt: Select[Any], model: Any, principal: Principal) -> Select[Any]:
    return stmt if principal.is_admin else stmt.where(model.owner == principal.owner)


def page(db: Session, stmt: Select[Any], id_col: Any, after: Any, limit: int, newest_first: bool = True) -> tuple[list[Any], bool]:
    """Rows after the cursor `after` (an id), at most `limit`, and whether more follow."""
    if after is not None:
        stmt = stmt.where(id_col < after if newest_first else id_col > after)
    stmt = stmt.order_by(id_col.desc() if newest_first else id_col.asc()).limit(limit + 1)
    rows = list(db.scalars(stmt))
    return rows[:limit], len(rows) > limit
