"""Checks of the files a job's params name (JobType.artifact_checks), run by the runner before the job's first
stage: a problem found here is the user's (the file they gave does not fit their params), whereas the same
ValueError raised later inside the stage would count as the stage failing. Each check is
check(params, path) and raises ValueError; the ML core is imported inside it, never at module import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def check_affinity(params: Any, path: Path) -> None:
    """The affinity.json of a grouping job: valid, and holding what its params ask for (the tasks, the metric,
    at least as many tasks as groups): the checks run_grouping itself makes."""
    from shared.ml.affinity.stage import grouping_matrix, read_affinity

    grouping_matrix(params, read_affinity(path), "the affinity file")
