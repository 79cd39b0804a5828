"""Parameters of the whole pipeline: affinity -> grouping -> training, with the shared knobs set once."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.ml.affinity.params import AffinityParams, GroupingParams, stage1_rows
from shared.ml.defaults import DEFAULT_MAX_LENGTH, GroupCount, TaskNames
from shared.ml.training.params import (
    AFFINITY_SECTION_DOC,
    GROUPING_SECTION_DOC,
    GROUPS_DOC,
    MAX_LENGTH_DOC,
    MODEL_DOC,
    QUANTIZATION_DOC,
    SEED_DOC,
    TASKS_DOC,
    TRAINING_SECTION_DOC,
    TrainingParams,
)


class PipelineParams(BaseModel):
    """affinity -> grouping -> training (group adapters, boosting, ensemble, evaluation).

    Shared knobs (model, quantization, tasks, seed, max_train, max_val, max_length) are set once and
    passed to every stage; `affinity` / `grouping` hold any other field of Stage 1's AffinityParams /
    GroupingParams (e.g. {"dim": 64}); `training` holds the TrainingParams fields (groups excluded).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="smollm2-135m", description=MODEL_DOC)
    quantization: Literal["none", "nf4"] = Field(default="nf4", description=QUANTIZATION_DOC)
    tasks: TaskNames = Field(description=TASKS_DOC)
    groups: GroupCount = Field(default="auto", description=GROUPS_DOC)
    seed: int = Field(default=0, description=SEED_DOC)
    max_train: int | None = Field(default=500, ge=1, description="training examples per task; None = all")
    max_val: int | None = Field(default=200, ge=1, description="validation examples per task; None = all")
    max_test: int | None = Field(default=None, ge=1, description="test examples per task; None = all")
    max_length: int = Field(default=DEFAULT_MAX_LENGTH, ge=16, le=8192, description=MAX_LENGTH_DOC)
    affinity: dict[str, Any] = Field(default_factory=dict, description=AFFINITY_SECTION_DOC)
    grouping: dict[str, Any] = Field(default_factory=dict, description=GROUPING_SECTION_DOC)
    training: dict[str, Any] = Field(default_factory=dict, description=TRAINING_SECTION_DOC)

    @model_validator(mode="after")
    def _check(self) -> PipelineParams:
        if isinstance(self.groups, int) and self.groups > len(self.tasks):
            raise ValueError(f"groups={self.groups} is more than the {len(self.tasks)} tasks")
        forbidden = {"groups", "groups_source"} & set(self.training)
        if forbidden:
            raise ValueError(f"training.{sorted(forbidden)[0]} is set by the grouping stage; use groups=M|auto")
        # Validate the stage params now, so bad input fails before anything runs.
        self.training_params([[t] for t in self.tasks])
        self.affinity_params()
        self.grouping_params()
        return self

    def _shared(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "quantization": self.quantization,
            "tasks": list(self.tasks),
            "seed": self.seed,
            "max_train": self.max_train,
            "max_val": self.max_val,
            "max_length": self.max_length,
        }

    def affinity_params(self) -> AffinityParams:
        """Stage 1 shares the model, data sizes, seed and the LoRA shape (theta0) with training."""
        shared = self._shared()
        shared["max_train"] = stage1_rows(self.max_train)  # Stage 1 runs on a subsample unless affinity.max_train
        for key in ("rank", "alpha", "targets"):
            if key in self.training:
                shared[key] = self.training[key]
        return _build(AffinityParams, shared, self.affinity, "affinity")

    def grouping_params(self) -> GroupingParams:
        shared = {"groups": self.groups, "seed": self.seed, "tasks": list(self.tasks)}
        return _build(GroupingParams, shared, self.grouping, "grouping")

    def training_params(self, groups: list[list[str]]) -> TrainingParams:
        data = {
            "model": self.model,
            "quantization": self.quantization,
            "seed": self.seed,
            "max_train": self.max_train,
            "max_val": self.max_val,
            "max_test": self.max_test,
            "max_length": self.max_length,
        }
        data.update(self.training)
        data["groups"] = groups
        return TrainingParams.model_validate(data)


def _build(cls: type[BaseModel], shared: dict[str, Any], overrides: dict[str, Any], label: str) -> Any:
    """Instantiate a Stage-1 params class with the shared knobs it declares plus explicit overrides."""
    fields = cls.model_fields
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"{label}: unknown option(s) {unknown}; {cls.__name__} accepts {sorted(fields)}")
    data = {k: v for k, v in shared.items() if k in fields}
    data.update(overrides)
    return cls.model_validate(data)
