"""Settings of the job service (API + worker), read from CHORUS_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.config import get_settings


class ServiceSettings(BaseSettings):
    """Every field can be set with CHORUS_<FIELD> (e.g. CHORUS_LEASE_SECONDS=30)."""

    model_config = SettingsConfigDict(env_prefix="CHORUS_", extra="ignore")

    # Worker leases: a running job's worker renews its lease every lease_seconds/3; a job whose lease
    # expired (worker killed, machine lost) is requeued by the reaper and resumes after its last stage.
    lease_seconds: float = Field(30.0, gt=0)
    reap_interval: float = Field(10.0, gt=0, description="Seconds between reaper sweeps in each worker.")
    max_attempts: int = Field(3, ge=1, description="Deliveries of one job before it fails as worker_lost.")
    # A queued job whose message no worker took within this time is sent again (the broker may have lost
    # it, e.g. Redis restarted without its data); the claim makes an extra delivery a no-op. Later re-sends
    # of the same job wait twice as long each time, up to 8x (a long queue is not flooded with copies).
    resend_after_seconds: float = Field(300.0, gt=0, description="Re-send a queued job not picked up after this.")
    job_time_limit: int = Field(24 * 3600, gt=60, description="Hard time limit of one job (seconds).")
    visibility_timeout: int | None = Field(None, description="Broker visibility timeout (default: time limit + 1 h).")
    queue: str = "chorus"
    progress_interval: float = Field(0.5, ge=0, description="Min seconds between progress writes.")
    event_interval: float = Field(2.0, ge=0, description="Min seconds between progress events of one stage.")
    cancel_grace_seconds: float = Field(30.0, ge=0, description="Hard-stop a cancelled job after this (0: never).")
    work_dir: Path | None = Field(None, description="Stage working directories (default: HOME/work).")
    keep_workdir: bool = False
    # Fan-out (shared/jobs/fanout.py): a job's gradient passes and subset estimations are cut into shards
    # that other workers of the queue help with (all workers must share CHORUS_HOME: shards write into the
    # job's workdir). The job's own worker works on shards too, so one worker alone still finishes.
    fanout_shards: int = Field(0, ge=0, le=4096, description="Shards per shardable phase (0 or 1: no fan-out).")
    fanout_helpers: int | None = Field(None, ge=0, description="Helper tasks sent per phase (default: shards - 1).")
    fanout_shard_delay: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="Test knob: seconds a worker holds a claimed shard before running it (keep 0 in production).",
    )

    # API
    admin_key: str | None = Field(None, description="CHORUS_ADMIN_KEY: the bootstrap admin key.")
    api_docs: bool = True
    max_json_bytes: int = 1 << 20
    max_active_jobs: int = Field(100, ge=1, description="Queued + running jobs per owner.")
    max_datasets: int = Field(500, ge=1, description="Datasets per owner.")
    auth_cache_seconds: float = Field(5.0, ge=0, description="How long a verified key is cached in-process.")
    migrate_on_start: bool = True

    @property
    def soft_time_limit(self) -> int:
        return max(self.job_time_limit - 120, int(self.job_time_limit * 0.95))

    @property
    def broker_visibility_timeout(self) -> int:
        return self.visibility_timeout or self.job_time_limit + 3600

    @property
    def workdir_root(self) -> Path:
        return self.work_dir or get_settings().home / "work"


@lru_cache
def get_service_settings() -> ServiceSettings:
    return ServiceSettings()
