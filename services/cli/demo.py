"""`chorus demo`: the main job end to end over HTTP, on the embedded defaults and real data.

It starts the stack (API + worker + inference service, SQLite + a serverless broker), submits a
pipeline job over HTTP, follows its progress, prints the groups, the heatmap and chart paths and the
accuracy and cost tables, then loads the resulting ensemble into the inference service and classifies a few test
examples of each task. Everything is stopped at the end.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()

# Six real datasets with short texts (sentiment, subjectivity, opinion polarity, irony) whose prompts are
# short enough to fine-tune SmolLM2 on 2 CPU cores within the demo's time budget.
DEMO_TASKS = "sst2,mr,cr,subj,mpqa,tweet_irony"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the stack exited early with status {proc.returncode}")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    raise RuntimeError(f"{url} did not become healthy within {timeout:.0f} s")


def demo_params(tasks: list[str], max_train: int, epochs: int) -> dict[str, Any]:
    """The pipeline job the demo submits: every knob explicit, so the run is reproducible."""
    return {
        "model": "smollm2-135m",
        "quantization": "none",  # fp32 on CPU is faster than 4-bit kernels; the GPU worker uses nf4
        "tasks": tasks,
        "groups": "auto",
        "seed": 0,
        "max_train": max_train,
        "max_val": 20,
        "max_test": 24,
        "max_length": 128,
        "affinity": {"dim": 200, "init": "meta"},
        # A few rows per task leave a 2-task group adapter ~8 steps an epoch: at lr 5e-4 and batch 8 the group
        # adapters under-fit, so the demo takes small steps at twice the rate. Boosting within 0.4x of the group
        # adapters' FLOPs (one round of the hardest group) keeps a fresh clone's `make demo` under 10 minutes on 2
        # CPU cores; the GPU defaults allow two rounds per group.
        "training": {
            "epochs": epochs,
            "lr": 1e-3,
            "batch_size": 4,
            "patience": 1,
            "boosting": {"max_rounds": 1, "budget": 0.4},
        },
    }


def _classify_examples(inference_url: str, key: str, ensemble_id: str, tasks: list[str], per_task: int) -> None:
    import httpx

    from shared.ml.data import subsample
    from shared.ml.tasks.registry import get_task

    headers = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"{inference_url}/v1/ensembles/{ensemble_id}/load", headers=headers, timeout=600)
    if r.status_code != 200:
        raise RuntimeError(f"loading ensemble {ensemble_id} failed: {r.status_code} {r.text}")
    rows: list[dict[str, Any]] = []
    gold: list[str] = []
    for name in tasks:
        task = get_task(name)
        for ex in subsample(task.split("test"), per_task, seed=0):
            rows.append({"task": name, "fields": ex.fields})
            gold.append((task.label_names or task.choices)[ex.label])
    r = httpx.post(
        f"{inference_url}/v1/ensembles/{ensemble_id}/classify", json={"rows": rows}, headers=headers, timeout=600
    )
    if r.status_code != 200:
        raise RuntimeError(f"classify failed: {r.status_code} {r.text}")
    body = r.json()
    table = Table(
        "task", "text", "predicted", "p", "gold", title=f"inference service, ensemble {body['fingerprint'][:12]}"
    )
    for row, result, label in zip(rows, body["results"], gold, strict=True):
        text = " ".join(str(v) for v in row["fields"].values())
        table.add_row(
            row["task"],
            text[:60] + ("…" if len(text) > 60 else ""),
            result["label"],
            f"{result['probabilities'][result['label']]:.2f}",
            label,
            style="green" if result["label"] == label else "red",
        )
    console.print(table)


def demo_command(
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks (at least 2).")] = DEMO_TASKS,
    max_train: Annotated[int, typer.Option(help="Training examples per task.")] = 16,
    epochs: Annotated[int, typer.Option(help="Epochs per adapter.")] = 2,
    examples: Annotated[int, typer.Option(help="Test examples per task sent to the inference service.")] = 3,
    job_id: Annotated[
        str | None, typer.Option("--job", help="Show and serve an earlier demo job instead of submitting one.")
    ] = None,
) -> None:
    """Run the whole service end to end on real data: submit a pipeline job over HTTP, follow it, serve it."""
    from services.cli.jobs import follow_job
    from services.cli.tables import print_report
    from services.client import Client

    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    api_port, inference_port = _free_port(), _free_port()
    key = "chorus_demo_" + secrets.token_hex(16)
    # The inference service refuses adapters trained on another base or quantization, so it loads the
    # base exactly as the demo job trains it (fp32 on CPU; on a GPU worker both would be nf4).
    env = dict(
        os.environ,
        CHORUS_ADMIN_KEY=key,
        CHORUS_INFERENCE_MODEL="smollm2-135m",
        CHORUS_INFERENCE_QUANTIZATION=demo_params([], 0, 0)["quantization"],
    )
    api_url, inference_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{inference_port}"
    console.rule("[bold]chorus demo")
    console.print(f"starting the stack: API {api_url}, inference {inference_url} (embedded SQLite + broker)")
    stack = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli.main",
            "up",
            "--port",
            str(api_port),
            "--inference-port",
            str(inference_port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started = time.perf_counter()
    try:
        _wait_healthy(f"{api_url}/health", stack)
        with Client(api_url, key, timeout=60) as client:
            if job_id is None:
                job = client.create_job("pipeline", demo_params(task_list, max_train, epochs))
                console.print(f"submitted pipeline job [bold]{job['id']}[/] on {', '.join(task_list)}")
                job_id = job["id"]
            job = follow_job(client, job_id)
            task_list = job["params"]["tasks"]
            if job["status"] != "succeeded":
                console.print(f"[red]job {job['status']}:[/] {job.get('error')}")
                raise typer.Exit(1)
            out = Path(os.environ.get("CHORUS_HOME", ".chorus")) / "demo" / job["id"]
            files = client.download_results(job["id"], out)
            ensembles = client.list_ensembles(job["id"])
        import json

        groups = json.loads(Path(files["groups"]).read_text())["groups"]
        console.print("groups: " + "  |  ".join("{" + ", ".join(g) + "}" for g in groups))
        console.print(f"groups heatmap: {files['groups_heatmap']}; results chart: {files['results_chart']}")
        print_report(json.loads(Path(files["pipeline_report"]).read_text()))  # as `chorus results JOB` prints it
        _wait_healthy(f"{inference_url}/health", stack)
        _classify_examples(inference_url, key, ensembles[0]["id"], task_list, examples)
        console.print(f"results in {out}; demo took {time.perf_counter() - started:.0f} s")
    finally:
        os.killpg(stack.pid, signal.SIGTERM)
        try:
            stack.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(stack.pid, signal.SIGKILL)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
