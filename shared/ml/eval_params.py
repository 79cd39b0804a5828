"""Parameters of an evaluation job (torch-free, so the API validates them without loading torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from shared.ml.defaults import DEFAULT_MAX_LENGTH


class EvalParams(BaseModel):
    """Parameters of a zero-shot (or adapter) evaluation job."""

    model: str = "smollm2-135m"
    quantization: Literal["none", "nf4"] = "none"
    tasks: list[str] = Field(min_length=1)
    split: Literal["train", "val", "test"] = "test"
    max_examples: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=16, ge=1, le=1024)
    max_length: int = Field(default=DEFAULT_MAX_LENGTH, ge=16, le=8192)
    seed: int = 0

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        from shared.ml.tasks.registry import parse_task_list

        return parse_task_list(",".join(tasks))
