"""Unknown query parameters are refused on every route (422 naming the parameter), so that a typo such as
`?limt=5` or `?stauts=failed` is an error and not a silently unfiltered answer. The names a route accepts
are those its endpoint and dependencies declare (what OpenAPI lists).

Routes that take an API key check their query once the key is verified (services/api/deps.py), so a
request without a valid key gets 401 whatever its query; the others check in an app-wide dependency.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Request

from services.api.errors import ApiError

_ACCEPTED: dict[int, tuple[Any, frozenset[str]]] = {}


def _walk(dependant: Any) -> Iterator[Any]:
    stack, seen = [dependant], set()
    while stack:
        current = stack.pop()
        if id(current) not in seen:
            seen.add(id(current))
            yield current
            stack.extend(current.dependencies)


def accepted_query_names(dependant: Any) -> frozenset[str]:
    """The query parameter names declared by a FastAPI dependant and its sub-dependencies."""
    cached = _ACCEPTED.get(id(dependant))
    if cached is not None and cached[0] is dependant:
        return cached[1]
    names: set[str] = set()
    for current in _walk(dependant):
        for field in current.query_params:
            names.add(field.alias)
            model = getattr(field.field_info.annotation, "model_fields", None)  # a query-parameter model
            if isinstance(model, dict):
                names.update(f.alias or name for name, f in model.items())
    accepted = frozenset(names)
    _ACCEPTED[id(dependant)] = (dependant, accepted)
    return accepted


def route_dependant(request: Request) -> Any:
    return getattr(request.scope.get("route"), "dependant", None)


def depends_on(dependant: Any, call: Callable[..., Any]) -> bool:
    """Whether `call` is among the dependencies of `dependant` (at any depth)."""
    return dependant is not None and any(d.call is call for d in _walk(dependant))


def check_query(request: Request) -> None:
    """422 `invalid_request` naming the first query parameter the matched route does not declare."""
    dependant = route_dependant(request)
    if not request.query_params or dependant is None:
        return
    accepted = accepted_query_names(dependant)
    unknown = [name for name in dict.fromkeys(request.query_params.keys()) if name not in accepted]
    if unknown:
        name = unknown[0][:100]
        listed = ", ".join(sorted(accepted)) if accepted else "none"
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ApiError(
            422, "invalid_request", f"{name}: unknown query parameter{more}; this endpoint accepts: {listed}", name
        )
