"""The `validate_affinity` job type: validate Stage 1's affinity against Stage-2 fine-tunes of every subset."""

from shared.jobs.job_type import JobType

JOB_TYPE = JobType(
    "validate_affinity",
    "Validate Stage 1's affinity against Stage-2 fine-tunes of every subset.",
    "shared.ml.affinity.params:ValidateAffinityParams",
    "shared.ml.affinity.validate_affinity:run_validate_affinity",
)
