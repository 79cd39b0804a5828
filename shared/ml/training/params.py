"""Parameters of Stage 2 (group adapters, baselines, boosting, ensemble) and of the whole pipeline.

Every knob and seed is a field, so a job's params reproduce its artifacts. `groups` may be given as a
list of task lists or as the path of a `groups.json` (it is read at validation time and the explicit
lists are kept, with the path in `groups_source`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.ml.defaults import DEFAULT_MAX_LENGTH, GroupCount, LoraTargets, TaskNames, known_tasks

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def read_groups_file(path: str | Path) -> list[list[str]]:
    """The `groups` lists of a groups.json ({"groups": [[task, ...], ...], ...}) or of a bare list."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"groups file {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"groups file {str(p)!r} is not valid JSON: {exc}") from exc
    groups = data.get("groups") if isinstance(data, dict) else data
    if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
        raise ValueError(f"groups file {str(p)!r} must hold {{\"groups\": [[task, ...], ...]}}")
    return groups


def validate_groups(groups: list[list[str]]) -> list[list[str]]:
    if not groups:
        raise ValueError("groups must hold at least one group")
    out: list[list[str]] = []
    seen: dict[str, int] = {}
    for i, group in enumerate(groups):
        if not group:
            raise ValueError(f"group {i} is empty")
        if not all(isinstance(t, str) for t in group):
            raise ValueError(f"group {i} must be a list of task names, got {group!r}")
        names = known_tasks(group)
        for t in names:
            if t in seen:
                raise ValueError(f"task {t!r} is in group {seen[t]} and group {i}; a task belongs to one group")
            seen[t] = i
        out.append(names)
    return out


class BaselineOptions(BaseModel):
    """Baselines trained with the same trainer and data: one all-task adapter, and one adapter per task."""

    model_config = ConfigDict(extra="forbid")

    single: bool = True
    per_task: bool = False


class BoostingOptions(BaseModel):
    """Gradient boosting of hard groups (training error = 1 - mean train accuracy over the group's tasks)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    error_threshold: float = Field(default=0.1, ge=0.0, le=1.0)
    max_rounds: int = Field(default=2, ge=0, le=20)
    eta: float = Field(default=1.0, gt=0.0, le=10.0)
    lr: float | None = Field(default=2e-4, gt=0.0, description="learning rate of weak learners (None: training lr)")
    epochs: int | None = Field(default=1, ge=1, le=100, description="epochs of weak learners (None: training epochs)")
    budget: float | None = Field(
        default=None, ge=0.0,
        description="max boosting FLOPs as a fraction of the group adapters' training FLOPs (None = no limit); "
                    "hardest groups first, a round starts only if its estimated cost fits",
    )


class EnsembleOptions(BaseModel):
    """How per-task member weights are chosen."""

    model_config = ConfigDict(extra="forbid")

    name: str = "chorus"
    fit_weights: bool = False  # fit non-negative weights per task on validation data (never on test)
    candidates: Literal["group", "all"] = "group"  # members a task's weights may use when fitting
    l2: float = Field(default=0.01, ge=0.0, description="pull of fitted weights towards the default weights")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.fullmatch(v):
            raise ValueError(f"ensemble name {v!r} must match {NAME_RE.pattern}")
        return v


class TrainingParams(BaseModel):
    """Stage 2: one adapter per group on a 4-bit base (QLoRA), baselines, boosting, ensemble, evaluation."""

    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2-135m"
    quantization: Literal["none", "nf4"] = "nf4"
    groups: list[list[str]] | str | None = None  # lists of tasks, or a groups.json path (read at validation)
    groups_source: str | None = None  # the groups.json the lists were read from, if any
    epochs: int = Field(default=3, ge=1, le=100)
    lr: float = Field(default=5e-4, gt=0.0, le=1.0)
    batch_size: int = Field(default=8, ge=1, le=1024)
    eval_batch_size: int = Field(default=32, ge=1, le=4096)
    rank: int = Field(default=4, ge=1, le=256)
    alpha: float | None = Field(default=None, gt=0.0, description="LoRA alpha (default 8 * rank)")
    targets: LoraTargets
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    max_train: int | None = Field(default=500, ge=1, description="training examples per task (stratified); None = all")
    max_val: int | None = Field(default=200, ge=1, description="validation examples per task; None = all")
    max_test: int | None = Field(default=None, ge=1, description="test examples per task")
    patience: int | None = Field(default=2, ge=0, description="epochs without improvement before stopping; 0/None = off")
    seed: int = 0
    max_length: int = Field(default=DEFAULT_MAX_LENGTH, ge=16, le=8192)
    trainer: Literal["multi", "sequential"] = Field(
        default="multi", description="multi: the group adapters and baselines train together in one fused run; "
                                     "sequential: one after the other (same results up to float noise)")
    batching: Literal["task", "length"] = Field(
        default="task", description="task: one task per batch, tasks interleaved; length: tasks mixed, "
                                    "length-sorted batches capped by batch_tokens (less padding)")
    batch_tokens: int | None = Field(default=None, ge=16, le=2**24,
                                     description="padded tokens per batch at most (length batching); None = no cap")
    step_rows: int | None = Field(default=None, ge=1, description="rows per fused forward/backward at most (multi "
                                  "trainer; a larger step is split into micro-steps, same results); None = no cap")
    step_tokens: int | None = Field(default=None, ge=16, le=2**24,
                                    description="padded tokens per fused forward/backward at most; None = no cap")
    baselines: BaselineOptions = Field(default_factory=BaselineOptions)
    boosting: BoostingOptions = Field(default_factory=BoostingOptions)
    ensemble: EnsembleOptions = Field(default_factory=EnsembleOptions)
    zero_shot: bool = True  # evaluate the base model without adapter (report column zero_shot)
    evaluate_test: bool = True

    @field_validator("groups", mode="before")
    @classmethod
    def _groups_from_path(cls, v: Any) -> Any:
        if isinstance(v, (str, Path)):
            if isinstance(v, str) and v.startswith("art-"):
                return v  # an artifact id: the job worker replaces it with the file's path before running
            return read_groups_file(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _remember_source(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("groups"), (str, Path)) and not data.get("groups_source"):
            data = dict(data)
            data["groups_source"] = str(data["groups"])
        return data

    @field_validator("groups")
    @classmethod
    def _groups_valid(cls, v: list[list[str]] | str | None) -> list[list[str]] | str | None:
        return v if v is None or isinstance(v, str) else validate_groups(v)

    def resolved(self) -> TrainingParams:
        """These params with `groups` as explicit lists (reading a groups.json path given as a string)."""
        if isinstance(self.groups, str):
            return TrainingParams.model_validate({**self.model_dump(), "groups": self.groups})
        return self

    @property
    def lora_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 8.0 * self.rank

    def group_lists(self) -> list[list[str]]:
        if isinstance(self.groups, str):
            return self.resolved().group_lists()
        if not self.groups:
            raise ValueError("no groups given: pass groups (lists of tasks) or the path of a groups.json")
        return [list(g) for g in self.groups]

    def all_tasks(self) -> list[str]:
        if isinstance(self.groups, str):
            return self.resolved().all_tasks()
        if not self.groups:
            raise ValueError("no groups given: pass groups (lists of tasks) or the path of a groups.json")
        return [t for g in self.groups for t in g]

    def hyperparameters(self) -> dict[str, Any]:
        """The knobs recorded in every adapter's metadata."""
        return {
            "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "rank": self.rank,
            "alpha": self.lora_alpha, "targets": list(self.targets), "dropout": self.dropout,
            "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm, "max_train": self.max_train,
            "max_val": self.max_val, "patience": self.patience, "seed": self.seed, "max_length": self.max_length,
            "optimizer": "adamw", "quantization": self.quantization,
        }


