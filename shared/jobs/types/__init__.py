"""One module per job type, each defining `JOB_TYPE` (a shared.jobs.job_type.JobType).

The registry (shared.jobs.registry) is built from the modules of this package: adding a job type is adding
one module here (its params model and stage functions live in the ML core and are named by reference).
"""
