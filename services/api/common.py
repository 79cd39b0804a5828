"""Helpers shared by the routers: owner-scoped lookups and cursor pagination."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import Query
from sqlalchemy import Select
from sqlalchemy.orm import Session

from services.api.deps import Principal, owned
from services.api.errors import ApiError

M = TypeVar("M")
MAX_LIMIT = 100

# Query parameters of every list: a cursor, the page size, and the job filter of artifact lists.
Cursor = Annotated[
    str | None,
    Query(
        pattern=r"^[a-z]+-[0-9a-f]{24}$",
        description="The `last_id` of the previous page (leave it out for the first "
        "page); an id that is not in the list is refused.",
    ),
]
PageSize = Annotated[int, Query(ge=1, le=MAX_LIMIT, description=f"Objects per page (1-{MAX_LIMIT}).")]
JobFilter = Annotated[str | None, Query(description="Only those of this job (job-...).")]


def get_owned(
    db: Session, model: type[M], object_id: str, principal: Principal, label: str, options: list[Any] | None = None
) -> M:
    """The object if it exists and the caller may see it; 404 otherwise (never 403: no existence leak)."""
    row = db.get(model, object_id, options=options or [])
    if row is None or not owned(principal, row.owner):  # type: ignore[attr-defined]
        raise ApiError(404, "not_found", f"no {label} {object_id!r}", "id")
    return row


def scoped(stmt: Select[Any], model: Any, principal: Principal) -> Select[Any]:
    return stmt if principal.is_admin else stmt.where(model.owner == principal.owner)


def check_cursor(db: Session, id_col: Any, after: str, principal: Principal | None) -> None:
    """422 naming `after` unless it is the id of an object the caller may see (a page's `last_id`): an unknown
    cursor would otherwise silently give a page that is not the next one."""
    model = id_col.class_
    row = db.get(model, after)
    if row is None or (principal is not None and hasattr(row, "owner") and not owned(principal, row.owner)):
        label = getattr(model, "__tablename__", "object").removesuffix("s").replace("_", " ")
        raise ApiError(
            422,
            "invalid_request",
            f"after: no {label} {after[:100]!r}; pass the last_id of the previous "
            "page (or leave after out for the first page)",
            "after",
        )


def page(
    db: Session,
    stmt: Select[Any],
    id_col: Any,
    after: Any,
    limit: int,
    newest_first: bool = True,
    principal: Principal | None = None,
) -> tuple[list[Any], bool]:
    """Rows after the cursor `after` (an id), at most `limit`, and whether more follow. A string cursor must
    be the id of an object `principal` may see (`check_cursor`); numeric cursors are positions."""
    if isinstance(after, str):
        check_cursor(db, id_col, after, principal)
    if after is not None:
        stmt = stmt.where(id_col < after if newest_first else id_col > after)
    stmt = stmt.order_by(id_col.desc() if newest_first else id_col.asc()).limit(limit + 1)
    rows = list(db.scalars(stmt))
    return rows[:limit], len(rows) > limit
