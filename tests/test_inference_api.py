"""The inference service over HTTP (ASGI, tiny-llama on CPU): results equal the offline ensemble, hot swaps
fail no request, bad rows get 422 naming the row, base/quantization mismatches 409, tampered adapters are
refused, API-key scopes are enforced, ensembles are visible to their owner's keys (and admin keys) only."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import threading
from pathlib import Path

import httpx
import pytest
import torch

from shared.ml.models import Base
from shared.ml.serving.synthetic import write_ensemble, write_random_adapter

TASKS = ("cb", "rte", "sst2")
N_EXAMPLES = 3


def _adapters(folder: Path, base: Base, specs: dict[str, tuple[list[str], int, str]], info=None) -> dict:
    return {
        name: write_random_adapter(
            folder / "adapters" / name,
            base.model,
            info or base.info,
            name=name,
            tasks=tasks,
            rank=4,
            seed=seed,
            b_scale=0.3,
            role=role,
            targets=("q_proj", "v_proj", "o_proj"),
        )
        for name, (tasks, seed, role) in specs.items()
    }


ALPHA = {"g0": (["cb", "rte"], 1, "group"), "g1": (["sst2"], 2, "group"), "b0": (["cb"], 3, "booster")}
ALPHA_V1 = {"cb": {"g0": 1.0, "b0": 0.5, "base": -0.5, "g1": 0.0}, "rte": {"g0": 1.0}, "sst2": {"g1": 1.0, "g0": 0.25}}
ALPHA_V2 = {"cb": {"g0": 0.5, "g1": 0.5}, "rte": {"g0": 1.0, "b0": 1.0}, "sst2": {"g1": 2.0}}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from services.inference.app import create_app
    from services.inference.auth import DbKeyAuthenticator
    from services.inference.sources import DirectoryEnsembleSource
    from shared.db.keys import create_key
    from shared.db.session import migrate, session_scope
    from shared.ml.tasks.registry import get_task
    from shared.ml.training.ensemble import ensemble_choice_logits, load_manifest

    root = tmp_path_factory.mktemp("inference") / "ensembles"
    base = Base.load("tiny-llama", "none", "cpu")
    alpha = root / "alpha"
    metas = _adapters(alpha, base, ALPHA)
    v1 = write_ensemble(alpha, base.info, metas, ALPHA_V1, name="alpha", version=1, base_member="base")
    (alpha / "v1.json").write_text((alpha / "ensemble.json").read_text())
    v2 = write_ensemble(alpha, base.info, metas, ALPHA_V2, name="alpha", version=2, base_member="base")
    (alpha / "v2.json").write_text((alpha / "ensemble.json").read_text())
    (alpha / "ensemble.json").write_text((alpha / "v1.json").read_text())

    beta = root / "beta"
    write_ensemble(
        beta, base.info, _adapters(beta, base, {"h0": (["sst2"], 11, "group")}), {"sst2": {"h0": 1.0}}, name="beta"
    )

    # 409: the manifest names another quantization; an adapter trained on another base revision
    nf4 = _copy(alpha, root / "nf4")
    data = json.loads((nf4 / "ensemble.json").read_text())
    data["base"]["quantization"] = "nf4"
    from shared.ml.training.ensemble import compute_fingerprint

    data["fingerprint"] = compute_fingerprint(data)
    (nf4 / "ensemble.json").write_text(json.dumps(data))
    foreign = root / "foreign"
    other = Base.load("tiny-llama-seed1", "none", "cpu")
    write_ensemble(
        foreign,
        base.info,
        _adapters(foreign, base, {"f0": (["sst2"], 5, "group")}, info=other.info),
        {"sst2": {"f0": 1.0}},
        name="foreign",
    )
    # tampered weights (same size, one byte flipped)
    tampered = _copy(alpha, root / "tampered")
    weights = tampered / "adapters" / "g1" / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0x55
    weights.write_bytes(bytes(raw))
    # manifest edited after the fact (fingerprint no longer matches)
    edited = _copy(alpha, root / "edited")
    data = json.loads((edited / "ensemble.json").read_text())
    data["tasks"]["sst2"]["weights"]["g1"] = 3.0
    (edited / "ensemble.json").write_text(json.dumps(data))

    # offline reference (its own base: AdapterPool wraps the model it is given)
    ref_base = Base.load("tiny-llama", "none", "cpu")
    examples = {t: get_task(t).split("test")[:N_EXAMPLES] for t in TASKS}
    expected = {}
    for name in ("v1", "v2"):
        manifest = load_manifest(alpha / f"{name}.json")
        expected[manifest.fingerprint] = {
            t: torch.softmax(ensemble_choice_logits(ref_base, manifest, alpha, t, examples[t]), -1) for t in TASKS
        }
    assert set(expected) == {v1.fingerprint, v2.fingerprint}

    migrate()
    with session_scope() as session:
        keys = {
            scope: create_key(session, f"owner-{scope}", [scope], f"test {scope}")[1]
            for scope in ("admin", "infer", "submit")
        }
        for owner in ("alice", "bob"):  # two tenants with inference keys
            keys[owner] = create_key(session, f"owner-{owner}", ["infer"], f"test {owner}")[1]
        revoked_row, keys["revoked"] = create_key(session, "owner-x", ["admin"], "revoked")
        from shared.db.models import utcnow

        revoked_row.revoked_at = utcnow()

    app = create_app(
        base=base,
        source=DirectoryEnsembleSource(root),
        authenticator=DbKeyAuthenticator(0),
        max_wait_ms=3,
        max_row_chars=2000,
        max_rows_per_request=50,
        max_adapters=8,
        max_body_bytes=200_000,
    )
    return {
        "app": app,
        "root": root,
        "keys": keys,
        "examples": examples,
        "expected": expected,
        "v1": v1.fingerprint,
        "v2": v2.fingerprint,
        "service": app.state.service,
    }


def _h(env, scope="admin"):
    return {"Authorization": f"Bearer {env['keys'][scope]}"}


def _client(env) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=env["app"]), base_url="http://inference", timeout=120)


def _rows(env, tasks=TASKS):
    return [{"task": t, "fields": ex.fields} for t in tasks for ex in env["examples"][t]]


def _check(env, body) -> None:
    """Every row's probabilities equal the offline ensemble of the fingerprint that served it (1e-4)."""
    expected = env["expected"][body["fingerprint"]]
    counters = {t: 0 for t in TASKS}
    for row in body["results"]:
        t = row["task"]
        got = torch.tensor(list(row["probabilities"].values()))
        want = expected[t][counters[t]]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        counters[t] += 1


