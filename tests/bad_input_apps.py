"""The real job API and inference service for the bad-input corpus and the API fuzzing: the job API on a
temporary SQLite CHORUS_HOME (jobs go to the embedded broker, which nothing consumes), the inference
service on tiny-llama with a small folder ensemble, and API keys of every scope in that database."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

SCOPES = ("admin", "submit", "infer")
ENSEMBLE = "alpha"
# Ensemble members: sst2 has one text field (`sentence`), rte two (`premise`, `hypothesis`).
MEMBERS = {"g0": (["sst2"], 1), "g1": (["rte"], 2)}
WEIGHTS = {"sst2": {"g0": 1.0}, "rte": {"g1": 1.0, "base": 0.5}}


def _clear_caches() -> None:
    from services.api.key_cache import key_cache
    from services.api.settings import get_api_settings
    from shared.config import get_settings
    from shared.jobs.config import get_service_settings

    get_settings.cache_clear()
    get_service_settings.cache_clear()
    get_api_settings.cache_clear()
    key_cache.clear()


@contextmanager
def isolated_home(home: Path) -> Iterator[Path]:
    """CHORUS_HOME (database, embedded broker, artifacts) at `home` while the block runs; the converted-model
    cache stays shared. The Celery app is rebuilt so that the API enqueues into this home's broker."""
    from services.worker import celery_app as worker_module

    # The integration suite's session fixtures set DATABASE_URL / BROKER_URL for the whole run: this home
    # must use its own embedded database and broker whatever ran before.
    saved_env = os.environ.get("CHORUS_HOME")
    saved_urls = {k: os.environ.pop(k, None) for k in ("DATABASE_URL", "BROKER_URL", "CHORUS_ADMIN_KEY")}
    saved_app = worker_module.celery_app
    os.environ["CHORUS_HOME"] = str(home)
    _clear_caches()
    worker_module.celery_app = worker_module.make_celery()
    from shared.db.session import migrate

    migrate()
    try:
        yield home
    finally:
        worker_module.celery_app = saved_app
        if saved_env is None:
            os.environ.pop("CHORUS_HOME", None)
        else:
            os.environ["CHORUS_HOME"] = saved_env
        os.environ.update({k: v for k, v in saved_urls.items() if v is not None})
        _clear_caches()


def make_keys(prefix: str) -> dict[str, str]:
    """One key per scope (owner `<prefix>-<scope>`), plus `other`: a second submit+infer owner."""
    from shared.db.keys import create_key
    from shared.db.session import session_scope

    with session_scope() as session:
        keys = {scope: create_key(session, f"{prefix}-{scope}", [scope], f"test {scope}")[1] for scope in SCOPES}
        keys["other"] = create_key(session, f"{prefix}-other", ["submit", "infer"], "test other")[1]
    return keys


