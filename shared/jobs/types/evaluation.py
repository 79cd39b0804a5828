"""The `evaluation` job type: evaluate a base model on tasks (loss, accuracy, macro-F1)."""

from shared.jobs.job_type import JobType

JOB_TYPE = JobType(
    "evaluation",
    "Evaluate a base model on tasks (loss, accuracy, macro-F1).",
    "shared.ml.eval_params:EvalParams",
    "shared.ml.evaluate:run_evaluation",
)