async def _ensure_alpha(client, env, version="v1"):
    """alpha (a folder ensemble) loaded at `version`, owned by the owner of the "infer" key."""
    alpha = env["root"] / "alpha"
    (alpha / "ensemble.json").write_text((alpha / f"{version}.json").read_text())
    r = await client.post("/v1/ensembles/alpha/load", headers=_h(env), json={"owner": "owner-infer"})
    assert r.status_code == 200, r.text
    return r.json()


def test_classify_equals_offline_ensemble(env):
    async def main():
        async with _client(env) as client:
            loaded = await _ensure_alpha(client, env)
            assert loaded["fingerprint"] == env["v1"]
            r = await client.post("/v1/ensembles/alpha/classify", headers=_h(env, "infer"), json={"rows": _rows(env)})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["fingerprint"] == env["v1"] and body["ensemble"] == "alpha" and body["version"] == 1
            assert len(body["results"]) == N_EXAMPLES * len(TASKS)
            _check(env, body)
            cb = body["results"][0]
            assert cb["task"] == "cb" and set(cb["probabilities"]) == {"entailment", "contradiction", "neutral"}
            assert cb["label"] == max(cb["probabilities"], key=cb["probabilities"].get)
            assert set(cb["members"]) == {"g0", "b0", "base"}  # g1 has weight 0 for cb: never run
            assert cb["members"]["base"]["weight"] == -0.5
            sst2 = body["results"][-1]
            assert set(sst2["members"]) == {"g1", "g0"}
            # the text shorthand for a one-field task gives the same answer as fields
            ex = env["examples"]["sst2"][0]
            r2 = await client.post(
                "/v1/ensembles/alpha/classify",
                headers=_h(env, "infer"),
                json={"rows": [{"task": "sst2", "text": ex.fields["sentence"]}]},
            )
            assert r2.status_code == 200, r2.text
            assert r2.json()["results"][0]["probabilities"] == pytest.approx(
                body["results"][2 * N_EXAMPLES]["probabilities"], abs=1e-5
            )
            listed = await client.get("/v1/ensembles", headers=_h(env, "infer"))
            assert listed.status_code == 200
            assert [e["id"] for e in listed.json()["data"]] == ["alpha"]
            one = await client.get("/v1/ensembles/alpha", headers=_h(env, "infer"))
            assert one.json()["fingerprint"] == env["v1"]
            again = await client.post("/v1/ensembles/alpha/load", headers=_h(env))
            assert again.status_code == 200 and again.json()["loaded"] is False  # idempotent

    asyncio.run(main())


