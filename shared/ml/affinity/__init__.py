"""Stage 1: task-affinity estimation from projected LoRA gradients, and grouping (DESIGN.md §3.2-§3.5).

Entry points for the job service and the pipeline live in `shared.ml.affinity.stage`:
run_affinity, run_grouping, run_approx_error, run_validate_estimates (params in `.params`).
"""
