"""Alembic environment: the URL is DATABASE_URL (or the embedded SQLite file) unless a caller passes a
connection in `config.attributes["connection"]` (shared.db.migrate does, under a lock)."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool

from shared.db.models import Base
from shared.db.session import get_engine, normalize_url

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and config.attributes.get("connection") is None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    from shared.config import get_settings

    url = config.get_main_option("sqlalchemy.url")
    return normalize_url(url or get_settings().db_url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      render_as_batch=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = get_engine(_url())
    with engine.connect() as conn:
        _run(conn)
        conn.commit()


_ = pool  # kept for users who swap in NullPool
if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
