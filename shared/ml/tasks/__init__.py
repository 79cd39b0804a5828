"""Tasks: templates, answer choices and splits (built-in datasets and user imports)."""

from shared.ml.tasks.base import SPLITS, Example, Task

__all__ = ["SPLITS", "Example", "Task"]
