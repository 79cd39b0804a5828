"""The job types the service knows, discovered from the modules of shared.jobs.types (one module each).

The API's request validation and /v1/job-types, the worker, the runner and bench/run_offline.py all read
JOB_TYPES. Nothing here imports the ML core (see shared.jobs.job_type).
"""

from __future__ import annotations

import importlib
import pkgutil

from shared.jobs.job_type import JobType, JobTypeUnavailable, StageFn, load_ref

__all__ = ["JOB_TYPES", "JobType", "JobTypeUnavailable", "StageFn", "discover", "get_job_type", "load_ref", "register"]


def discover(package: str = "shared.jobs.types") -> dict[str, JobType]:
    """{name: JobType} from every module of `package` that defines JOB_TYPE, in name order."""
    pkg = importlib.import_module(package)
    found: dict[str, JobType] = {}
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        job_type = getattr(importlib.import_module(f"{package}.{info.name}"), "JOB_TYPE", None)
        if not isinstance(job_type, JobType):
            raise TypeError(f"{package}.{info.name} defines no JOB_TYPE (a JobType)")
        if job_type.name in found:
            raise ValueError(f"job type {job_type.name!r} is defined twice (in {package}.{info.name})")
        found[job_type.name] = job_type
    return found


JOB_TYPES: dict[str, JobType] = discover()


def register(job_type: JobType) -> None:
    """Add a job type defined elsewhere (a plug-in package); its name must be new."""
    if job_type.name in JOB_TYPES:
        raise ValueError(f"job type {job_type.name!r} is already registered")
    JOB_TYPES[job_type.name] = job_type


def get_job_type(name: str) -> JobType:
    try:
        return JOB_TYPES[name]
    except KeyError:
        raise KeyError(f"unknown job type {name!r}; expected one of {sorted(JOB_TYPES)}") from None
