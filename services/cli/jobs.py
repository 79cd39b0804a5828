"""Service and job commands: api, worker, up, migrate, keys, submit, jobs, status, cancel, results.

`api`, `worker` and `up` run the services (embedded SQLite + SQLAlchemy broker by default; DATABASE_URL
and BROKER_URL switch to PostgreSQL and Redis). The job commands talk to the API over HTTP: --api-url and
--api-key, or CHORUS_API_URL and CHORUS_API_KEY.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.cli.common import Quantization, fail
from shared.ml.progress import LOG_INTERVAL, ConsoleProgress, JobPercent

console = Console()
err_console = Console(stderr=True)
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
keys_app = typer.Typer(help="Manage API keys (directly in the database; run on the server).", no_args_is_help=True)


DEFAULT_API_URL = "http://127.0.0.1:8000"  # services.client.DEFAULT_URL (not imported: keeps --help light)
# Where the job commands find the API; typer reads the environment variables when the options are not given.
ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api-url",
        envvar="CHORUS_API_URL",
        show_default=False,
        help=f"Base URL of the job API [default: {DEFAULT_API_URL}].",
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="CHORUS_API_KEY",
        show_default=False,
        help="An API key (submit scope); prefer the environment variable, a command line is visible to other users.",
    ),
]


def _client(api_url: str | None = None, api_key: str | None = None):
    from services.client import Client

    return Client(api_url, api_key)


def _call(fn, *args, **kwargs):
    """Run a client call, turning API and connection errors into a clean CLI error."""
    import httpx

    from services.client import ChorusError

    try:
        return fn(*args, **kwargs)
    except ChorusError as exc:
        fail(f"{exc.code}: {exc.message}" + (f" (param: {exc.param})" if exc.param else ""))
    except httpx.HTTPError as exc:
        url = getattr(getattr(fn, "__self__", None), "base_url", None) or os.environ.get(
            "CHORUS_API_URL", DEFAULT_API_URL
        )
        fail(f"cannot reach the API at {url}: {exc}")


# -- services ----------------------------------------------------------------------------------------
def bootstrap_admin_key() -> Path | None:
    """Create the first admin key unless one exists or CHORUS_ADMIN_KEY is set. The secret goes to a file
    readable by this user only (CHORUS_ADMIN_KEY_FILE, default CHORUS_HOME/admin-key), never to the logs;
    only the file's path is printed. Returns that path when a key was created."""
    from services.cli.admin_key import admin_key_path, write_secret
    from shared.db.keys import ensure_admin_key
    from shared.db.session import get_sessionmaker
    from shared.jobs.config import get_service_settings

    with get_sessionmaker()() as session:
        plaintext = ensure_admin_key(session, get_service_settings().admin_key)
    if not plaintext:
        return None
    path = write_secret(admin_key_path(), plaintext)
    err_console.print(f"[bold yellow]created the first admin API key; it is in {path} (mode 0600)[/]")
    err_console.print(
        f"export CHORUS_API_KEY=$(cat {path}); create more with `chorus keys create`, then "
        "delete the file or keep it out of backups."
    )
    return path


def migrate_command() -> None:
    """Apply the database migrations (alembic upgrade head) to DATABASE_URL or the embedded SQLite file."""
    from shared.config import get_settings
    from shared.db.session import migrate

    migrate()
    console.print(f"database is at head: {_redact(get_settings().db_url)}")


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def api_command(
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    workers: Annotated[
        int,
        typer.Option(
            help="Uvicorn worker processes (prefer 1 per process/container and "
            "replicas: uvicorn's multi-process mode adds ~40 ms per response)."
        ),
    ] = 1,
    log_level: Annotated[str, typer.Option(help="Log level.")] = "info",
) -> None:
    """Run the job API (migrates the database and bootstraps an admin key first). Behind a reverse proxy set
    CHORUS_FORWARDED_ALLOW_IPS to its address so that rate limits see the real client address."""
    import uvicorn

    from services.cli.serve import uvicorn_proxy_options
    from shared.db.session import migrate

    migrate()
    bootstrap_admin_key()
    uvicorn.run(
        "services.api.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        access_log=False,
        **uvicorn_proxy_options(),
    )


