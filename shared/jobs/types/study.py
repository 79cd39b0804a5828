"""The `study` job type: the method against its controls (single, per-task, random groups) over seeds."""

from shared.jobs.job_type import JobType

JOB_TYPE = JobType(
    "study",
    "The method against its controls (single, per-task, random groups) over seeds.",
    "shared.ml.study.params:StudyParams",
    "shared.ml.study.run:run_study",
)
