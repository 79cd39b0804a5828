"""Parameters of Stage 2 (group adapters, baselines, boosting, ensemble); the whole pipeline's are in
pipeline_params.py.

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

from shared.ml.defaults import DEFAULT_MAX_LENGTH, LoraTargets, known_tasks

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

# Descriptions of the knobs several params models share (the API publishes them in its schemas).
MODEL_DOC = (
    "base model: smollm2-135m, tiny-llama (a tiny random test model; tiny-llama-seedN for others), or a "
    "local Hugging Face folder (through the API only inside the operator's allowed model directories)"
)
QUANTIZATION_DOC = "base weights: nf4 (4-bit NF4, QLoRA) or none (the model's own precision)"
SEED_DOC = "seed of everything random in the run (LoRA initialisation, subsamples, shuffling)"
MAX_LENGTH_DOC = "prompt tokens at most (a longer prompt is truncated)"
TASKS_DOC = "task names, at least 2 distinct (built-in tasks or the task_name of an uploaded dataset)"
GROUPS_DOC = "number of groups M, or auto (chosen from the affinity matrix by a structure test and validation)"
AFFINITY_SECTION_DOC = (
    'Stage-1 options: any AffinityParams field (e.g. {"dim": 64}); the shared knobs above are '
    "passed to it unless set here"
)
GROUPING_SECTION_DOC = 'grouping options: any GroupingParams field but affinity (e.g. {"method": "sdp"})'
TRAINING_SECTION_DOC = (
    'Stage-2 options: any TrainingParams field but groups (e.g. {"epochs": 5}); the shared '
    "knobs above are passed to it unless set here"
)


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
        raise ValueError(f'groups file {str(p)!r} must hold {{"groups": [[task, ...], ...]}}')
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

    single: bool = Field(default=True, description="train one adapter on all the tasks (the report's single column)")
    per_task: bool = Field(default=False, description="also train one adapter per task (the per_task column)")


class BoostingOptions(BaseModel):
    """Gradient boosting of hard groups (training error = 1 - mean train accuracy over the group's tasks)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="boost the groups whose training error is above error_threshold")
    error_threshold: float = Field(
        default=0.1, ge=0.0, le=1.0, description="training error above which a group is boosted"
    )
    max_rounds: int = Field(
        default=2, ge=0, le=20, description="boosting rounds per group at most (one weak learner each)"
    )
    eta: float = Field(
        default=1.0, gt=0.0, le=10.0, description="boosting step: the weight of each weak learner's output"
    )
    lr: float | None = Field(default=2e-4, gt=0.0, description="learning rate of weak learners (None: training lr)")
    epochs: int | None = Field(default=1, ge=1, le=100, description="epochs of weak learners (None: training epochs)")
    budget: float | None = Field(
        default=None,
        ge=0.0,
        description="max boosting FLOPs as a fraction of the group adapters' training FLOPs (None = no limit); "
        "hardest groups first, a round starts only if its estimated cost fits",
    )


class EnsembleOptions(BaseModel):
    """How per-task member weights are chosen."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        default="chorus", description="the ensemble's name (1-64 of A-Z a-z 0-9 _ -, a letter or digit first)"
    )
    fit_weights: bool = Field(
        default=False,
        description="fit non-negative member weights per task on validation data "
        "(never on test); false: the default weights",
    )
    candidates: Literal["group", "all"] = Field(
        default="group", description="members a task's fitted weights may use: its group's adapters, or all of them"
    )
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

    model: str = Field(default="smollm2-135m", description=MODEL_DOC)
    quantization: Literal["none", "nf4"] = Field(default="nf4", description=QUANTIZATION_DOC)
    groups: list[list[str]] | str | None = Field(
        default=None,
        description="the groups to train, one adapter each: lists of task names (a task in one group "
        "only), or a groups.json (through the API: the artifact id of one)",
    )
    groups_source: str | None = Field(default=None, description="the groups.json the lists were read from, if any")
    epochs: int = Field(
        default=3,
        ge=1,
        le=100,
        description="training epochs per adapter (the best epoch by mean validation accuracy is kept)",
    )
    lr: float = Field(default=5e-4, gt=0.0, le=1.0, description="AdamW learning rate")
    batch_size: int = Field(default=8, ge=1, le=1024, description="training rows per batch")
    eval_batch_size: int = Field(default=32, ge=1, le=4096, description="rows per scoring batch (validation and test)")
    rank: int = Field(default=4, ge=1, le=256, description="LoRA rank r")
    alpha: float | None = Field(default=None, gt=0.0, description="LoRA alpha (default 8 * rank)")
    targets: LoraTargets = Field(description="modules the LoRA adapters wrap (default q_proj, k_proj, v_proj)")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="LoRA dropout")
    weight_decay: float = Field(default=0.0, ge=0.0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(default=1.0, gt=0.0, description="gradient clipping norm; None = no clipping")
    max_train: int | None = Field(default=500, ge=1, description="training examples per task (stratified); None = all")
    max_val: int | None = Field(default=200, ge=1, description="validation examples per task; None = all")
    max_test: int | None = Field(default=None, ge=1, description="test examples per task")
    patience: int | None = Field(
        default=2, ge=0, description="epochs without improvement before stopping; 0/None = off"
    )
    seed: int = Field(default=0, description=SEED_DOC)
    max_length: int = Field(default=DEFAULT_MAX_LENGTH, ge=16, le=8192, description=MAX_LENGTH_DOC)
    trainer: Literal["multi", "sequential"] = Field(
        default="multi",
        description="multi: the group adapters and baselines train together in one fused run; "
        "sequential: one after the other (same results up to float noise)",
    )
    # Default "mixed": on the H200 (8 tasks of set 1, 2 epochs, batch 32) one task per batch reached 75.3 % validation
    # accuracy for the all-task adapter and mixed batches 81.8 % (a plain PEFT loop, whose batches mix tasks: 79.6 %).
    batching: Literal["task", "mixed", "length"] = Field(
        default="mixed",
        description="task: one task per batch, tasks interleaved; mixed: rows of all tasks shuffled together (a plain "
        "training loop's batches); length: tasks mixed, length-sorted batches capped by batch_tokens (less padding)",
    )
    batch_tokens: int | None = Field(
        default=None, ge=16, le=2**24, description="padded tokens per batch at most (length batching); None = no cap"
    )
    step_rows: int | None = Field(
        default=None,
        ge=1,
        description="rows per fused forward/backward at most (multi "
        "trainer; a larger step is split into micro-steps, same results); None = no cap",
    )
    step_tokens: int | None = Field(
        default=None, ge=16, le=2**24, description="padded tokens per fused forward/backward at most; None = no cap"
    )
    dequantize: Literal["auto", "cached", "per_call"] = Field(
        default="auto",
        description="4-bit base during training: cached = each NF4 layer dequantised once (compute dtype) and used by "
        "plain matmuls; per_call = bitsandbytes dequantises in every forward and backward; auto = cached "
        "when the copies take at most a quarter of the device's free memory",
    )
    baselines: BaselineOptions = Field(default_factory=BaselineOptions, description=BaselineOptions.__doc__)
    boosting: BoostingOptions = Field(default_factory=BoostingOptions, description=BoostingOptions.__doc__)
    ensemble: EnsembleOptions = Field(default_factory=EnsembleOptions, description=EnsembleOptions.__doc__)
    zero_shot: bool = Field(
        default=True, description="also evaluate the base model without adapter (the report's zero_shot column)"
    )
    evaluate_test: bool = Field(default=True, description="evaluate on the test splits (false: validation only)")

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
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "alpha": self.lora_alpha,
            "targets": list(self.targets),
            "dropout": self.dropout,
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "max_train": self.max_train,
            "max_val": self.max_val,
            "patience": self.patience,
            "seed": self.seed,
            "max_length": self.max_length,
            "optimizer": "adamw",
            "quantization": self.quantization,
        }