def test_bad_rows_get_422_naming_row_and_field(env):
    cases = [
        ([{"task": "sst2", "text": "fine"}, {"task": "nope", "text": "x"}], "rows[1].task"),
        ([{"task": "copa", "fields": {"premise": "a"}}], "rows[0].task"),  # a real task, not in the ensemble
        (
            [
                {"task": "sst2", "text": "ok"},
                {"task": "sst2", "text": "ok"},
                {"task": "cb", "fields": {"premise": "It rains."}},
            ],
            "rows[2].fields.hypothesis",
        ),
        ([{"task": "sst2", "text": "x" * 2001}], "rows[0].fields.sentence"),
        ([{"task": "cb", "text": "two fields needed"}], "rows[0].text"),
        ([{"task": "sst2"}], "rows[0].fields"),
        ([{"task": "sst2", "fields": {"sentence": ["not", "text"]}}], "rows[0].fields.sentence"),
        ([{"task": "sst2", "text": "a", "extra": 1}], "rows[0].extra"),
        ([], "rows"),
        ([{"task": "sst2", "text": "a"}] * 51, "rows"),
    ]

    async def main():
        async with _client(env) as client:
            await _ensure_alpha(client, env)
            for rows, param in cases:
                r = await client.post("/v1/ensembles/alpha/classify", headers=_h(env, "infer"), json={"rows": rows})
                assert r.status_code == 422, (param, r.text)
                error = r.json()["error"]
                assert error["param"] == param, (param, error)
                assert set(error) == {"code", "message", "param"} and error["message"]
            r = await client.post("/v1/ensembles/alpha/classify", headers=_h(env, "infer"), content=b"{not json")
            assert r.status_code == 422 and "error" in r.json()
            r = await client.post(
                "/v1/ensembles/alpha/classify",
                headers=_h(env, "infer"),
                json={"rows": [{"task": "sst2", "text": "y" * 300_000}]},
            )
            assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
            r = await client.post(
                "/v1/ensembles/missing/classify",
                headers=_h(env, "infer"),
                json={"rows": [{"task": "sst2", "text": "a"}]},
            )
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

    asyncio.run(main())


def test_load_refusals(env):
    async def main():
        async with _client(env) as client:
            r = await client.post("/v1/ensembles/nf4/load", headers=_h(env))
            assert r.status_code == 409 and r.json()["error"]["code"] == "base_mismatch", r.text
            assert "quantization" in r.json()["error"]["message"]
            r = await client.post("/v1/ensembles/foreign/load", headers=_h(env))
            assert r.status_code == 409 and r.json()["error"]["code"] == "base_mismatch", r.text
            r = await client.post("/v1/ensembles/tampered/load", headers=_h(env))
            assert r.status_code == 422 and r.json()["error"]["code"] == "adapter_integrity", r.text
            assert "sha256" in r.json()["error"]["message"]
            r = await client.post("/v1/ensembles/edited/load", headers=_h(env))
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_ensemble", r.text
            r = await client.post("/v1/ensembles/nowhere/load", headers=_h(env))
            assert r.status_code == 404
            r = await client.post("/v1/ensembles/bad$id/load", headers=_h(env))
            assert r.status_code == 422 and r.json()["error"]["param"] == "id"
            r = await client.post("/v1/ensembles/..%2F..%2Fetc/load", headers=_h(env))
            assert r.status_code in (404, 422)
            listed = await client.get("/v1/ensembles", headers=_h(env))
            assert {e["id"] for e in listed.json()["data"]} <= {"alpha", "beta"}  # nothing half-loaded

    asyncio.run(main())


