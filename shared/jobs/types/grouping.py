"""The `grouping` job type: cluster tasks into groups from an affinity matrix (SDP, spectral fallback)."""

from shared.jobs.job_type import JobType

JOB_TYPE = JobType(
    "grouping",
    "Cluster tasks into groups from an affinity matrix (SDP, spectral fallback).",
    "shared.ml.affinity.params:GroupingParams",
    "shared.ml.affinity.stage:run_grouping",
    artifact_params=(("affinity", "affinity.json"),),
    artifact_checks=(("affinity", "shared.jobs.inputs:check_affinity"),),
)
