"""Test-wide setup: an isolated CHORUS_HOME per session, with the converted-model cache shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Keep user tasks, artifacts and databases of a test run away from the developer's own state,
    # but reuse the converted SmolLM2 / tiny-llama cache (conversion takes ~20 s).
    home = Path(os.environ.get("CHORUS_TEST_HOME", "/tmp/chorus-test-home")) / str(os.getpid())
    os.environ["CHORUS_HOME"] = str(home)
    os.environ.setdefault("CHORUS_MODEL_CACHE_DIR", str(REPO / ".chorus" / "models"))
    from shared.config import get_settings

    get_settings.cache_clear()


def have_data() -> bool:
    """Whether the built-in datasets are where the settings say (CHORUS_DATA_DIR, default ../shared/data)."""
    from shared.config import get_settings

    return (get_settings().data_dir / "cb" / "train.jsonl").is_file()


# Tests that read the built-in datasets without a skip of their own (found by running the fast loop with
# CHORUS_DATA_DIR=/nonexistent): None marks the whole module. New tests use @pytest.mark.needs_data instead.
DATA_TESTS: dict[str, frozenset[str] | None] = {
    "test_affinity_cli.py": frozenset(
        {
            "test_affinity_contract",
            "test_approx_error_prints_mean_and_median_per_scale",
            "test_group_contract",
            "test_group_rejects_too_many_groups",
            "test_validate_estimates_from_a_meta_initialisation",
            "test_validate_estimates_prints_the_comparison",
        }
    ),
    "test_affinity_gradients.py": frozenset(
        {
            "test_a_gradients_are_zero_at_b0",
            "test_choice_f_is_the_log_odds_over_the_task_choices",
            "test_f0_is_the_full_vocabulary_log_odds_without_clipping",
            "test_hook_gradients_equal_autograd_away_from_b0",
            "test_hook_gradients_equal_per_example_autograd",
            "test_padding_does_not_change_a_rows_gradient",
            "test_projected_features_equal_explicit_P",
            "test_projection_spec_round_trip",
        }
    ),
    "test_affinity_stage.py": None,
    "test_bench_stage1_costs.py": frozenset({"test_stage1_costs_prints_rates_per_batch_size"}),
    "test_bench_training.py": frozenset({"test_training_bench_compares_the_peft_loop_with_our_trainers"}),
    "test_cli_core.py": frozenset(
        {
            "test_eval_on_tiny_model_prints_json_report",
            "test_import_reports_bad_rows",
            "test_tasks_json_lists_the_builtin_tasks_with_sizes",
        }
    ),
    "test_hot_swap.py": None,
    "test_import_formats.py": frozenset(
        {
            "test_tasks_lists_the_folders_it_skips",
        }
    ),
    "test_inference_api.py": None,
    "test_pipeline_cli.py": frozenset(
        {
            "test_pipeline_writes_the_contract_files",
            "test_report_matches_the_reference_ensemble_on_the_saved_files",
            "test_train_command_from_a_groups_file",
        }
    ),
    "test_serving_runner.py": frozenset(
        {
            "test_chunked_run_equals_offline_reference",
        }
    ),
    "test_study.py": frozenset(
        {
            "test_study_writes_the_contract_and_its_figures_recompute",
            "test_the_deployed_arm_follows_the_structure_test_and_validation",
        }
    ),
    "test_training_ensemble.py": frozenset(
        {
            "test_a_modified_manifest_is_refused",
            "test_ensemble_on_another_base_is_refused",
            "test_fingerprint_is_stable_canonical_and_weight_sensitive",
            "test_manifest_validation",
            "test_reference_scorer_combines_members_and_never_runs_zero_weights",
        }
    ),
    "test_validate_affinity.py": frozenset(
        {
            "test_cli_writes_every_contract_key",
        }
    ),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests marked needs_data (on a test, a class or a module, or listed in DATA_TESTS) are skipped at
    # collection when the built-in datasets are missing, instead of failing on the first file they open.
    for item in items:
        names = DATA_TESTS.get(item.path.name, frozenset())
        if names is None or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.needs_data)
    if have_data():
        return
    from shared.config import get_settings

    skip = pytest.mark.skip(
        reason=f"needs the built-in datasets, not found in {get_settings().data_dir} "
        "(check out ../shared/data or set CHORUS_DATA_DIR)"
    )
    for item in items:
        if item.get_closest_marker("needs_data") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base():
    """The tiny random Llama (float32, CPU) shared by fast tests. Do not leave adapters attached."""
    from shared.ml.models import Base

    return Base.load("tiny-llama", "none", "cpu")
