"""`alembic upgrade head` works on PostgreSQL and SQLite, matches the models, and downgrades cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import PG_ADMIN, REPO

pytestmark = pytest.mark.integration


def _alembic(url: str, *args: str) -> str:
    env = {**os.environ, "DATABASE_URL": url}
    done = subprocess.run(
        [sys.executable, "-m", "alembic", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _roundtrip(url: str) -> None:
    out = _alembic(url, "upgrade", "head")
    assert "Running upgrade  -> 0001" in out and "Running upgrade 0001 -> 0002" in out
    assert "No new upgrade operations detected" in _alembic(url, "check")
    assert "0002 (head)" in _alembic(url, "current")
    _alembic(url, "downgrade", "base")
    _alembic(url, "upgrade", "head")


def test_alembic_on_postgres() -> None:
    import psycopg

    name = f"chorus_mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        _roundtrip(f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}")
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_alembic_on_sqlite(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'chorus.db'}")
