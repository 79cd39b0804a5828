"""Params of a study (torch-free, so the API validates them without the ML stack)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.ml.defaults import DEFAULT_MAX_LENGTH, GroupCount, Seeds, TaskNames
from shared.ml.training.params import (
    AFFINITY_SECTION_DOC,
    GROUPING_SECTION_DOC,
    GROUPS_DOC,
    MAX_LENGTH_DOC,
    MODEL_DOC,
    QUANTIZATION_DOC,
    TASKS_DOC,
    TRAINING_SECTION_DOC,
    TrainingParams,
)
from shared.ml.training.pipeline_params import PipelineParams

ARMS = ("single", "per_task", "random", "affinity")
Arm = Literal["single", "per_task", "random", "affinity"]


class StudyParams(BaseModel):
    """Every arm trained by the same trainer, budget rule and selection rule, for each seed.

    Shared knobs are set once; `affinity`, `grouping` and `training` take the fields of Stage 1's
    AffinityParams, GroupingParams and Stage 2's TrainingParams (as in a pipeline job).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="smollm2-135m", description=MODEL_DOC)
    quantization: Literal["none", "nf4"] = Field(default="nf4", description=QUANTIZATION_DOC)
    tasks: TaskNames = Field(description=TASKS_DOC)
    seeds: Seeds = Field(
        default_factory=lambda: [0, 1, 2], description="seeds of the study (an integer S means seeds 0..S-1)"
    )
    groups: GroupCount = Field(default="auto", description=GROUPS_DOC)
    max_train: int | None = Field(default=500, ge=1, description="training examples per task; None = all")
    max_val: int | None = Field(default=200, ge=1, description="validation examples per task; None = all")
    max_test: int | None = Field(default=500, ge=1, description="test examples per task; None = all")
    max_length: int = Field(default=DEFAULT_MAX_LENGTH, ge=16, le=8192, description=MAX_LENGTH_DOC)
    affinity: dict[str, Any] = Field(default_factory=dict, description=AFFINITY_SECTION_DOC)
    grouping: dict[str, Any] = Field(default_factory=dict, description=GROUPING_SECTION_DOC)
    training: dict[str, Any] = Field(
        default_factory=dict, description=TRAINING_SECTION_DOC + " (the study sets baselines itself)"
    )
    bootstrap: int = Field(default=2000, ge=100, le=100_000, description="bootstrap resamples for the CIs")
    workers: int = Field(
        default=1, ge=1, le=64, description="processes that train arms at once (spread round-robin over visible GPUs)"
    )

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_count(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            if v < 1:
                raise ValueError(f"seeds must be a positive count or a list of seeds, got {v}")
            return list(range(v))
        return v

    @model_validator(mode="after")
    def _check(self) -> StudyParams:
        self.pipeline_params(self.seeds[0])  # the stages' own validation, before anything runs
        return self

    def pipeline_params(self, seed: int) -> PipelineParams:
        """The affinity arm of one seed: a pipeline job whose training stage also trains the single baseline."""
        training = dict(self.training)
        baselines = dict(training.get("baselines") or {})
        baselines.update({"single": True, "per_task": False})
        training["baselines"] = baselines
        return PipelineParams(
            model=self.model,
            quantization=self.quantization,
            tasks=self.tasks,
            groups=self.groups,
            seed=seed,
            max_train=self.max_train,
            max_val=self.max_val,
            max_test=self.max_test,
            max_length=self.max_length,
            affinity=self.affinity,
            grouping=self.grouping,
            training=training,
        )

    def arm_training_params(self, seed: int, groups: list[list[str]]) -> TrainingParams:
        """Stage 2 of a control arm (random groups, per-task): same trainer and rules, no baselines."""
        tp = self.pipeline_params(seed).training_params(groups)
        return tp.model_copy(
            update={
                "baselines": tp.baselines.model_copy(update={"single": False, "per_task": False}),
                "zero_shot": False,
            }
        )
