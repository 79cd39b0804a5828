"""The CLI as a user meets it: the job commands reach the API given by --api-url/--api-key (or
CHORUS_API_URL/CHORUS_API_KEY, named in --help), help shows option choices and flags as they are typed and
keeps brackets, `jobs --json` prints the API's list, and `up` starts the inference service on the model asked
for and prints where it answers.

The job commands run (typer's CliRunner) against the real API served by uvicorn in a thread, on a temporary
SQLite CHORUS_HOME; submitted jobs go to the embedded broker, which nothing consumes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest
from typer.testing import CliRunner

from services.cli.main import app
from tests.bad_input_apps import served_job_api
from tests.integration.conftest import wait_for

AFFINITY = {
    "tasks": ["cb", "rte", "copa", "wic"],
    "matrix": [[0.9, 0.8, 0.1, 0.2], [0.8, 0.9, 0.2, 0.1], [0.1, 0.2, 0.9, 0.8], [0.2, 0.1, 0.8, 0.9]],
}
GROUPING = json.dumps({"affinity": AFFINITY, "groups": 2, "method": "sdp"})
NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing answers HTTP there
WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with served_job_api(tmp_path_factory.mktemp("cli-home"), "cli") as served:
        yield served


def _run(*args: str, env: dict[str, str] | None = None) -> Any:
    # CHORUS_API_URL / CHORUS_API_KEY of the caller's environment must not leak into the test
    base = {"CHORUS_API_URL": NOWHERE, "CHORUS_API_KEY": "chorus_not_a_key", **WIDE}
    return CliRunner().invoke(app, list(args), env={**base, **(env or {})})


# -- the job commands --------------------------------------------------------------------------------
def test_options_choose_the_api_and_key_over_the_environment(api: dict[str, Any]) -> None:
    where = ["--api-url", api["url"], "--api-key", api["keys"]["submit"]]
    r = _run("submit", "grouping", "--params", GROUPING, "--json", *where)
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    assert job["type"] == "grouping" and job["status"] == "queued"
    r = _run("jobs", "--json", "--type", "grouping", *where)
    assert r.exit_code == 0, r.output
    page = json.loads(r.stdout)
    assert page["object"] == "list" and job["id"] in [j["id"] for j in page["data"]]
    r = _run("status", job["id"], "--json", *where)
    assert r.exit_code == 0 and json.loads(r.stdout)["id"] == job["id"], r.output
    r = _run("cancel", job["id"], *where)
    assert r.exit_code == 0 and "cancelled" in r.stdout, r.output
    r = _run("results", job["id"], "--json", *where)
    assert r.exit_code == 0 and json.loads(r.stdout)["job"]["status"] == "cancelled", r.output


def test_the_environment_is_used_without_options(api: dict[str, Any]) -> None:
    env = {"CHORUS_API_URL": api["url"], "CHORUS_API_KEY": api["keys"]["submit"]}
    r = _run("jobs", "--json", env=env)
    assert r.exit_code == 0 and json.loads(r.stdout)["object"] == "list", r.output
    r = _run("jobs", "--json", "--api-key", "chorus_wrong", env=env)
    assert r.exit_code == 2 and "unauthorized" in r.output
    r = _run("jobs")  # both from the fixture's environment: nothing answers there
    assert r.exit_code == 2 and f"cannot reach the API at {NOWHERE}" in r.output


def test_jobs_checks_its_options_before_calling_the_api(api: dict[str, Any]) -> None:
    r = _run("jobs", "--status", "done", "--api-url", api["url"], "--api-key", api["keys"]["submit"])
    assert r.exit_code == 2 and "queued" in r.output  # the choices are checked (and listed) by the CLI
    r = _run("jobs", "--limit", "500", "--api-url", api["url"], "--api-key", api["keys"]["submit"])
    assert r.exit_code == 2 and "--limit" in r.output and "100" in r.output


# -- help --------------------------------------------------------------------------------------------
def _commands() -> list[list[str]]:
    import typer

    group = typer.main.get_command(app)
    out: list[list[str]] = []

    def walk(cmd: Any, path: list[str]) -> None:
        out.append(path)
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, [*path, name])

    walk(group, [])
    return out


def test_help_names_the_env_vars_and_never_shows_their_values() -> None:
    for command in ("submit", "jobs", "status", "cancel", "results"):
        r = _run(command, "--help", env={"CHORUS_API_KEY": "chorus_sekrit_value"})
        assert r.exit_code == 0, r.output
        text = " ".join(r.output.split())
        assert "--api-url" in text and "--api-key" in text, command
        assert "CHORUS_API_URL" in text and "CHORUS_API_KEY" in text, command
        assert "chorus_sekrit_value" not in r.output


def test_help_shows_choices_flags_and_brackets_as_typed() -> None:
    commands = _commands()
    assert len(commands) > 20
    for path in commands:
        r = _run(*path, "--help")
        assert r.exit_code == 0, (path, r.output)
        assert "<bool>" not in r.output, path  # flags are shown as flags
    train = " ".join(_run("train", "--help").output.split())
    assert "<none|nf4>" in train and "<group|all>" in train
    assert '{"groups": [[task, ...], ...]}' in train  # not eaten as rich markup
    assert re.search(r"--single\s+--no-single\s+Train the single", train)
    assert "<none|nf4>" in " ".join(_run("up", "--help").output.split())
    assert "<forward|linear>" in " ".join(_run("affinity", "--help").output.split())
    assert "<queued|running|succeeded|failed|cancelled>" in " ".join(_run("jobs", "--help").output.split())


def test_cli_choices_are_the_params_models_choices() -> None:
    from services.cli import common
    from shared.ml.affinity.params import AffinityParams, ApproxErrorParams, GroupingParams
    from shared.ml.training.params import EnsembleOptions, TrainingParams

    pairs = [
        (common.Quantization, TrainingParams, "quantization"),
        (common.Device, AffinityParams, "device"),
        (common.Precision, ApproxErrorParams, "precision"),
        (common.Output, AffinityParams, "output"),
        (common.Init, AffinityParams, "init"),
        (common.LamScale, AffinityParams, "lam_scale"),
        (common.Mode, AffinityParams, "mode"),
        (common.Backmap, AffinityParams, "backmap"),
        (common.AffinityMetric, AffinityParams, "metric"),
        (common.GroupingMethod, GroupingParams, "method"),
        (common.Candidates, EnsembleOptions, "candidates"),
    ]
    for alias, model, field in pairs:
        assert set(get_args(alias)) == set(get_args(model.model_fields[field].annotation)), field
    from services.cli.jobs import JobStatus
    from shared.db.models import JOB_STATUSES

    assert get_args(JobStatus) == JOB_STATUSES


def test_errors_are_printed_as_written(tmp_path: Path) -> None:
    groups = tmp_path / "groups.json"
    groups.write_text('{"not_groups": 1}')
    r = _run("train", "--groups", str(groups), "--out", str(tmp_path / "out"))
    assert r.exit_code == 2 and '{"groups": [[task, ...], ...]}' in " ".join(r.output.split()), r.output


# -- up ----------------------------------------------------------------------------------------------
def test_up_plans_the_inference_service_on_the_model_asked_for() -> None:
    from services.cli.jobs import up_plan

    commands, env, lines = up_plan("0.0.0.0", 8100, 8101, True, "tiny-llama", "none")
    assert set(commands) == {"api", "worker", "inference"}
    assert env["CHORUS_INFERENCE_MODEL"] == "tiny-llama" and env["CHORUS_INFERENCE_QUANTIZATION"] == "none"
    assert any("http://127.0.0.1:8101" in line and "tiny-llama" in line for line in lines), lines
    commands, env, lines = up_plan("127.0.0.1", 8100, 8101, False)
    assert set(commands) == {"api", "worker"} and len(lines) == 1
    r = _run("up", "--no-inference", "--inference-model", "tiny-llama")
    assert r.exit_code == 2 and "--inference-model" in r.output


def test_up_serves_the_inference_model_and_prints_its_url(tmp_path: Path) -> None:
    """The real `chorus up`: API, worker and inference service (tiny-llama, CPU) as subprocesses."""
    api_port, inference_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "CHORUS_ADMIN_KEY")}
    env.update(CHORUS_HOME=str(tmp_path / "home"), CHORUS_INFERENCE_DEVICE="cpu", CHORUS_API_URL=NOWHERE)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "up",
            "--port",
            str(api_port),
            "--inference-port",
            str(inference_port),
            "--inference-model",
            "tiny-llama",
            "--inference-quantization",
            "none",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        url = f"http://127.0.0.1:{inference_port}"
        wait_for(lambda: any(url in line for line in lines) or proc.poll() is not None, 120, 0.2, "the URL lines")
        assert any(url in line and "tiny-llama" in line for line in lines), lines
        assert any(f"http://127.0.0.1:{api_port}" in line for line in lines), lines

        def health() -> Any:
            try:
                r = httpx.get(f"{url}/health", timeout=2)
            except httpx.HTTPError:
                return None if proc.poll() is None else {"exited": proc.returncode}
            return r.json() if r.status_code == 200 else None

        body = wait_for(health, 300, 0.5, "the inference service")
        assert body.get("base", {}).get("base_model") == "tiny-llama", (body, lines)
        assert httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=5).json()["status"] == "ok"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
