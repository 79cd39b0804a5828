"""Integration fixtures: a fresh PostgreSQL database per session (created on 127.0.0.1:5432, dropped at the
end), a dedicated Redis DB number as the Celery broker, the API in-process, and real Celery worker
subprocesses. Environment knobs: CHORUS_TEST_PG (admin URL), CHORUS_TEST_REDIS, CHORUS_TEST_REDIS_DB."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
PG_ADMIN = os.environ.get("CHORUS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("CHORUS_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("CHORUS_TEST_REDIS_DB", "11"))
TERMINAL = ("succeeded", "failed", "cancelled")

# Short leases and sweeps so worker loss is noticed in seconds; everything else is the production code.
STACK_ENV = {
    "CHORUS_LEASE_SECONDS": "4",
    "CHORUS_REAP_INTERVAL": "1",
    "CHORUS_PROGRESS_INTERVAL": "0.2",
    "CHORUS_EVENT_INTERVAL": "1",
    "CHORUS_CANCEL_GRACE_SECONDS": "20",
    "CHORUS_AUTH_CACHE_SECONDS": "0",
    # The route-enumerating tests send many keyless requests from one address; test_rate_limits.py builds
    # its own apps with small limits.
    "CHORUS_RATE_LIMIT_ANON_BURST": "100000",
}


def _services_up() -> str | None:
    try:
        import psycopg
        import redis

        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
        redis.Redis.from_url(f"{REDIS_BASE}/{REDIS_DB}", socket_connect_timeout=3).ping()
    except Exception as exc:  # pragma: no cover - environment without the services
        return f"{type(exc).__name__}: {exc}"
    return None


def _clear_caches() -> None:
    from services.api.settings import get_api_settings
    from shared.config import get_settings
    from shared.jobs.config import get_service_settings

    get_settings.cache_clear()
    get_service_settings.cache_clear()
    get_api_settings.cache_clear()


@pytest.fixture(scope="session")
def stack_env() -> Iterator[dict[str, str]]:
    """DATABASE_URL (a new database), BROKER_URL (redis DB n, flushed) and short leases for this session."""
    problem = _services_up()
    if problem:
        pytest.fail(f"integration tests need PostgreSQL and Redis on 127.0.0.1 ({problem}); run .ci/run")
    import psycopg
    import redis

    name = f"chorus_it_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0]
    env = {"DATABASE_URL": f"{base}/{name}", "BROKER_URL": f"{REDIS_BASE}/{REDIS_DB}", **STACK_ENV}
    broker = redis.Redis.from_url(env["BROKER_URL"])
    broker.flushdb()
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _clear_caches()
    from services.worker import celery_app as worker_module
    from shared.db.session import migrate

    worker_module.celery_app = worker_module.make_celery()  # the in-process API publishes to the test broker
    migrate()
    try:
        yield env
    finally:
        from shared.db.session import get_engine

        get_engine().dispose()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _clear_caches()
        broker.flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def api(stack_env: dict[str, str]) -> Iterator[Any]:
    """The API in-process (TestClient) on the session's database and broker."""
    from fastapi.testclient import TestClient

    from services.api.app import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="session")
def make_key(stack_env: dict[str, str]) -> Callable[..., str]:
    """make_key(owner, "submit,infer") -> a new API key's secret."""
    from shared.db.keys import create_key
    from shared.db.session import session_scope

    def make(owner: str, scopes: str = "submit") -> str:
        with session_scope() as session:
            _, secret = create_key(session, owner, scopes, f"test {owner}")
        return secret

    return make


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Worker:
    """A real `chorus worker` subprocess in its own process group (so kill -9 takes parent and child)."""

    def __init__(self, env: dict[str, str], log_path: Path, name: str) -> None:
        self.log_path = log_path
        self.log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "worker", "--loglevel", "INFO", "--hostname", f"{name}@%h"],
            cwd=REPO,
            env={**os.environ, **env},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> Worker:
        wait_for(lambda: " ready." in self.text() or self.proc.poll() is not None, timeout, what="worker ready")
        assert self.proc.poll() is None, f"worker exited early:\n{self.text()[-3000:]}"
        return self

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        self.log.close()


class WorkerPool:
    """Worker subprocesses of one test module: `current()` is a live worker (started on demand)."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.workers: list[Worker] = []

    def start(self) -> Worker:
        n = len(self.workers)
        worker = Worker(self.env, self.logs / f"worker-{n}.log", f"w{n}-{uuid.uuid4().hex[:4]}")
        self.workers.append(worker)
        return worker.wait_ready()

    def current(self) -> Worker:
        alive = [w for w in self.workers if w.proc.poll() is None]
        return alive[-1] if alive else self.start()

    def logs_text(self) -> str:
        return "\n".join(w.text() for w in self.workers)

    def stop_all(self) -> None:
        for worker in self.workers:
            worker.stop()


@pytest.fixture(scope="module")
def workers(stack_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    pool = WorkerPool(stack_env, tmp_path_factory.mktemp("workers"))
    yield pool
    pool.stop_all()


@pytest.fixture(scope="module")
def quiet_queue(stack_env: dict[str, str]) -> None:
    """No leftovers from API-only tests: cancel their still-queued jobs and empty the broker."""
    import redis
    from sqlalchemy import update

    from shared.db.models import Job, utcnow
    from shared.db.session import session_scope

    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.status.in_(("queued", "running")))
            .values(status="cancelled", finished_at=utcnow(), lease_owner=None)
        )
    redis.Redis.from_url(stack_env["BROKER_URL"]).flushdb()
