"""`chorus results JOB` as a user reads it: a pipeline job's per-task accuracy table and cost lines, printed as
`chorus pipeline` prints them offline; `--json` for the raw objects; every artifact under a name unique within
the job; the training stage's results.png (zero-shot / single / ensemble per task) among them.

The job API is served by uvicorn in a thread on a temporary SQLite CHORUS_HOME; the jobs run in this process
(shared.jobs.runner.run_job) on the tiny Llama."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from services.cli.main import app
from tests.bad_input_apps import auth, served_job_api

PIPELINE = {
    "model": "tiny-llama",
    "quantization": "none",
    "tasks": ["cb", "rte"],
    "groups": 2,
    "seed": 0,
    "max_train": 8,
    "max_val": 4,
    "max_test": 4,
    "max_length": 64,
    "affinity": {"dim": 8},
    "training": {"epochs": 1, "batch_size": 4, "eval_batch_size": 8, "rank": 2, "boosting": {"enabled": False}},
}
WIDE = {"COLUMNS": "200"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with served_job_api(tmp_path_factory.mktemp("results-home"), "results") as served:
        yield served


def _cli(api: dict[str, Any], *args: str) -> Any:
    env = {"CHORUS_API_URL": api["url"], "CHORUS_API_KEY": api["keys"]["submit"], **WIDE}
    return CliRunner().invoke(app, list(args), env=env)


def _job(api: dict[str, Any], job_type: str, params: dict[str, Any]) -> str:
    from shared.jobs.runner import run_job

    r = _cli(api, "submit", job_type, "--params", json.dumps(params), "--json")
    assert r.exit_code == 0, r.output
    job_id = json.loads(r.stdout)["id"]
    assert run_job(job_id)["outcome"] == "succeeded"
    return job_id


@pytest.fixture(scope="module")
def pipeline_job(api: dict[str, Any]) -> str:
    return _job(api, "pipeline", PIPELINE)


@pytest.mark.needs_data
def test_results_prints_the_accuracy_and_cost_tables(api: dict[str, Any], pipeline_job: str) -> None:
    r = _cli(api, "results", pipeline_job)
    assert r.exit_code == 0, r.output
    text = r.stdout
    assert not text.lstrip().startswith("{") and '"stages"' not in text  # tables, not a JSON dump
    report = json.loads(
        httpx.get(
            f"{api['url']}/v1/artifacts/{_artifacts(api, pipeline_job)['pipeline_report']}/content",
            headers=auth(api["keys"]["submit"]),
        ).content
    )
    header = next(line for line in text.splitlines() if "zero_shot" in line)
    assert "single" in header and "ensemble" in header
    for task in ("cb", "rte"):  # each task's row shows the report's accuracies, in %
        row = next(line for line in text.splitlines() if line.strip("│┃ ").startswith(task))
        assert (
            f"{100 * report['tasks'][task]['ensemble']:.1f}" in row
            and f"{100 * report['tasks'][task]['zero_shot']:.1f}" in row
        )
    assert "average" in text
    ratio = report["cost"]["ensemble_vs_single_flops"]
    assert "ensemble / single training compute" in text and f"{ratio:.3f}x" in text
    assert "wall time: group_adapters" in text


@pytest.mark.needs_data
def test_results_lists_every_artifact_once_under_a_unique_name(api: dict[str, Any], pipeline_job: str) -> None:
    r = _cli(api, "results", pipeline_job)
    assert r.exit_code == 0, r.output
    names = _artifacts(api, pipeline_job)
    assert {"affinity_heatmap", "groups_heatmap", "results_chart", "pipeline_report"} <= set(names)
    table = r.stdout.split("artifacts", 1)[1].splitlines()
    shown = {}
    for name, art_id in names.items():
        rows = [line for line in table if art_id in line]
        assert len(rows) == 1, (name, rows)
        shown[art_id] = rows[0].strip("│┃ ").split("│")[0].strip()
    assert sorted(shown.values()) == sorted(names) and len(set(shown.values())) == len(names)  # unique, as in the job
    png = httpx.get(f"{api['url']}/v1/artifacts/{names['results_chart']}/content", headers=auth(api["keys"]["submit"]))
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    listed = httpx.get(f"{api['url']}/v1/jobs/{pipeline_job}/artifacts", headers=auth(api["keys"]["submit"])).json()
    chart = next(a for a in listed["data"] if a["id"] == names["results_chart"])
    assert chart["stage"] == "training" and chart["filename"] == "results.png"


@pytest.mark.needs_data
def test_results_json_is_the_raw_job_and_artifacts(api: dict[str, Any], pipeline_job: str) -> None:
    r = _cli(api, "results", pipeline_job, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["job"]["id"] == pipeline_job and data["job"]["status"] == "succeeded"
    assert {a["id"] for a in data["artifacts"]} == set(data["job"]["result_artifacts"].values())


def test_results_of_a_grouping_job_prints_its_groups(api: dict[str, Any]) -> None:
    matrix = [[0.9, 0.8, 0.1, 0.2], [0.8, 0.9, 0.2, 0.1], [0.1, 0.2, 0.9, 0.8], [0.2, 0.1, 0.8, 0.9]]
    job_id = _job(api, "grouping", {"affinity": {"tasks": ["cb", "rte", "copa", "wic"], "matrix": matrix}, "groups": 2})
    r = _cli(api, "results", job_id)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    groups = sorted(line.split(": ", 1)[1] for line in lines if line.startswith("group "))
    assert groups == ["cb, rte", "copa, wic"], r.stdout
    assert "2 groups by" in r.stdout


def _artifacts(api: dict[str, Any], job_id: str) -> dict[str, str]:
    job = httpx.get(f"{api['url']}/v1/jobs/{job_id}", headers=auth(api["keys"]["submit"])).json()
    return job["result_artifacts"]


@pytest.mark.needs_data
@pytest.mark.parametrize(
    "job_type, params, expected",
    [
        (
            "evaluation",
            {"model": "tiny-llama", "tasks": ["cb", "rte"], "max_examples": 4, "batch_size": 4},
            ["macro-F1", "cb", "rte", "average"],
        ),
        (
            "affinity",
            {"model": "tiny-llama", "tasks": ["cb", "rte"], "max_train": 8, "max_val": 4, "dim": 8, "max_length": 64},
            ["T[i, j] = estimated", "neg_loss", "cb", "rte", "subsets"],
        ),
    ],
)
def test_results_of_other_job_types_print_their_offline_tables(
    api: dict[str, Any], job_type: str, params: dict[str, Any], expected: list[str]
) -> None:
    r = _cli(api, "results", _job(api, job_type, params))
    assert r.exit_code == 0, r.output
    for text in expected:
        assert text in r.stdout, (text, r.stdout)
    assert "no table for this job type" not in r.stdout