@contextmanager
def embedded_home(home: Path, **env: str) -> Iterator[Path]:
    """isolated_home on the embedded defaults (SQLite job database and broker: DATABASE_URL / BROKER_URL unset), API
    keys never cached, plus `env`; the database engines are disposed afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        for name in ("DATABASE_URL", "BROKER_URL"):
            mp.delenv(name, raising=False)
        for name, value in {"CHORUS_AUTH_CACHE_SECONDS": "0", **env}.items():
            mp.setenv(name, value)
        with isolated_home(home) as path:
            yield path
        from shared.db.session import dispose_engines

        dispose_engines()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def job_api(**settings: Any) -> Any:
    """The job API app (create_app) with ApiSettings overrides, e.g. rate_limit_enabled=False."""
    from services.api.app import create_app
    from services.api.settings import ApiSettings

    return create_app(ApiSettings(**settings))


@contextmanager
def served_job_api(home: Path, key_prefix: str) -> Iterator[dict[str, Any]]:
    """The job API on an isolated home, served by uvicorn on 127.0.0.1 in a thread of this process (for clients
    that need a real URL: the CLI, the Python client): {"url": ..., "keys": {scope: key}}."""
    import socket
    import threading

    import uvicorn

    from tests.integration.conftest import wait_for

    with isolated_home(home):
        keys = make_keys(key_prefix)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        config = uvicorn.Config(job_api(rate_limit_enabled=False), host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            wait_for(lambda: server.started, 30, 0.05, "uvicorn to start")
            yield {"url": f"http://127.0.0.1:{port}", "keys": keys}
        finally:
            server.should_exit = True
            thread.join(timeout=30)


def store_state() -> dict[str, Any]:
    """Row counts of every table a request could write, and the artifact store's objects."""
    from shared.db.models import Adapter, ApiKey, Artifact, Dataset, Ensemble, Job, JobEvent
    from shared.db.session import session_scope
    from shared.storage import ArtifactStore

    with session_scope() as session:
        counts: dict[str, Any] = {
            m.__tablename__: session.scalar(select(func.count()).select_from(m))
            for m in (ApiKey, Artifact, Adapter, Dataset, Ensemble, Job, JobEvent)
        }
    counts["objects"] = sorted(p.name for p in ArtifactStore().iter_objects())
    return counts


def write_ensembles(root: Path, base: Any) -> Path:
    """`root/alpha`: a two-member ensemble on `base` serving sst2 and rte."""
    from shared.ml.serving.synthetic import write_ensemble, write_random_adapter

    folder = root / ENSEMBLE
    metas = {
        name: write_random_adapter(
            folder / "adapters" / name, base.model, base.info, name=name, tasks=tasks, rank=4, seed=seed, b_scale=0.3
        )
        for name, (tasks, seed) in MEMBERS.items()
    }
    write_ensemble(folder, base.info, metas, WEIGHTS, name=ENSEMBLE, base_member="base")
    return root


def inference_app(root: Path, **overrides: Any) -> Any:
    """The inference service on tiny-llama (CPU) serving the folder ensembles under `root`; API keys from
    the current CHORUS_HOME database."""
    from services.inference.app import create_app
    from services.inference.auth import DbKeyAuthenticator
    from services.inference.sources import DirectoryEnsembleSource
    from shared.ml.models import Base

    base = Base.load("tiny-llama", "none", "cpu")
    write_ensembles(root, base)
    options = {
        "max_wait_ms": 1,
        "max_row_chars": 2000,
        "max_rows_per_request": 16,
        "max_body_bytes": 64_000,
        **overrides,
    }
    return create_app(base=base, source=DirectoryEnsembleSource(root), authenticator=DbKeyAuthenticator(0), **options)


def dataset_api(tmp_path_factory: Any) -> Iterator[dict[str, Any]]:
    """The job API on a fresh SQLite home with `submit` keys for owners alice and bob (a module fixture body)."""
    from fastapi.testclient import TestClient

    from services.api.app import create_app
    from services.api.settings import ApiSettings, get_api_settings
    from shared.config import get_settings
    from shared.db.keys import create_key
    from shared.db.session import migrate, session_scope
    from shared.jobs.config import get_service_settings

    home = tmp_path_factory.mktemp("api") / "home"

    def clear() -> None:
        get_settings.cache_clear()
        get_service_settings.cache_clear()
        get_api_settings.cache_clear()

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHORUS_HOME", str(home))
        for name in ("DATABASE_URL", "BROKER_URL", "CHORUS_MAX_UPLOAD_BYTES"):
            mp.delenv(name, raising=False)
        clear()
        migrate()
        keys = {}
        with session_scope() as session:
            for owner in ("alice", "bob"):
                keys[owner] = create_key(session, owner, "submit", f"test {owner}")[1]
        with TestClient(create_app(ApiSettings(rate_limit_enabled=False)), raise_server_exceptions=False) as client:
            yield {"client": client, "keys": keys, "home": home}
        clear()
