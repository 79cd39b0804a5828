"""The inference service loads an ensemble on its first classify request when the operator allows it
(CHORUS_INFERENCE_LAZY_LOAD, off by default), by its ensemble id or the artifact id of its manifest, for keys
that may see it only; and it serves /docs with its own assets (no CDN), as the job API does.

Real stack: a temporary SQLite CHORUS_HOME with API keys, ensembles recorded by `ingest_stage` as the job
runner records them, tiny-llama on CPU, the apps over ASGI."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from shared.ml.serving.synthetic import write_ensemble, write_random_adapter
from tests.bad_input_apps import auth, isolated_home, make_keys

ROW = {"task": "sst2", "text": "a fine film"}
OWNER = "lazy-other"  # the owner of make_keys("lazy")["other"] (submit + infer)


def _bundle(folder: Path, base: Any, name: str, seed: int) -> str:
    meta = write_random_adapter(
        folder / "adapters" / "g0", base.model, base.info, name="g0", tasks=["sst2"], rank=4, seed=seed, b_scale=0.3
    )
    return write_ensemble(folder, base.info, {"g0": meta}, {"sst2": {"g0": 1.0}}, name=name).fingerprint


def _ingest(workdir: Path, owner: str = OWNER) -> tuple[str, str]:
    """Record a training stage's ensemble as the job runner does: (ensemble id, its manifest's artifact id)."""
    from shared.db.models import Ensemble, Job, new_id
    from shared.db.session import session_scope
    from shared.jobs.ingest import ingest_stage
    from shared.storage import ArtifactStore

    with session_scope() as session:
        job = Job(id=new_id("job"), type="training", status="running", owner=owner)
        session.add(job)
        session.flush()
        ingest_stage(
            session,
            ArtifactStore(),
            job_id=job.id,
            owner=owner,
            stage="training",
            workdir=workdir,
            summary={"artifacts": {"ensemble": "ensemble.json", "adapter:g0": "adapters/g0"}},
        )
        row = session.scalars(select(Ensemble).where(Ensemble.job_id == job.id)).one()
        return row.id, row.artifact_id


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from services.inference.app import create_app
    from services.inference.auth import DbKeyAuthenticator
    from services.inference.sources import ChainSource, DirectoryEnsembleSource, StoreEnsembleSource
    from shared.ml.models import Base

    with isolated_home(tmp_path_factory.mktemp("lazy-home")):
        keys = make_keys("lazy")
        root = tmp_path_factory.mktemp("lazy-ensembles")
        work = tmp_path_factory.mktemp("lazy-work")
        lazy_base = Base.load("tiny-llama", "none", "cpu")
        jobs = {}
        for name, seed in (("one", 1), ("two", 2), ("three", 3), ("many", 4)):
            fingerprint = _bundle(work / name, lazy_base, name, seed)
            jobs[name] = (*_ingest(work / name), fingerprint)
        folder_fp = _bundle(root / "handmade", lazy_base, "handmade", 9)

        def app(base: Any, **settings: Any) -> Any:
            source = ChainSource([StoreEnsembleSource(), DirectoryEnsembleSource(root)])
            return create_app(base=base, source=source, authenticator=DbKeyAuthenticator(0), max_wait_ms=1, **settings)

        yield {
            "lazy": app(lazy_base, lazy_load=True),
            "default": app(Base.load("tiny-llama", "none", "cpu")),
            "keys": keys,
            "jobs": jobs,
            "folder_fp": folder_fp,
        }


def _run(app: Any, calls: Any) -> Any:
    async def main() -> Any:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://inference", timeout=120) as client:
            return await calls(client)

    return asyncio.run(main())


async def _classify(client: httpx.AsyncClient, ensemble_id: str, key: str) -> httpx.Response:
    return await client.post(f"/v1/ensembles/{ensemble_id}/classify", headers=auth(key), json={"rows": [ROW]})


def _loaded(app: Any) -> dict[str, str | None]:
    return dict(app.state.service.owners)


def test_lazy_loading_is_off_by_default_and_docs_are_served_offline(env) -> None:  # type: ignore[no-untyped-def]
    from services.inference.settings import InferenceSettings

    assert InferenceSettings().lazy_load is False and InferenceSettings().docs is True
    ens_id, _, _ = env["jobs"]["one"]

    async def calls(client: httpx.AsyncClient) -> None:
        r = await _classify(client, ens_id, env["keys"]["other"])
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", r.text
        r = await _classify(client, ens_id, env["keys"]["admin"])
        assert r.status_code == 404, r.text  # not even for an admin key: only POST .../load loads
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text
        assert "cdn.jsdelivr.net" not in docs.text and "unpkg.com" not in docs.text
        asset = await client.get("/docs-assets/swagger-ui-bundle.js")
        assert asset.status_code == 200 and len(asset.content) > 100_000
        redoc = await client.get("/redoc")
        assert redoc.status_code == 200 and "/docs-assets/redoc.standalone.js" in redoc.text
        spec = (await client.get("/openapi.json")).json()
        assert "/v1/ensembles/{ensemble_id}/classify" in spec["paths"]

    _run(env["default"], calls)
    assert ens_id not in _loaded(env["default"])


def test_the_owner_loads_a_job_ensemble_by_its_first_request(env) -> None:  # type: ignore[no-untyped-def]
    app, keys = env["lazy"], env["keys"]
    ens_id, _, fingerprint = env["jobs"]["one"]
    metrics = app.state.metrics

    async def calls(client: httpx.AsyncClient) -> None:
        r = await _classify(client, ens_id, keys["infer"])  # another owner's key
        assert r.status_code == 404 and "not loaded" in r.json()["error"]["message"], r.text
        assert ens_id not in _loaded(app)  # ... loads nothing
        before = metrics.lazy_loads._value.get()
        r = await _classify(client, ens_id, keys["other"])  # the job owner's key
        assert r.status_code == 200, r.text
        assert r.json()["fingerprint"] == fingerprint and r.json()["ensemble"] == ens_id
        assert _loaded(app)[ens_id] == OWNER
        again = await _classify(client, ens_id, keys["other"])
        assert again.status_code == 200 and again.json()["results"] == r.json()["results"]
        assert metrics.lazy_loads._value.get() == before + 1  # loaded once
        listed = (await client.get("/v1/ensembles", headers=auth(keys["other"]))).json()["data"]
        assert ens_id in [e["id"] for e in listed]
        r = await _classify(client, ens_id, keys["infer"])  # now loaded: still another owner's
        assert r.status_code == 404, r.text

    _run(app, calls)


def test_an_ensemble_loads_by_the_artifact_id_of_its_manifest(env) -> None:  # type: ignore[no-untyped-def]
    app, keys = env["lazy"], env["keys"]
    _, art_id, fingerprint = env["jobs"]["two"]
    assert art_id.startswith("art-")

    async def calls(client: httpx.AsyncClient) -> None:
        r = await _classify(client, art_id, keys["infer"])
        assert r.status_code == 404, r.text
        r = await _classify(client, art_id, keys["other"])
        assert r.status_code == 200 and r.json()["fingerprint"] == fingerprint, r.text
        assert r.json()["ensemble"] == art_id

    _run(app, calls)
    assert _loaded(app)[art_id] == OWNER


def test_concurrent_first_requests_load_once(env) -> None:  # type: ignore[no-untyped-def]
    app, keys = env["lazy"], env["keys"]
    ens_id, _, fingerprint = env["jobs"]["many"]
    before = app.state.metrics.lazy_loads._value.get()

    async def calls(client: httpx.AsyncClient) -> list[httpx.Response]:
        return list(await asyncio.gather(*(_classify(client, ens_id, keys["other"]) for _ in range(6))))

    answers = _run(app, calls)
    assert [r.status_code for r in answers] == [200] * 6
    assert {r.json()["fingerprint"] for r in answers} == {fingerprint}
    assert app.state.metrics.lazy_loads._value.get() == before + 1


def test_folder_ensembles_and_unknown_ids_load_for_admin_keys_only(env) -> None:  # type: ignore[no-untyped-def]
    app, keys = env["lazy"], env["keys"]

    async def calls(client: httpx.AsyncClient) -> None:
        for ensemble_id in ("handmade", "no-such-ensemble", "ens-doesnotexist", "..x"):
            r = await _classify(client, ensemble_id, keys["other"])
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (ensemble_id, r.text)
            assert ensemble_id not in _loaded(app)
        r = await _classify(client, "no-such-ensemble", keys["admin"])
        assert r.status_code == 404, r.text
        r = await _classify(client, "handmade", keys["admin"])
        assert r.status_code == 200 and r.json()["fingerprint"] == env["folder_fp"], r.text
        assert _loaded(app)["handmade"] == "lazy-admin"  # the loading admin key's owner, as with POST .../load
        r = await _classify(client, "handmade", keys["other"])
        assert r.status_code == 404, r.text
        r = await client.post(
            "/v1/ensembles/handmade/classify", headers=auth(keys["other"]), json={"rows": [ROW] * 300}
        )
        assert r.status_code == 422 and r.json()["error"]["param"] == "rows"  # checked before anything loads

    _run(app, calls)


def test_a_tampered_ensemble_is_refused_without_telling_other_keys_why(env) -> None:  # type: ignore[no-untyped-def]
    import os

    from shared.db.models import Adapter, Artifact, Ensemble
    from shared.db.session import session_scope
    from shared.storage import ArtifactStore

    app, keys = env["lazy"], env["keys"]
    ens_id, _, _ = env["jobs"]["three"]
    with session_scope() as session:
        row = session.get(Ensemble, ens_id)
        adapter = session.get(Adapter, row.members["g0"])
        weights = ArtifactStore().resolve(session.get(Artifact, adapter.artifact_id).path) / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x55
    weights.write_bytes(bytes(raw))

    async def calls(client: httpx.AsyncClient) -> None:
        r = await _classify(client, ens_id, keys["other"])
        assert r.status_code == 404 and "not loaded" in r.json()["error"]["message"], r.text
        r = await _classify(client, ens_id, keys["admin"])
        assert r.status_code == 409 and r.json()["error"]["code"] == "artifact_integrity", r.text

    _run(app, calls)
    assert ens_id not in _loaded(app)
