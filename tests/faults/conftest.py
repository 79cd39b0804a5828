"""Fault-suite fixtures: per test module, a PostgreSQL and a Redis server of its own (tests/faults/servers.py),
the API in-process on them, real Celery worker subprocesses, and a tally of every scenario (submitted,
completed, lost, duplicated) printed at the end of the run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.faults.servers import PostgresServer, RedisServer, die_with_parent, missing
from tests.integration.conftest import REPO, STACK_ENV, Worker, _clear_caches

# The integration suite's short leases and sweeps, and queued jobs re-sent after a few seconds.
FAULT_ENV = {**STACK_ENV, "CHORUS_RESEND_AFTER_SECONDS": "6"}
TALLIES: list[str] = []


@dataclass
class Stack:
    pg: PostgresServer
    redis: RedisServer
    env: dict[str, str]
    root: Path


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    """Own PostgreSQL + Redis, DATABASE_URL / BROKER_URL pointing at them, migrated; all stopped afterwards."""
    problem = missing()
    if problem:
        pytest.skip(f"fault suite: {problem}")
    root = Path(tempfile.mkdtemp(prefix="chorus-faults-"))
    os.chmod(root, 0o755)  # the postgres user must reach its data directory
    pg, broker = PostgresServer(root / "pg"), RedisServer(root / "redis")
    saved_env = {k: os.environ.get(k) for k in ("DATABASE_URL", "BROKER_URL", *FAULT_ENV)}
    from services.worker import celery_app as worker_module

    saved_app = worker_module.celery_app
    # A SIGTERM (a CI timeout) unwinds like Ctrl-C, so the finalizers below still stop every process.
    saved_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        pg.init()
        pg.start()
        broker.start()
        import psycopg

        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute('CREATE DATABASE "chorus"')
        env = {"DATABASE_URL": pg.url("chorus"), "BROKER_URL": broker.url(), **FAULT_ENV}
        os.environ.update(env)
        _clear_caches()
        worker_module.celery_app = worker_module.make_celery()  # the in-process API publishes to our broker
        from shared.db.session import migrate

        migrate()
        yield Stack(pg, broker, env, root)
    finally:
        from shared.db.session import get_engine, get_read_engine

        if os.environ.get("DATABASE_URL") == pg.url("chorus"):
            get_engine().dispose()
            get_read_engine().dispose()
        if worker_module.celery_app is not saved_app:
            worker_module.celery_app.close()
        worker_module.celery_app = saved_app
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _clear_caches()
        broker.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
        signal.signal(signal.SIGTERM, saved_sigterm)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from services.api.app import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def key(stack: Stack) -> str:
    from shared.db.keys import create_key
    from shared.db.session import session_scope

    with session_scope() as session:
        _, secret = create_key(session, f"faults-{uuid.uuid4().hex[:6]}", "submit", "fault suite")
    return secret


class FaultWorker(Worker):
    """The integration suite's worker subprocess, SIGKILLed should the test process die without cleanup."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str) -> None:
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                *die_with_parent(),
                sys.executable,
                "-m",
                "services.cli.main",
                "worker",
                "--loglevel",
                "INFO",
                "--hostname",
                f"{name}@%h",
            ],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


class Workers:
    """Worker subprocesses started by one test; all stopped (SIGTERM, then SIGKILL) when it ends."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.started: list[FaultWorker] = []

    def start(self, **overrides: str) -> FaultWorker:
        n = len(self.started)
        worker = FaultWorker({**self.env, **overrides}, self.logs / f"worker-{n}.log", f"f{n}-{uuid.uuid4().hex[:4]}")
        self.started.append(worker)
        return worker.wait_ready()

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()

    def logs_text(self) -> str:
        return "\n".join(f"--- {w.log_path.name}\n{w.text()[-4000:]}" for w in self.started)


def _fresh_start(stack: Stack) -> None:
    """Servers running and no job of an earlier (failed) scenario left queued or running."""
    import redis
    from sqlalchemy import update

    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope

    if stack.pg.proc is None or stack.pg.proc.poll() is not None:
        stack.pg.start()
    if stack.redis.proc is None or stack.redis.proc.poll() is not None:
        stack.redis.start()
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.status.in_(("queued", "running")))
            .values(status="cancelled", finished_at=utcnow(), lease_owner=None)
        )
    redis.Redis.from_url(stack.env["BROKER_URL"]).flushdb()


@pytest.fixture
def workers(stack: Stack, tmp_path: Path) -> Iterator[Workers]:
    _fresh_start(stack)
    pool = Workers(stack.env, tmp_path)
    try:
        yield pool
    finally:
        pool.stop_all()


@pytest.fixture(scope="session")
def record_tally() -> Callable[[str], None]:
    """record_tally(line): print it now and again in the run's closing summary."""

    def record(line: str) -> None:
        print(line)
        TALLIES.append(line)

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TALLIES:
        terminalreporter.section("fault suite")
        for line in TALLIES:
            terminalreporter.write_line(line)