def test_scopes(env):
    row = {"rows": [{"task": "sst2", "text": "good"}]}

    async def main():
        async with _client(env) as client:
            await _ensure_alpha(client, env)
            for method, url, body in [
                ("POST", "/v1/ensembles/alpha/classify", row),
                ("GET", "/v1/ensembles", None),
                ("POST", "/v1/ensembles/alpha/load", None),
                ("DELETE", "/v1/ensembles/beta", None),
            ]:
                r = await client.request(method, url, json=body)
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", url
                r = await client.request(
                    method, url, json=body, headers={"Authorization": "Bearer chorus_wrong_key_123456"}
                )
                assert r.status_code == 401, url
                r = await client.request(method, url, json=body, headers=_h(env, "revoked"))
                assert r.status_code == 401, url
            for url in ("/v1/ensembles/alpha/load",):
                assert (await client.post(url, headers=_h(env, "infer"))).status_code == 403
            assert (await client.delete("/v1/ensembles/alpha", headers=_h(env, "infer"))).status_code == 403
            r = await client.post("/v1/ensembles/alpha/classify", json=row, headers=_h(env, "submit"))
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
            assert (
                await client.post("/v1/ensembles/alpha/classify", json=row, headers=_h(env, "infer"))
            ).status_code == 200
            assert (
                await client.post("/v1/ensembles/alpha/classify", json=row, headers=_h(env, "admin"))
            ).status_code == 200
            health = await client.get("/health")
            assert health.status_code == 200 and health.json()["status"] == "ok"

    asyncio.run(main())


def test_hot_swap_under_load_fails_no_request(env):
    """Concurrent classify traffic while alpha is hot-swapped v1 <-> v2 and beta is loaded and unloaded."""
    rng = random.Random(0)
    all_rows = _rows(env)

    async def traffic(client, n):
        out = []
        for _ in range(n):
            rows = rng.sample(all_rows, rng.randint(1, len(all_rows)))
            rows.sort(key=lambda r: TASKS.index(r["task"]))  # _check counts rows per task in order
            r = await client.post("/v1/ensembles/alpha/classify", headers=_h(env, "infer"), json={"rows": rows})
            out.append((rows, r))
        return out

    async def admin(client):
        codes = []
        for i in range(6):
            codes.append((await client.post("/v1/ensembles/beta/load", headers=_h(env))).status_code)
            await _ensure_alpha(client, env, "v2" if i % 2 == 0 else "v1")
            await asyncio.sleep(0.01)
            codes.append((await client.delete("/v1/ensembles/beta", headers=_h(env))).status_code)
        return codes

    async def main():
        async with _client(env) as client:
            await _ensure_alpha(client, env)
            results = await asyncio.gather(*(traffic(client, 6) for _ in range(6)), admin(client))
        return results[:-1], results[-1]

    traffic_results, admin_codes = asyncio.run(main())
    assert admin_codes == [200] * len(admin_codes)
    seen = set()
    for batch in traffic_results:
        for rows, r in batch:
            assert r.status_code == 200, r.text
            body = r.json()
            seen.add(body["fingerprint"])
            expected = env["expected"][body["fingerprint"]]
            counters = {t: 0 for t in TASKS}
            for row_in, row_out in zip(rows, body["results"], strict=True):
                t = row_in["task"]
                idx = next(i for i, ex in enumerate(env["examples"][t]) if ex.fields == row_in["fields"])
                got = torch.tensor(list(row_out["probabilities"].values()))
                torch.testing.assert_close(got, expected[t][idx], atol=1e-4, rtol=0)
                counters[t] += 1
    assert seen <= {env["v1"], env["v2"]} and seen
    service = env["service"]
    # after the swaps: only alpha's adapters are pinned, once; beta's were released
    alpha = service.ensembles["alpha"]
    assert set(service.engine.pinned()) == set(alpha.adapter_keys)


