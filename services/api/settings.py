"""Settings of the job API's HTTP edge (rate limits, /metrics), from CHORUS_* environment variables.

The rest of the API's settings (body caps, quotas, auth cache) are in `shared.jobs.config.ServiceSettings`;
these live here so the API can own them without touching the worker's settings module.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.rate_limit import Limit
from shared.ml.model_names import parse_dirs


class ApiSettings(BaseSettings):
    """Every field can be set with CHORUS_<FIELD> (e.g. CHORUS_RATE_LIMIT_RATE=5)."""

    model_config = SettingsConfigDict(env_prefix="CHORUS_", extra="ignore")

    metrics_public: bool = Field(
        True,
        description="Serve /metrics without a key (keep it on a private network); "
        "false: an admin key is required. Same as the inference service.",
    )

    rate_limit_enabled: bool = Field(True, description="Token-bucket rate limits per API key and per client IP.")
    rate_limit_rate: float = Field(20.0, gt=0, description="Requests per second per API key (sustained), every route.")
    rate_limit_burst: int = Field(100, ge=1, description="Requests per API key allowed at once.")
    rate_limit_create_rate: float = Field(
        0.5, gt=0, description="Job creations per second per API key (on top of the general limit)."
    )
    rate_limit_create_burst: int = Field(20, ge=1, description="Job creations per API key allowed at once.")
    rate_limit_upload_rate: float = Field(0.1, gt=0, description="Dataset uploads per second per API key.")
    rate_limit_upload_burst: int = Field(10, ge=1, description="Dataset uploads per API key allowed at once.")
    rate_limit_anon_rate: float = Field(
        2.0, gt=0, description="Requests per second per client IP without a valid key (missing, unknown or revoked)."
    )
    rate_limit_anon_burst: int = Field(30, ge=1, description="Such requests per client IP allowed at once.")
    rate_limit_redis_url: str | None = Field(
        None,
        description="Redis for limits shared by every API process (default: BROKER_URL when it is "
        "redis:// or rediss://; 'memory' forces in-process buckets).",
    )

    allowed_model_dirs: str = Field(
        "",
        description="Comma-separated directories whose model folders jobs may name as `model` (by absolute "
        "path); empty: registered models only (smollm2-135m, tiny-llama[-seedN]).",
    )
    forwarded_allow_ips: str = Field(
        "",
        description="Proxies whose X-Forwarded-For / X-Forwarded-Proto uvicorn trusts (comma-separated IPs "
        "or networks, '*' for any); empty: none, the client address is the TCP peer's. Read by "
        "`chorus api`, `chorus inference` and `chorus up`.",
    )
    admin_key_file: Path | None = Field(
        None, description="Where the bootstrap admin key is written (mode 0600; default CHORUS_HOME/admin-key)."
    )

    @property
    def model_dirs(self) -> list[Path]:
        return parse_dirs(self.allowed_model_dirs)

    def limits(self) -> dict[str, Limit]:
        return {
            "api": Limit(self.rate_limit_rate, self.rate_limit_burst),
            "create": Limit(self.rate_limit_create_rate, self.rate_limit_create_burst),
            "upload": Limit(self.rate_limit_upload_rate, self.rate_limit_upload_burst),
            "anon": Limit(self.rate_limit_anon_rate, self.rate_limit_anon_burst),
        }

    def redis_url(self, broker_url: str | None) -> str | None:
        """Where shared buckets live, or None for in-process buckets."""
        url = self.rate_limit_redis_url
        if url == "memory":
            return None
        url = url or broker_url
        return url if url and url.startswith(("redis://", "rediss://")) else None


@lru_cache
def get_api_settings() -> ApiSettings:
    return ApiSettings()
