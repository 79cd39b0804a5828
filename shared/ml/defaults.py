"""Torch-free constants and field types shared by the ML core and by params classes the API validates
without torch."""

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

DEFAULT_MAX_LENGTH = 256
# Training rows per task that Stage 1 uses (its meta fine-tune and gradient pass), a subsample of max_train.
# Measured on the H200 (README "Does the method earn its keep?", 3 seeds per set): with the first-order (linear)
# estimate on 150 rows per task, Stage 1 costs 0.18-0.20x of the single adapter's training FLOPs (1000 rows,
# 3 epochs); its groups scored single +2.55 [+0.77, +4.15] / +4.55 [+1.75, +7.32] points, but against the best
# control (random groups / per-task) only +0.83 [-1.03, +2.53] / +1.59 [-1.08, +4.50], not significant.
STAGE1_TRAIN_ROWS = 150
QUANTIZATIONS = ("none", "nf4")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")

_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _module_names(v: list[str]) -> list[str]:
    for t in v:
        if not _MODULE_NAME.fullmatch(t):
            raise ValueError(f"LoRA target {t!r} is not a module name")
    return v


# The LoRA target modules of a params class (at least one; each a plain module name).
LoraTargets = Annotated[
    list[str], Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1), AfterValidator(_module_names)
]


def _positive_groups(v: int | str) -> int | str:
    if isinstance(v, int) and v < 1:
        raise ValueError(f"groups must be a positive number of groups or 'auto', got {v}")
    return v


# How many groups to form: a positive number, or "auto" (chosen from the affinity matrix).
GroupCount = Annotated[int | Literal["auto"], AfterValidator(_positive_groups)]


def known_tasks(names: list[str]) -> list[str]:
    """Canonical task names through the registry (clear error for an unknown task)."""
    from shared.ml.tasks.registry import parse_task_list

    return list(parse_task_list(",".join(names)))


def _distinct_tasks(v: list[str]) -> list[str]:
    names = known_tasks(v)
    if len(set(names)) != len(names) or len(names) != len(v):
        raise ValueError(f"tasks must be distinct, got {v}")
    if len(names) < 2:
        raise ValueError(f"need at least 2 tasks, got {names}")
    return names


def _distinct_seeds(v: list[int]) -> list[int]:
    if len(set(v)) != len(v) or any(s < 0 for s in v):
        raise ValueError(f"seeds must be distinct non-negative integers, got {v}")
    return v


# At least two distinct task names, canonicalised through the task registry.
TaskNames = Annotated[list[str], AfterValidator(_distinct_tasks)]
# Distinct non-negative seeds (at least one).
Seeds = Annotated[list[int], Field(min_length=1), AfterValidator(_distinct_seeds)]
