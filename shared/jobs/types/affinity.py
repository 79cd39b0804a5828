"""The `affinity` job type: estimate the task-affinity matrix from projected gradients (no fine-tuning)."""

from shared.jobs.job_type import JobType

JOB_TYPE = JobType(
    "affinity",
    "Estimate the task-affinity matrix from projected gradients (no fine-tuning).",
    "shared.ml.affinity.params:AffinityParams",
    "shared.ml.affinity.stage:run_affinity",
)