def test_unload_while_requests_are_in_flight(env):
    service = env["service"]

    async def main():
        async with _client(env) as client:
            await _ensure_alpha(client, env)
            gate = threading.Event()
            service.model_executor.submit(gate.wait, 30)  # hold the model thread: requests queue behind it
            tasks = [
                asyncio.create_task(
                    client.post(
                        "/v1/ensembles/alpha/classify", headers=_h(env, "infer"), json={"rows": _rows(env, ("cb",))}
                    )
                )
                for _ in range(4)
            ]
            for _ in range(200):
                await asyncio.sleep(0.01)
                if service.ensembles["alpha"].in_flight == 4:
                    break
            assert service.ensembles["alpha"].in_flight == 4
            r = await client.delete("/v1/ensembles/alpha", headers=_h(env))
            assert r.status_code == 200 and r.json()["in_flight"] == 4
            late = await client.post(
                "/v1/ensembles/alpha/classify", headers=_h(env, "infer"), json={"rows": _rows(env, ("cb",))}
            )
            assert late.status_code == 404  # unloaded: new requests are refused...
            gate.set()
            done = await asyncio.gather(*tasks)
            for r in done:  # ...but the ones in flight finish on the ensemble they started with
                assert r.status_code == 200, r.text
                _check(env, r.json())
            await asyncio.sleep(0.05)
            assert not service.engine.pinned()  # the last request released the adapters
            await _ensure_alpha(client, env)

    asyncio.run(main())


def test_metrics(env):
    async def main():
        async with _client(env) as client:
            await _ensure_alpha(client, env)
            await client.post("/v1/ensembles/alpha/classify", headers=_h(env, "infer"), json={"rows": _rows(env)})
            return await client.get("/metrics")

    r = asyncio.run(main())
    assert r.status_code == 200
    text = r.text
    for name in (
        "chorus_inference_requests_total",
        "chorus_inference_request_seconds_bucket",
        "chorus_inference_batch_pairs_bucket",
        "chorus_inference_loaded_adapters",
        "chorus_inference_loaded_ensembles",
        "chorus_inference_rows_total",
    ):
        assert name in text, name
    assert 'route="/v1/ensembles/{ensemble_id}/classify"' in text


def _stored_ensemble(service, folder: Path, name: str, owner: str) -> str:
    """An ensemble recorded as a training job of `owner` records it (database rows + artifact store); its id."""
    from shared.db.models import Ensemble
    from shared.db.session import session_scope
    from shared.jobs.ingest import ingest_stage
    from shared.storage import ArtifactStore

    base = service.base
    metas = {
        n: write_random_adapter(folder / "adapters" / n, base.model, base.info, name=n, tasks=["sst2"], seed=20 + i)
        for i, n in enumerate(["s0", "s1"])
    }
    write_ensemble(folder, base.info, metas, {"sst2": {"s0": 1.0, "s1": 0.5}}, name=name)
    with session_scope() as session:
        ingest_stage(
            session,
            ArtifactStore(),
            job_id=None,
            owner=owner,
            stage="training",
            workdir=folder,
            summary={
                "artifacts": {"adapters/s0": "adapters/s0", "adapters/s1": "adapters/s1", "ensemble": "ensemble.json"}
            },
        )
        return session.query(Ensemble).filter_by(name=name).one().id


def test_ensembles_from_the_job_store(env, tmp_path):
    """An ensemble recorded by a training job (database row + artifact store) loads by its id."""
    from services.inference.sources import StoreEnsembleSource

    service = env["service"]
    ensemble_id = _stored_ensemble(service, tmp_path / "stage", "stored", "owner-infer")
    original = service.source
    service.source = StoreEnsembleSource()
    try:

        async def main():
            async with _client(env) as client:
                r = await client.post(f"/v1/ensembles/{ensemble_id}/load", headers=_h(env))
                assert r.status_code == 200, r.text
                r = await client.post(
                    f"/v1/ensembles/{ensemble_id}/classify",
                    headers=_h(env, "infer"),
                    json={"rows": [{"task": "sst2", "text": "a fine film"}]},
                )
                assert r.status_code == 200, r.text
                assert set(r.json()["results"][0]["members"]) == {"s0", "s1"}
                assert (await client.delete(f"/v1/ensembles/{ensemble_id}", headers=_h(env))).status_code == 200

        asyncio.run(main())
    finally:
        service.source = original