def worker_command(
    pool: Annotated[
        Literal["prefork", "solo"],
        typer.Option(help="prefork (a fresh process per job) or solo (in-process, debugging)."),
    ] = "prefork",
    concurrency: Annotated[int, typer.Option(help="Job processes; keep 1 per GPU.")] = 1,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    queue: Annotated[str | None, typer.Option(help="Queue name (default CHORUS_QUEUE or chorus).")] = None,
    hostname: Annotated[str | None, typer.Option(help="Worker node name.")] = None,
) -> None:
    """Run a Celery worker: one job per process, recycled after every job, CUDA only in the child."""
    from services.worker.celery_app import celery_app
    from shared.jobs.config import get_service_settings

    argv = [
        "worker",
        f"--pool={pool}",
        f"--concurrency={concurrency}",
        f"--loglevel={loglevel}",
        f"--queues={queue or get_service_settings().queue}",
        "--max-tasks-per-child=1",
        "--prefetch-multiplier=1",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    celery_app.worker_main(argv)


def _inference_cmd(host: str, port: int) -> list[str] | None:
    if importlib.util.find_spec("services.inference.app") is None:
        return None
    from services.cli.main import app as cli_app

    names = {c.name or (c.callback.__name__ if c.callback else "") for c in cli_app.registered_commands}
    if "inference" in names:
        return [sys.executable, "-m", "services.cli.main", "inference", "--host", host, "--port", str(port)]
    from services.cli.serve import uvicorn_proxy_args

    return [
        sys.executable,
        "-m",
        "uvicorn",
        "services.inference.app:create_app",
        "--factory",
        "--host",
        host,
        "--port",
        str(port),
        *uvicorn_proxy_args(),
    ]


def _reachable(host: str) -> str:
    """The address to print for a bind address (a wildcard bind is reachable on the loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def up_plan(
    host: str,
    port: int,
    inference_port: int,
    inference: bool,
    inference_model: str | None = None,
    inference_quantization: str | None = None,
) -> tuple[dict[str, list[str]], dict[str, str], list[str]]:
    """What `chorus up` starts: {name: command}, the environment of the subprocesses, and the lines that say
    where each service answers."""
    me = [sys.executable, "-m", "services.cli.main"]
    commands = {"api": [*me, "api", "--host", host, "--port", str(port)], "worker": [*me, "worker"]}
    env = {**os.environ, "CHORUS_MIGRATE_ON_START": "0"}
    where = _reachable(host)
    lines = [f"API on http://{where}:{port}  (docs: http://{where}:{port}/docs)"]
    if inference:
        cmd = _inference_cmd(host, inference_port)
        if cmd:
            commands["inference"] = cmd
            for name, value in (("MODEL", inference_model), ("QUANTIZATION", inference_quantization)):
                if value is not None:
                    env[f"CHORUS_INFERENCE_{name}"] = value
            model = env.get("CHORUS_INFERENCE_MODEL", "smollm2-135m")
            lines.append(
                f"inference on http://{where}:{inference_port}  (base model {model}; POST /v1/ensembles/<id>/classify)"
            )
    return commands, env, lines


def up_command(
    host: Annotated[str, typer.Option(help="Bind address of the API and the inference service.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="API port.")] = 8000,
    inference_port: Annotated[int, typer.Option(help="Inference service port.")] = 8001,
    inference: Annotated[bool, typer.Option(help="Start the inference service when it is installed.")] = True,
    inference_model: Annotated[
        str | None,
        typer.Option(
            help="Base model of the inference service: smollm2-135m, tiny-llama or a local HF folder "
            "[default: CHORUS_INFERENCE_MODEL or smollm2-135m]."
        ),
    ] = None,
    inference_quantization: Annotated[
        Quantization | None,
        typer.Option(help="Base weights of the inference service [default: CHORUS_INFERENCE_QUANTIZATION or nf4]."),
    ] = None,
) -> None:
    """Start the API, a worker and the inference service as subprocesses; Ctrl-C stops them all."""
    if not inference and (inference_model or inference_quantization):
        fail("--inference-model and --inference-quantization need the inference service (drop --no-inference)")
    from shared.db.session import migrate

    migrate()
    bootstrap_admin_key()
    commands, env, lines = up_plan(host, port, inference_port, inference, inference_model, inference_quantization)
    if inference and "inference" not in commands:
        err_console.print("[yellow]inference service not installed; starting api + worker only[/]")
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stop = False

    def _stop(*_: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        for name, cmd in commands.items():
            procs[name] = subprocess.Popen(cmd, env=env)
            err_console.print(f"started {name} (pid {procs[name].pid})")
        for line in lines:
            err_console.print(line, highlight=False, markup=False)
        while not stop:
            for name, proc in procs.items():
                if proc.poll() is not None:
                    err_console.print(f"[red]{name} exited with {proc.returncode}; stopping the others[/]")
                    stop = True
            time.sleep(0.5)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
    codes = [p.returncode for p in procs.values()]
    raise typer.Exit(code=0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1)


# -- keys -------------------------------------------------------------------------------------------
@keys_app.command("create")
def keys_create(
    owner: Annotated[str, typer.Option(help="Owner of every object created with the key.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: admin, submit, infer.")] = "submit,infer",
    name: Annotated[str, typer.Option(help="A label for humans.")] = "",
) -> None:
    """Create an API key and print its secret (shown only once)."""
    from shared.db.keys import create_key
    from shared.db.session import get_sessionmaker, migrate

    migrate()
    with get_sessionmaker()() as session:
        try:
            row, plaintext = create_key(session, owner, scopes, name)
        except ValueError as exc:
            fail(str(exc))
        session.commit()
    err_console.print(f"key {row.id} for owner {owner!r}, scopes {','.join(row.scopes)} (secret shown once):")
    print(plaintext, flush=True)


@keys_app.command("list")
def keys_list(owner: Annotated[str | None, typer.Option(help="Only this owner's keys.")] = None) -> None:
    """List API keys (prefixes only; secrets are never stored)."""
    from sqlalchemy import select

    from shared.db.models import ApiKey
    from shared.db.session import get_sessionmaker

    table = Table("id", "prefix", "owner", "scopes", "name", "created", "revoked")
    with get_sessionmaker()() as session:
        stmt = select(ApiKey).order_by(ApiKey.id)
        if owner:
            stmt = stmt.where(ApiKey.owner == owner)
        for k in session.scalars(stmt):
            table.add_row(
                k.id,
                k.prefix + "...",
                k.owner,
                ",".join(k.scopes),
                k.name,
                f"{k.created_at:%Y-%m-%d %H:%M}",
                f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "",
            )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="Key id (key-...).")]) -> None:
    """Revoke an API key."""
    from shared.db.models import ApiKey, utcnow
    from shared.db.session import get_sessionmaker

    with get_sessionmaker()() as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            fail(f"no key {key_id}")
        row.revoked_at = row.revoked_at or utcnow()
        session.commit()
    console.print(f"revoked {key_id}")


# -- jobs -------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def build_params(params: str | None, sets: list[str], shorthand: dict[str, Any]) -> dict[str, Any]:
    """--params JSON|@file, then shorthand options, then --set key.sub=value (values parsed as JSON)."""
    out: dict[str, Any] = {}
    if params:
        text = Path(params[1:]).read_text() if params.startswith("@") else params
        loaded = json.loads(text)
        if not isinstance(loaded, dict):
            fail("--params must be a JSON object")
        out.update(loaded)
    out.update({k: v for k, v in shorthand.items() if v is not None})
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--set expects key=value, got {item!r}")
        target = out
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = _parse_value(value)
    return out


def submit_command(
    job_type: Annotated[
        str,
        typer.Argument(
            help="pipeline, affinity, grouping, training, approximation_error, "
            "validate_estimates, validate_affinity, study or evaluation."
        ),
    ],
    tasks: Annotated[str | None, typer.Option(help="Comma-separated task names.")] = None,
    model: Annotated[str | None, typer.Option(help="Base model name (smollm2-135m, tiny-llama).")] = None,
    groups: Annotated[str | None, typer.Option(help="Number of groups or 'auto' (pipeline, grouping).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every random choice.")] = None,
    affinity: Annotated[str | None, typer.Option(help="grouping: artifact id of an affinity.json.")] = None,
    params: Annotated[str | None, typer.Option(help="Params as JSON, or @file.json.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="key=value (dotted keys nest; JSON values).")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="Retry-safe: same key + body -> same job.")] = None,
    follow: Annotated[bool, typer.Option(help="Follow the job's progress until it finishes.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Submit a job to the API and print its id (optionally follow it)."""
    group_value: Any = groups
    if groups is not None and groups != "auto":
        group_value = int(groups) if groups.isdigit() else groups
    shorthand = {
        "tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
        "model": model,
        "groups": group_value,
        "seed": seed,
        "affinity": affinity,
    }
    body = build_params(params, set_ or [], shorthand)
    client = _client(api_url, api_key)
    job = _call(client.create_job, job_type, body, idempotency_key=idempotency_key)
    if as_json:
        print(json.dumps(job, indent=2))
    else:
        console.print(f"submitted [bold]{job['id']}[/] ({job['type']}, {job['status']})")
    if follow:
        if follow_job(client, job["id"])["status"] != "succeeded":
            raise typer.Exit(code=1)


def jobs_command(
    status: Annotated[JobStatus | None, typer.Option(help="Only jobs in this status.")] = None,
    job_type: Annotated[str | None, typer.Option("--type", help="Only jobs of this type.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100, help="How many (newest first).")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the page as JSON (the API's list object).")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """List recent jobs."""
    page = _call(_client(api_url, api_key).list_jobs, status=status, type=job_type, limit=limit)
    if as_json:
        print(json.dumps(page, indent=2))
        return
    table = Table("id", "type", "status", "stage", "progress", "created")
    for j in page["data"]:
        pct = j["progress"].get("percent")
        table.add_row(
            j["id"],
            j["type"],
            j["status"],
            j["current_stage"] or "",
            f"{pct:.0f}%" if pct is not None else "",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created_at"])),
        )
    console.print(table)


STATUS_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "yellow", "running": "cyan", "queued": "white"}


def _print_job(job: dict[str, Any]) -> None:
    style = STATUS_STYLE.get(job["status"], "white")
    console.print(f"[bold]{job['id']}[/] {job['type']}: [{style}]{job['status']}[/] (attempt {job['attempt']})")
    for stage in job["stages"]:
        console.print(f"  stage {stage['name']}: {stage['status']}")
    if job.get("error"):
        err = job["error"]
        console.print(
            f"  [red]error {err['code']}[/]: {escape(err['message'])}"
            + (f" (param {escape(err['param'])})" if err.get("param") else "")
        )


def follow_job(client: Any, job_id: str, interval: float = LOG_INTERVAL) -> dict[str, Any]:
    """Follow a job's events until it finishes: one progress bar per step on a terminal; in a log (stdout not
    a terminal) a plain progress line per step start and end and at least every `interval` seconds, also while
    no step reports (model loading, a queued job). The job's percent shown never goes backwards (JobPercent).
    Other events print as log lines."""
    import httpx

    from services.client import ChorusError

    percent = JobPercent()
    try:
        with ConsoleProgress(console=console, interval=interval) as progress:
            for event in client.follow(job_id):
                data = event.get("data") or {}
                if data.get("type") == "progress" and data.get("step"):
                    step, stage = str(data["step"]), data.get("stage")
                    done, total = int(data.get("done") or 0), int(data.get("total") or 0)
                    label = f"{stage}: {step}" if stage and stage != step else step
                    pct = percent.update(
                        str(stage or ""),
                        int(data.get("stage_index") or 0),
                        int(data.get("stage_count") or 1),
                        step,
                        done,
                        total,
                    )
                    message = f"job {pct:.0f}%" + (f" {data['message']}" if data.get("message") else "")
                    progress(label, done, total, message)
                else:
                    level = event.get("level", "info")
                    stamp = time.strftime("%H:%M:%S", time.localtime(event["created_at"]))
                    progress.log(f"{stamp} {event['message']}", {"error": "red", "warning": "yellow"}.get(level, "dim"))
                    progress.idle(f"{job_id} running; last event: {event['message']}")  # a quiet spell in a log
    except ChorusError as exc:
        fail(f"{exc.code}: {exc.message}")
    except httpx.HTTPError as exc:
        fail(f"lost the API: {exc}")
    job = client.get_job(job_id)
    _print_job(job)
    return job


def status_command(
    job_id: Annotated[str, typer.Argument(help="Job id (job-...).")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Live progress until the job finishes.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the job as JSON.")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Show a job; with --follow, a live progress bar from its events until it finishes."""
    client = _client(api_url, api_key)
    if follow:
        job = follow_job(client, job_id)
    else:
        job = _call(client.get_job, job_id)
        if as_json:
            print(json.dumps(job, indent=2))
            return
        _print_job(job)
        prog = job.get("progress") or {}
        if job["status"] == "running" and prog:
            console.print(
                f"  progress {prog.get('percent', 0):.1f}%: {prog.get('step') or prog.get('stage')} "
                f"{prog.get('done')}/{prog.get('total')} {prog.get('message') or ''}"
            )
    if follow and job["status"] != "succeeded":
        raise typer.Exit(code=1)


def cancel_command(
    job_id: Annotated[str, typer.Argument(help="Job id (job-...).")], api_url: ApiUrl = None, api_key: ApiKey = None
) -> None:
    """Cancel a queued or running job."""
    job = _call(_client(api_url, api_key).cancel, job_id)
    console.print(f"{job['id']}: {job['status']}")


def results_command(
    job_id: Annotated[str, typer.Argument(help="Job id (job-...).")],
    download: Annotated[Path | None, typer.Option(help="Download every artifact into this folder.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw job and artifact objects as JSON.")] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Print a job's results as its offline command does (a pipeline or training job: the per-task accuracy
    table and the cost lines), then its artifacts; --download DIR fetches them."""
    from services.cli.tables import print_artifacts, print_job_results

    client = _client(api_url, api_key)
    job = _call(client.get_job, job_id)
    artifacts = _call(client.job_artifacts, job_id)
    if as_json:
        print(json.dumps({"job": job, "artifacts": artifacts}, indent=2))
    else:
        _print_job(job)
        if job["status"] == "succeeded":
            ids = job.get("result_artifacts") or {}
            shown = print_job_results(job, lambda name: _call(client.artifact_bytes, ids[name]))
            if not shown:
                console.print("(no table for this job type; --json prints the raw result)")
            if "results_chart" in ids:
                console.print("chart: the artifact results_chart (results.png; --download DIR fetches it)")
        print_artifacts(job, artifacts)
    if download is not None:
        paths = _call(client.download_results, job_id, download)
        for name, path in sorted(paths.items()):
            err_console.print(f"{name}: {path}")


def register(app: typer.Typer) -> None:
    app.command("api")(api_command)
    app.command("worker")(worker_command)
    app.command("up")(up_command)
    app.command("migrate")(migrate_command)
    app.add_typer(keys_app, name="keys")
    app.command("submit")(submit_command)
    app.command("jobs")(jobs_command)
    app.command("status")(status_command)
    app.command("cancel")(cancel_command)
    app.command("results")(results_command)
