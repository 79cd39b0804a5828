"""The `approximation_error` job type: measure the first-order approximation error of LoRA fine-tuning."""

from shared.jobs.job_type import JobType

JOB_TYPE = JobType(
    "approximation_error",
    "Measure the first-order approximation error of LoRA fine-tuning.",
    "shared.ml.affinity.params:ApproxErrorParams",
    "shared.ml.affinity.approx_error:run_approx_error",
)