# ---------------------------------------------------------------------------------- pipeline


class PipelineParams(BaseModel):
    """affinity -> grouping -> training (group adapters, boosting, ensemble, evaluation).

    Shared knobs (model, quantization, tasks, seed, max_train, max_val, max_length) are set once and
    passed to every stage; `affinity` / `grouping` hold any other field of Stage 1's AffinityParams /
    GroupingParams (e.g. {"dim": 64}); `training` holds the TrainingParams fields (groups excluded).
    """

    model_config = ConfigDict(extra="forbid")

    model: str = "smollm2-135m"
    quantization: Literal["none", "nf4"] = "nf4"
    tasks: TaskNames
    groups: GroupCount = "auto"
    seed: int = 0
    max_train: int | None = Field(default=500, ge=1, description="training examples per task; None = all")
    max_val: int | None = Field(default=200, ge=1, description="validation examples per task; None = all")
    max_test: int | None = Field(default=None, ge=1, description="test examples per task; None = all")
    max_length: int = Field(default=DEFAULT_MAX_LENGTH, ge=16, le=8192)
    affinity: dict[str, Any] = Field(default_factory=dict)
    grouping: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)

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
            "model": self.model, "quantization": self.quantization, "tasks": list(self.tasks), "seed": self.seed,
            "max_train": self.max_train, "max_val": self.max_val, "max_length": self.max_length,
        }

    def affinity_params(self) -> Any:
        """Stage 1 shares the model, data sizes, seed and the LoRA shape (theta0) with training."""
        from shared.ml.affinity.params import AffinityParams

        shared = self._shared()
        for key in ("rank", "alpha", "targets"):
            if key in self.training:
                shared[key] = self.training[key]
        return _build(AffinityParams, shared, self.affinity, "affinity")

    def grouping_params(self) -> Any:
        from shared.ml.affinity.params import GroupingParams

        shared = {"groups": self.groups, "seed": self.seed, "tasks": list(self.tasks)}
        return _build(GroupingParams, shared, self.grouping, "grouping")

    def training_params(self, groups: list[list[str]]) -> TrainingParams:
        data = {
            "model": self.model, "quantization": self.quantization, "seed": self.seed, "max_train": self.max_train,
            "max_val": self.max_val, "max_test": self.max_test, "max_length": self.max_length,
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
