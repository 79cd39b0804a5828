"""Settings of the inference service, from CHORUS_INFERENCE_* environment variables (or create_app overrides)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class InferenceSettings(BaseSettings):
    """Every field can be set with CHORUS_INFERENCE_<FIELD> (e.g. CHORUS_INFERENCE_MODEL=tiny-llama)."""

    model_config = SettingsConfigDict(
        env_prefix="CHORUS_INFERENCE_", extra="ignore", protected_namespaces=(), populate_by_name=True
    )

    model: str = Field("smollm2-135m", description="Base model: smollm2-135m, tiny-llama, or a local HF folder.")
    quantization: Literal["none", "nf4"] = Field("nf4", description="Base weights: 4-bit NF4 (bitsandbytes) or none.")
    device: str | None = Field(None, description="cuda, cuda:1, cpu (default: cuda when available).")
    max_batch_rows: int = Field(64, ge=1, le=4096, description="Max (row, member) pairs in one forward pass.")
    max_wait_ms: float = Field(5.0, ge=0, le=1000, description="How long a batch waits for more requests.")
    max_adapters: int = Field(
        16, ge=1, le=1024, description="Adapter slots on the device (LRU; pinned = loaded ensembles)."
    )
    max_host_adapters: int = Field(
        64, ge=1, description="Verified adapters kept in host memory for fast re-activation."
    )
    max_rank: int = Field(16, ge=1, le=1024, description="Initial slot rank (grows if an adapter needs more).")
    targets: str = Field(
        "q_proj,k_proj,v_proj", description="Modules wrapped at startup (others are wrapped on demand)."
    )
    max_rows_per_request: int = Field(256, ge=1, description="Rows in one classify request.")
    max_row_chars: int = Field(16_384, ge=1, description="Characters of text in one row (all fields).")
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Request body cap.")
    ensembles_dir: Path | None = Field(None, description="Folder-per-id ensembles (default: <artifacts>/ensembles).")
    use_database: bool = Field(True, description="Resolve ensemble ids through the job database + artifact store.")
    preload: str = Field("", description="Comma-separated ensemble ids to load at startup.")
    metrics_public: bool = Field(True, description="Serve /metrics without a key (bind to a private interface).")
    docs: bool = Field(
        True,
        description="Serve /docs (Swagger UI), /redoc and /openapi.json; the pages' scripts and "
        "styles are served by the service itself (they work offline).",
    )
    # Off by default: with it, any `infer` key can make the service load its owner's ensembles (each takes
    # adapter slots until an admin unloads it), which an operator should choose knowingly.
    lazy_load: bool = Field(
        False,
        description="Load an ensemble on the first classify request that names it (its id, or the artifact id "
        "of a job's ensemble.json), LoRAX-style, when the key may see it: the job owner's keys for a "
        "job's ensemble, admin keys for any. Off: only POST /v1/ensembles/{id}/load (admin) loads.",
    )
    migrate_on_start: bool = Field(
        True,
        description="Create/upgrade the job database tables (API keys) at startup.",
        validation_alias=AliasChoices(
            "CHORUS_INFERENCE_MIGRATE_ON_START", "CHORUS_MIGRATE_ON_START", "migrate_on_start"
        ),
    )
    auth_cache_seconds: float = Field(5.0, ge=0, description="How long a verified key is cached in-process.")

    @property
    def target_list(self) -> list[str]:
        return [t.strip() for t in self.targets.split(",") if t.strip()]

    @property
    def preload_ids(self) -> list[str]:
        return [t.strip() for t in self.preload.split(",") if t.strip()]
