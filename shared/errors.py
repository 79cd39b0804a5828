"""The error hierarchy of chorus, mapped once to job error codes and HTTP statuses.

    ChorusError
    ├── InvalidParams   the request's parameters are wrong                 invalid_params  422
    ├── BadInput        user-supplied data or files are wrong              bad_input       422
    ├── StageFailed     a stage failed for a reason that is not the user's stage_failed    500
    └── Infrastructure  the database, broker or storage is unavailable     infrastructure  503

InvalidParams and BadInput are also ValueErrors, so callers that catch ValueError keep working. `classify` is
the one place that says what an arbitrary exception counts as. This module imports nothing, so the ML core
raises these without pulling in the web or queue stack.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["BadInput", "ChorusError", "Infrastructure", "InvalidParams", "StageFailed", "classify"]


class ChorusError(Exception):
    """Base of the hierarchy; `code` is the stable job error code, `http_status` the status an API answers.
    `param` optionally names the parameter at fault (e.g. `params.affinity`)."""

    code: ClassVar[str] = "internal_error"
    http_status: ClassVar[int] = 500
    param: str | None = None

    def __init__(self, *args: object, param: str | None = None) -> None:
        super().__init__(*args)
        if param is not None:
            self.param = param


class InvalidParams(ChorusError, ValueError):
    """The request's parameters are wrong."""

    code = "invalid_params"
    http_status = 422


class BadInput(ChorusError, ValueError):
    """Data or files the user supplied are wrong: dataset rows, adapter files, templates, a referenced file."""

    code = "bad_input"
    http_status = 422


class StageFailed(ChorusError):
    """A stage failed for a reason that is not the user's: a numeric failure, a truncated or corrupt artifact
    we wrote, missing gradients."""

    code = "stage_failed"
    http_status = 500


class Infrastructure(ChorusError):
    """A dependency is unavailable: the database, the broker or the artifact store."""

    code = "infrastructure"
    http_status = 503


FAMILIES: tuple[type[ChorusError], ...] = (InvalidParams, BadInput, StageFailed, Infrastructure)


def _is_pydantic_validation_error(exc: BaseException) -> bool:
    return any(c.__name__ == "ValidationError" and c.__module__.startswith("pydantic") for c in type(exc).__mro__)


def classify(exc: BaseException, *, in_stage: bool = False) -> type[ChorusError]:
    """The family (one of FAMILIES) that `exc` counts as; its `code` and `http_status` say how to report it.

    A ChorusError is its own family. Any other exception depends on when it was raised: while a request's
    params are validated (`in_stage=False`) a ValueError, pydantic's ValidationError included, is
    InvalidParams; inside a running stage (`in_stage=True`) the params were validated already, so nothing
    but a ChorusError that says so is the user's fault and everything else is StageFailed."""
    if isinstance(exc, ChorusError):
        return next((family for family in FAMILIES if isinstance(exc, family)), StageFailed)
    if not in_stage and (isinstance(exc, ValueError) or _is_pydantic_validation_error(exc)):
        return InvalidParams
    return StageFailed
