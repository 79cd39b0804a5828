"""The `pipeline` job type: affinity -> grouping -> training (adapters, boosting, ensemble, report)."""

from shared.jobs.job_type import JobType

JOB_TYPE = JobType(
    "pipeline",
    "affinity -> grouping -> training (adapters, boosting, ensemble, report).",
    "shared.ml.training.pipeline_params:PipelineParams",
    "shared.ml.training.stage:pipeline_stages",
    multi_stage=True,
)
