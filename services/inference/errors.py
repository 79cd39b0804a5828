"""One error shape for every 4xx/5xx of the inference service: {"error": {"code", "message", "param"}}."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI

from services import http_errors
from services.http_errors import ApiError, error_body, error_response

__all__ = ["ApiError", "error_body", "error_response", "install_error_handlers", "loc_param"]

log = logging.getLogger("chorus.inference")


def loc_param(loc: Sequence[Any]) -> str | None:
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
