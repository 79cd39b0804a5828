"""The errors of a dataset import: every problem with its place, repeated identical row problems summarised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.errors import BadInput

MAX_SHOWN = 50  # lines of problems in str(); all of them stay in .errors
MAX_LINES_LISTED = 5  # line numbers shown for a problem repeated on many rows


@dataclass(frozen=True)
class RowError:
    """One problem: `line` is 1-based in the uploaded file (None: the file or the arguments as a whole).

    `source` names the file when several were given (one per split); `unit` is "row" for Parquet/Arrow.
    """

    line: int | None
    field: str | None
    message: str
    source: str | None = None
    unit: str = "line"

    def _where(self) -> str:
        where = f"{self.unit} {self.line}" if self.line is not None else "file"
        return f"{self.source} {where}" if self.source else where

    def __str__(self) -> str:
        return f"{self._where()}: {self.field}: {self.message}" if self.field else f"{self._where()}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"line": self.line, "field": self.field, "message": self.message}
        if self.source:
            out["file"] = self.source
        return out


def _summary(group: list[RowError]) -> str:
    """One line for a problem repeated on several rows: the first, the count and the next few line numbers."""
    first = group[0]
    if len(group) == 1:
        return str(first)
    rest = group[1:]
    listed = ", ".join(str(e.line) for e in rest[:MAX_LINES_LISTED])
    more = f" and {len(rest) - MAX_LINES_LISTED:,} more" if len(rest) > MAX_LINES_LISTED else ""
    also = first.unit + ("s" if len(rest) > 1 else "")
    return f"{first} ({len(group):,} {first.unit}s in all; also {also} {listed}{more})"


class DatasetValidationError(BadInput):
    """Every problem found in a dataset (or its import arguments); nothing was registered."""

    def __init__(self, errors: Sequence[RowError]):
        self.errors = sorted(errors, key=lambda e: (e.line is not None, e.source or "", e.line or 0))
        super().__init__(str(self))

    def summary_lines(self) -> list[str]:
        """One line per problem; identical problems on several rows share one line."""
        groups: dict[Any, list[RowError]] = {}
        for number, e in enumerate(self.errors):
            key = (e.source, e.unit, e.field, e.message) if e.line is not None else number
            groups.setdefault(key, []).append(e)
        return [_summary(group) for group in groups.values()]

    def __str__(self) -> str:
        lines = self.summary_lines()
        shown = "\n".join(f"  {line}" for line in lines[:MAX_SHOWN])
        more = f"\n  ... and {len(lines) - MAX_SHOWN} more" if len(lines) > MAX_SHOWN else ""
        return f"dataset rejected, {len(self.errors)} problem(s), nothing imported:\n{shown}{more}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (Celery ships exceptions between processes)
        return (self.__class__, (self.errors,))

    def to_dict(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.errors]


class TaskExistsError(DatasetValidationError):
    """A user task with that name already exists (pass overwrite=True to replace it)."""
