"""Settings for every chorus process, read from environment variables (prefix-free, 12-factor style)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

# The repository root (one level above shared/); ../shared/data sits beside it in a checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent


def _default_data_dir() -> Path:
    candidate = REPO_ROOT.parent / "shared" / "data"
    return candidate if candidate.is_dir() else REPO_ROOT / "data"


def _default_home() -> Path:
    return REPO_ROOT / ".chorus"


class Settings(BaseSettings):
    """Process settings. Every field can be set with the upper-case env var of its name."""

    model_config = SettingsConfigDict(env_prefix="CHORUS_", extra="ignore", populate_by_name=True)

    home: Path = Field(default_factory=_default_home, description="Root for local state (db, artifacts, caches).")
    data_dir: Path = Field(default_factory=_default_data_dir, description="Where the built-in datasets live.")
    artifact_dir: Path | None = Field(default=None, description="Artifact store root (default: HOME/artifacts).")
    model_cache_dir: Path | None = Field(default=None, description="Converted model cache (default: HOME/models).")
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    broker_url: str | None = Field(default=None, validation_alias="BROKER_URL")
    gpu_memory_share: float = Field(
        default=1.0,
        gt=0.0,
        le=1.0,
        description="Share of each GPU's memory one chorus process sizes its automatic batches for: 1/N when N "
        "processes share a GPU (a study's pool of arm processes sets it for its children).",
    )
    max_upload_bytes: int = 50 * 1024 * 1024
    max_dataset_rows: int = 1_000_000

    @property
    def artifacts(self) -> Path:
        return self.artifact_dir or self.home / "artifacts"

    @property
    def models(self) -> Path:
        return self.model_cache_dir or self.home / "models"

    @property
    def user_tasks(self) -> Path:
        return self.home / "tasks"

    @property
    def db_url(self) -> str:
        """The job database: DATABASE_URL, else an embedded SQLite file."""
        return self.database_url or f"sqlite:///{self.home / 'chorus.db'}"

    @property
    def celery_broker_url(self) -> str:
        """The Celery broker: BROKER_URL, else kombu's SQLAlchemy transport on a SQLite file (no server)."""
        return self.broker_url or f"sqla+sqlite:///{self.home / 'broker.db'}"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (cached; tests clear the cache after changing env vars)."""
    return Settings()