def test_ensembles_are_owner_scoped(env, tmp_path):
    """A job's ensemble belongs to the job's owner; a folder ensemble to the owner the admin names. Another
    owner's key gets the same 404 as for an id that is not loaded (classify, get, and absent from the list);
    admin keys see every ensemble; unloading stays an admin route."""
    from services.inference.sources import ChainSource, DirectoryEnsembleSource, StoreEnsembleSource

    service = env["service"]
    stored = _stored_ensemble(service, tmp_path / "stage", "alices", "owner-alice")
    row = {"rows": [{"task": "sst2", "text": "a fine film"}]}
    original = service.source
    service.source = ChainSource([StoreEnsembleSource(), DirectoryEnsembleSource(env["root"])])

    async def visible(client, who):
        r = await client.get("/v1/ensembles", headers=_h(env, who))
        assert r.status_code == 200, r.text
        return {e["id"] for e in r.json()["data"]}

    async def can_use(client, who, ensemble_id):
        got = await client.get(f"/v1/ensembles/{ensemble_id}", headers=_h(env, who))
        classified = await client.post(f"/v1/ensembles/{ensemble_id}/classify", headers=_h(env, who), json=row)
        assert (got.status_code == 200) == (classified.status_code == 200), (got.text, classified.text)
        if got.status_code != 200:
            missing = await client.get("/v1/ensembles/not-loaded-anywhere", headers=_h(env, who))
            for r in (got, classified):  # indistinguishable from an id that is not loaded
                assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
                assert r.json()["error"]["param"] == missing.json()["error"]["param"] == "id"
            return False
        return ensemble_id in await visible(client, who)

    async def main():
        async with _client(env) as client:
            loaded = await client.post(f"/v1/ensembles/{stored}/load", headers=_h(env))
            assert loaded.status_code == 200 and loaded.json()["owner"] == "owner-alice", loaded.text
            assert await can_use(client, "alice", stored)
            assert not await can_use(client, "bob", stored)
            assert await can_use(client, "admin", stored)
            # A job's ensemble cannot be handed to another owner.
            r = await client.post(f"/v1/ensembles/{stored}/load", headers=_h(env), json={"owner": "owner-bob"})
            assert r.status_code == 422 and r.json()["error"]["param"] == "owner", r.text
            assert not await can_use(client, "bob", stored)

            # A folder ensemble: the owner named at load; a hot swap keeps it; admin keys see it anyway.
            r = await client.post("/v1/ensembles/beta/load", headers=_h(env), json={"owner": "owner-bob"})
            assert r.status_code == 200 and r.json()["owner"] == "owner-bob", r.text
            assert await can_use(client, "bob", "beta") and not await can_use(client, "alice", "beta")
            r = await client.post("/v1/ensembles/beta/load", headers=_h(env))
            assert r.status_code == 200 and r.json()["owner"] == "owner-bob", r.text
            assert await visible(client, "bob") == {"beta"} and stored not in await visible(client, "bob")
            assert {stored, "beta"} <= await visible(client, "admin")

            # Unload: admin only (scope checked before any lookup, so it leaks nothing either).
            for who in ("alice", "bob"):
                r = await client.delete(f"/v1/ensembles/{stored}", headers=_h(env, who))
                assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
            for ensemble_id in (stored, "beta"):
                assert (await client.delete(f"/v1/ensembles/{ensemble_id}", headers=_h(env))).status_code == 200

            # A folder loaded without an owner by an admin key belongs to that key's owner; one loaded with
            # no principal at all (preload at startup) to nobody: admin keys only.
            r = await client.post("/v1/ensembles/beta/load", headers=_h(env))
            assert r.status_code == 200 and r.json()["owner"] == "owner-admin"
            assert not await can_use(client, "bob", "beta")
            await client.delete("/v1/ensembles/beta", headers=_h(env))
            await service.preload(["beta"])
            assert service.owners["beta"] is None
            assert not await can_use(client, "alice", "beta") and not await can_use(client, "bob", "beta")
            assert await can_use(client, "admin", "beta")
            assert (await client.delete("/v1/ensembles/beta", headers=_h(env))).status_code == 200

    try:
        asyncio.run(main())
    finally:
        service.source = original
