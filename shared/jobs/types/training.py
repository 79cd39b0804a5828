"""The `training` job type: train group adapters, boost, and build the ensemble."""

from shared.jobs.job_type import JobType

JOB_TYPE = JobType(
    "training",
    "Train group adapters, boost, and build the ensemble.",
    "shared.ml.training.params:TrainingParams",
    "shared.ml.training.stage:run_training",
)
