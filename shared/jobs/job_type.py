"""What a job type is: its params class and the stage functions that run it, both named by reference.

Nothing here imports the ML core at module import time: the API validates params by importing only the
params class, and the worker imports the stage functions inside the task process (never in the
parent that forks). A module that does not exist yet makes its job type "unavailable", not a crash.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from shared.jobs.results import StageResult
from shared.ml.progress import Progress

# A stage as the runner calls it: (workdir, inputs {logical name: path}, progress) -> a StageResult, or (the
# ML core's form) a JSON-able summary with "artifacts": {logical name: path relative to workdir}, which the
# runner turns into one with StageResult.from_summary.
StageFn = Callable[[Path, dict[str, Path], Progress], dict[str, Any] | StageResult]


class JobTypeUnavailable(Exception):
    """The job type is known but its implementation cannot be imported in this deployment."""


def load_ref(ref: str) -> Any:
    """Import "package.module:attr"; JobTypeUnavailable when the module or attribute is missing."""
    module_name, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise JobTypeUnavailable(f"{module_name} is not available ({exc})") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise JobTypeUnavailable(f"{module_name} has no {attr!r}") from exc


@dataclass(frozen=True)
class JobType:
    """One kind of job. `run` is "module:function": a stage function run(params, workdir, progress)
    for single-stage types, or stages(params) -> [(name, StageFn)] when `multi_stage`."""

    name: str
    description: str
    params: str
    run: str
    multi_stage: bool = False
    # Params fields that hold an artifact id (art-...) of the job's owner; the worker copies the artifact
    # into the job's workdir under this file name and passes that path to the stage instead.
    artifact_params: tuple[tuple[str, str], ...] = ()
    # Checks of those files against the params, run before the first stage: field -> "module:function"
    # check(params, path) that raises ValueError (see shared.jobs.inputs).
    artifact_checks: tuple[tuple[str, str], ...] = ()

    def params_class(self) -> type[BaseModel]:
        cls = load_ref(self.params)
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            raise JobTypeUnavailable(f"{self.params} is not a pydantic model")
        return cls

    def validate(self, params: dict[str, Any]) -> BaseModel:
        """The validated params model (pydantic.ValidationError on bad input)."""
        return self.params_class().model_validate(params)

    def stages(self, params: BaseModel) -> list[tuple[str, StageFn]]:
        fn = load_ref(self.run)
        if self.multi_stage:
            return [(str(name), stage) for name, stage in fn(params)]

        def single(workdir: Path, inputs: dict[str, Path], progress: Progress) -> dict[str, Any] | StageResult:
            return fn(params, workdir, progress)

        return [(self.name, single)]

    def available(self) -> tuple[bool, str]:
        try:
            self.params_class()
        except JobTypeUnavailable as exc:
            return False, str(exc)
        return True, ""
