"""Engines, sessions and migrations for the job database."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from shared.config import REPO_ROOT, get_settings

_LOCK = threading.Lock()
_ENGINES: dict[str, Engine] = {}
_MAKERS: dict[str, sessionmaker[Session]] = {}
_MIGRATION_LOCK_ID = 0x63686F72  # "chor": the Postgres advisory lock held while migrating

# The database cannot serve us right now (connection refused or dropped, server shutting down, too many
# connections, pool exhausted): the same request may succeed later, so nothing should be failed for good.
UNAVAILABLE: tuple[type[Exception], ...] = (OperationalError, InterfaceError, PoolTimeoutError)


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for plain postgres:// URLs (psycopg2 is not a dependency)."""
    for plain in ("postgres://", "postgresql://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain) :]
    return url


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for `url` (default: the configured database), created on first use."""
    url = normalize_url(url or get_settings().db_url)
    with _LOCK:
        engine = _ENGINES.get(url)
        if engine is None:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_recycle=1800)
            _ENGINES[url] = engine
        return engine


def get_read_engine(url: str | None = None) -> Engine:
    """An engine for single-statement reads (status polls): autocommit on PostgreSQL and no pre-ping, so a
    read costs one round trip (no BEGIN / ROLLBACK / SELECT 1); use `read_all`, which retries once on a
    connection the server dropped. SQLite uses the ordinary engine."""
    url = normalize_url(url or get_settings().db_url)
    if url.startswith("sqlite"):
        return get_engine(url)
    key = "read:" + url
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None:
            engine = _ENGINES[key] = create_engine(
                url, isolation_level="AUTOCOMMIT", pool_pre_ping=False, pool_size=10, max_overflow=20, pool_recycle=1800
            )
        return engine


def read_all(stmt: Any, url: str | None = None) -> list[Any]:
    """All rows (as mappings) of one read statement on the read engine. A connection that died in the pool
    (database restart) surfaces as an invalidated-connection error on first use: retried once on a fresh one."""
    for attempt in (0, 1):
        try:
            with get_read_engine(url).connect() as conn:
                return list(conn.execute(stmt).mappings().all())
        except DBAPIError as exc:
            if attempt or not exc.connection_invalidated:
                raise
    raise AssertionError("unreachable")


def get_sessionmaker(url: str | None = None) -> sessionmaker[Session]:
    url = normalize_url(url or get_settings().db_url)
    maker = _MAKERS.get(url)
    if maker is None:
        maker = _MAKERS[url] = sessionmaker(get_engine(url), expire_on_commit=False)
    return maker


@contextlib.contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines() -> None:
    """Forget pooled connections inherited over fork (call in a forked child before using the db)."""
    with _LOCK:
        for engine in _ENGINES.values():
            engine.dispose(close=False)


def _after_fork_in_child() -> None:
    # A lock or pooled connection inherited from the parent (possibly mid-use by another thread) must
    # not be used in the child: fresh lock, and pools that forget the parent's connections.
    global _LOCK
    _LOCK = threading.Lock()
    for engine in _ENGINES.values():
        engine.dispose(close=False)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def alembic_config(url: str | None = None):
    from alembic.config import Config

    cfg = Config(str(REPO_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url or get_settings().db_url).replace("%", "%%"))
    return cfg


def migrate(url: str | None = None, revision: str = "head") -> None:
    """`alembic upgrade head`, safe to call from several processes at once (file / advisory lock)."""
    from alembic import command

    url = normalize_url(url or get_settings().db_url)
    cfg = alembic_config(url)
    engine = get_engine(url)
    if engine.dialect.name == "sqlite":
        db_path = Path(url.split("///", 1)[-1])
        lock_path = db_path.with_name(db_path.name + ".migrate.lock")
        with lock_path.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with engine.begin() as conn:
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, revision)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _MIGRATION_LOCK_ID})
        conn.commit()
        try:
            with conn.begin():
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _MIGRATION_LOCK_ID})
            conn.commit()
