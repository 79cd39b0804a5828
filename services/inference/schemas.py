"""Request and response bodies of the inference service (errors: services/http_errors.py)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from services.http_errors import ApiError


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace")
    return value


# Text to classify: at least one character that is not whitespace.
Text = Annotated[str, Field(min_length=1, json_schema_extra={"pattern": r"\S"}), AfterValidator(_not_blank)]


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Owner of a folder-deployed ensemble (default: the loading key's owner). "
        "An ensemble recorded by a job always belongs to the job's owner.",
    )


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, max_length=200, description="A task served by the ensemble.")
    fields: dict[str, Any] | None = Field(
        None, description="The task template's fields (strings, not empty or only whitespace, or numbers)."
    )
    text: Text | None = Field(None, description="Shorthand for a task with a single text field.")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows: list[Row] = Field(min_length=1, description="Rows to classify; each names its task.")


def check_field_text(rows: list[Row]) -> None:
    """422 naming `rows[i].fields.<name>` for a string field that is empty or only whitespace."""
    for i, row in enumerate(rows):
        for name, value in (row.fields or {}).items():
            if isinstance(value, str) and not value.strip():
                param = f"rows[{i}].fields.{name}"
                raise ApiError(422, "invalid_request", f"{param}: must not be empty or only whitespace", param)


class MemberScores(BaseModel):
    weight: float
    logits: dict[str, float]


class RowOut(BaseModel):
    task: str
    label: str
    probabilities: dict[str, float]
    logits: dict[str, float]
    members: dict[str, MemberScores]


class ClassifyResponse(BaseModel):
    ensemble: str
    name: str
    version: int
    fingerprint: str
    results: list[RowOut]
