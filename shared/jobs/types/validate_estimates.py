"""The `validate_estimates` job type: compare estimated subset performance with real fine-tunes."""

from shared.jobs.job_type import JobType

JOB_TYPE = JobType(
    "validate_estimates",
    "Compare estimated subset performance with real fine-tunes.",
    "shared.ml.affinity.params:ValidateParams",
    "shared.ml.affinity.validate:run_validate_estimates",
)
