"""The job database: SQLAlchemy 2 models and engine/session helpers (Postgres in production, SQLite embedded)."""

from shared.db.models import (
    Adapter,
    ApiKey,
    Artifact,
    Base,
    Dataset,
    Ensemble,
    Job,
    JobEvent,
    JobStage,
    new_id,
    utcnow,
)
from shared.db.session import get_engine, get_sessionmaker, migrate, session_scope

__all__ = [
    "Adapter",
    "ApiKey",
    "Artifact",
    "Base",
    "Dataset",
    "Ensemble",
    "Job",
    "JobEvent",
    "JobStage",
    "get_engine",
    "get_sessionmaker",
    "migrate",
    "new_id",
    "session_scope",
    "utcnow",
]
