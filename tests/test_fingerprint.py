"""One ensemble fingerprint everywhere, covering the adapters' bytes; tampered stored files are refused.

The job API and the inference service run for real on a temporary SQLite CHORUS_HOME (tiny-llama on CPU);
ensembles are recorded with `ingest_stage`, exactly as the job runner records a finished training stage.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from shared.ml.serving.synthetic import write_ensemble, write_random_adapter
from shared.ml.training.adapters import WEIGHTS_FILE
from shared.ml.training.ensemble import (
    EnsembleManifest,
    compute_fingerprint,
    load_manifest,
    write_manifest,
)
from shared.storage import sha256_file
from tests.bad_input_apps import auth, isolated_home, job_api, make_keys

ROW = {"task": "sst2", "text": "a fine film"}
OWNER = "fp-other"  # the owner of make_keys("fp")["other"] (submit + infer)

# A hand-built manifest and its fingerprint, computed once: a change of the canonical form (key order,
# separators, float rendering, which keys count) changes this digest.
PINNED = {
    "format": "chorus.ensemble/v1",
    "name": "pinned",
    "version": 2,
    "base": {"base_model": "tiny-llama", "base_revision": "tiny-llama-seed0", "quantization": "none"},
    "max_length": 128,
    "members": [
        {"name": "g0", "path": "adapters/g0", "sha256": "0" * 63 + "1", "role": "group", "tasks": ["sst2"]},
        {"name": "b0", "path": "adapters/b0", "sha256": "ab" * 32, "role": "booster", "tasks": ["sst2"]},
        {"name": "base", "path": None, "sha256": None, "role": "base", "tasks": []},
    ],
    "tasks": {"sst2": {"weights": {"g0": 1.0, "b0": 0.5, "base": -0.5}}, "rte": {"weights": {"g0": 1.0}}},
}
PINNED_FINGERPRINT = "a7901898f4e07a2e33f5b678a42d8d1340054cf5932a6bc5d5e7eadcc51d4a3a"


def _flip_byte(path: Path, offset: int = -5) -> None:
    os.chmod(path, 0o644)  # stored files are read-only
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x55
    path.write_bytes(bytes(raw))


def _write_bundle(folder: Path, base: Any, name: str, seeds: dict[str, int]) -> EnsembleManifest:
    """Adapters (seeded, real PEFT folders on `base`) + a fingerprinted ensemble.json in `folder`."""
    metas = {
        m: write_random_adapter(
            folder / "adapters" / m, base.model, base.info, name=m, tasks=["sst2"], rank=4, seed=seed, b_scale=0.3
        )
        for m, seed in seeds.items()
    }
    weights = {m: 1.0 / len(seeds) for m in seeds}
    return write_ensemble(folder, base.info, metas, {"sst2": weights}, name=name)


def _ingest(workdir: Path, owner: str = OWNER) -> str:
    """Record a training stage's outputs in `workdir` as the job runner does; the ensemble's id."""
    from shared.db.models import Ensemble, Job, new_id
    from shared.db.session import session_scope
    from shared.jobs.ingest import ingest_stage
    from shared.storage import ArtifactStore

    artifacts = {"ensemble": "ensemble.json"}
    artifacts |= {f"adapter:{p.name}": f"adapters/{p.name}" for p in sorted((workdir / "adapters").iterdir())}
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
            summary={"artifacts": artifacts},
        )
        return session.scalars(select(Ensemble.id).where(Ensemble.job_id == job.id)).one()


def _stored_path(artifact_id: str) -> Path:
    from shared.db.models import Artifact
    from shared.db.session import session_scope
    from shared.storage import ArtifactStore

    with session_scope() as session:
        return ArtifactStore().resolve(session.get(Artifact, artifact_id).path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # type: ignore[no-untyped-def]
    from services.inference.app import create_app
    from services.inference.auth import DbKeyAuthenticator
    from services.inference.sources import ChainSource, DirectoryEnsembleSource, StoreEnsembleSource
    from shared.ml.models import Base

    with isolated_home(tmp_path_factory.mktemp("fp-home")):
        keys = make_keys("fp")
        root = tmp_path_factory.mktemp("fp-ensembles")
        base = Base.load("tiny-llama", "none", "cpu")
        source = ChainSource([StoreEnsembleSource(), DirectoryEnsembleSource(root)])
        app = create_app(base=base, source=source, authenticator=DbKeyAuthenticator(0), max_wait_ms=1)
        with (
            TestClient(job_api(rate_limit_enabled=False), raise_server_exceptions=False) as jobs,
            TestClient(app, raise_server_exceptions=False) as inference,
        ):
            yield {
                "jobs": jobs,
                "inference": inference,
                "keys": keys,
                "root": root,
                "base": base,
                "service": app.state.service,
            }


def _load(env: dict[str, Any], ensemble_id: str) -> Any:
    return env["inference"].post(f"/v1/ensembles/{ensemble_id}/load", headers=auth(env["keys"]["admin"]))


# -- the digest itself ------------------------------------------------------------------------------
def test_pinned_digest_of_a_hand_built_manifest() -> None:
    assert compute_fingerprint(PINNED) == PINNED_FINGERPRINT
    assert compute_fingerprint(EnsembleManifest.model_validate(PINNED)) == PINNED_FINGERPRINT
    assert compute_fingerprint({**PINNED, "fingerprint": "anything"}) == PINNED_FINGERPRINT  # its own key is left out
    changed = json.loads(json.dumps(PINNED))
    changed["members"][1]["sha256"] = "ab" * 31 + "ac"  # one member's adapter bytes differ
    assert compute_fingerprint(changed) != PINNED_FINGERPRINT


def test_fingerprint_changes_when_one_adapter_byte_changes(tiny_base, tmp_path: Path) -> None:
    manifest = _write_bundle(tmp_path, tiny_base, "bytes", {"a0": 31, "a1": 32})
    for member in manifest.members:  # the manifest records each member's weights digest
        assert member.sha256 == sha256_file(tmp_path / member.path / WEIGHTS_FILE)
    weights = tmp_path / "adapters" / "a1" / WEIGHTS_FILE
    _flip_byte(weights)
    # Rewrite the manifest as training does: each member's sha256 taken from its weights file.
    members = [m.model_copy(update={"sha256": sha256_file(tmp_path / m.path / WEIGHTS_FILE)}) for m in manifest.members]
    rewritten = write_manifest(
        manifest.model_copy(update={"members": members, "fingerprint": None}), tmp_path / "ensemble.json"
    )
    assert rewritten.member("a0").sha256 == manifest.member("a0").sha256
    assert rewritten.member("a1").sha256 != manifest.member("a1").sha256
    assert rewritten.fingerprint != manifest.fingerprint
    assert load_manifest(tmp_path / "ensemble.json").fingerprint == rewritten.fingerprint


# -- one value in both services ---------------------------------------------------------------------
def test_job_api_and_inference_service_report_the_same_fingerprint(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = _write_bundle(tmp_path, env["base"], "agree", {"c0": 41, "c1": 42})
    ensemble_id = _ingest(tmp_path)
    key = auth(env["keys"]["other"])
    shown = env["jobs"].get(f"/v1/ensembles/{ensemble_id}", headers=key)
    assert shown.status_code == 200, shown.text
    loaded = _load(env, ensemble_id)
    assert loaded.status_code == 200, loaded.text
    classified = env["inference"].post(f"/v1/ensembles/{ensemble_id}/classify", headers=key, json={"rows": [ROW]})
    assert classified.status_code == 200, classified.text
    fingerprint = classified.json()["fingerprint"]
    assert shown.json()["fingerprint"] == fingerprint == loaded.json()["fingerprint"] == manifest.fingerprint
    listed = env["jobs"].get("/v1/ensembles", headers=key, params={"job_id": shown.json()["job_id"]}).json()["data"]
    assert [e["fingerprint"] for e in listed] == [fingerprint]
    # The manifest file's own sha256 is the artifact's, a different value.
    artifact = env["jobs"].get(f"/v1/artifacts/{shown.json()['artifact_id']}", headers=key).json()
    assert artifact["sha256"] == sha256_file(tmp_path / "ensemble.json") != fingerprint
    # The members the inference service verified are those the manifest (and so the fingerprint) names.
    served = env["inference"].get(f"/v1/ensembles/{ensemble_id}", headers=key).json()
    assert {m["name"]: m["sha256"] for m in served["members"]} == {m.name: m.sha256 for m in manifest.members}
    assert set(shown.json()["members"]) == {"c0", "c1"}
    assert (
        env["inference"].delete(f"/v1/ensembles/{ensemble_id}", headers=auth(env["keys"]["admin"])).status_code == 200
    )


# -- tampering --------------------------------------------------------------------------------------
def test_an_edited_stored_manifest_is_refused_by_both_services(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _write_bundle(tmp_path, env["base"], "edited", {"d0": 51, "d1": 52})
    ensemble_id = _ingest(tmp_path)
    key, admin = auth(env["keys"]["other"]), auth(env["keys"]["admin"])
    shown = env["jobs"].get(f"/v1/ensembles/{ensemble_id}", headers=key).json()
    assert env["jobs"].get(f"/v1/ensembles/{ensemble_id}/content", headers=key).status_code == 200
    loaded = _load(env, ensemble_id)
    assert loaded.status_code == 200, loaded.text
    stored = _stored_path(shown["artifact_id"])
    data = json.loads(stored.read_text())
    data["tasks"]["sst2"]["weights"]["d1"] = 5.0
    for variant in ("re-fingerprinted", "fingerprint removed"):  # both pass load_manifest's own check
        if variant == "re-fingerprinted":
            data["fingerprint"] = compute_fingerprint(data)
        else:
            data.pop("fingerprint")
        os.chmod(stored, 0o644)
        stored.write_text(json.dumps(data))
        load_manifest(stored)  # the edit is self-consistent: only the artifact record can tell
        r = _load(env, ensemble_id)
        assert r.status_code == 409, (variant, r.text)
        error = r.json()["error"]
        assert error["code"] == "artifact_integrity" and error["param"] == "id", error
        assert ensemble_id in error["message"] and "manifest was modified" in error["message"], error
        content = env["jobs"].get(f"/v1/ensembles/{ensemble_id}/content", headers=key)
        assert content.status_code == 409 and content.json()["error"]["code"] == "artifact_integrity", content.text
        # The refused reload left the verified version serving.
        current = env["inference"].get(f"/v1/ensembles/{ensemble_id}", headers=key).json()
        assert current["fingerprint"] == shown["fingerprint"] and current["tasks"]["sst2"]["weights"]["d1"] == 0.5
    assert env["inference"].delete(f"/v1/ensembles/{ensemble_id}", headers=admin).status_code == 200


def test_an_edited_stored_adapter_is_refused_naming_the_member(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    manifest = _write_bundle(tmp_path, env["base"], "flipped", {"e0": 61, "e1": 62})
    ensemble_id = _ingest(tmp_path)
    key = auth(env["keys"]["other"])
    shown = env["jobs"].get(f"/v1/ensembles/{ensemble_id}", headers=key).json()
    folders = {
        m: _stored_path(env["jobs"].get(f"/v1/adapters/{a}", headers=key).json()["artifact_id"])
        for m, a in shown["members"].items()
    }
    names = [m.name for m in manifest.members]

    def refused(member: str) -> None:
        r = _load(env, ensemble_id)
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "artifact_integrity" and error["param"] == f"members[{names.index(member)}]", error
        assert f"member {member!r}" in error["message"], error
        assert ensemble_id not in env["service"].ensembles  # nothing half-loaded

    # A changed lora_alpha rescales the adapter without touching its weights' sha256.
    config = folders["e0"] / "adapter_config.json"
    original = config.read_text()
    config.write_text(json.dumps({**json.loads(original), "lora_alpha": 64}))
    refused("e0")
    config.write_text(original)
    _flip_byte(folders["e1"] / WEIGHTS_FILE)
    refused("e1")


def test_a_flipped_byte_in_a_folder_adapter_is_refused_naming_the_member(env) -> None:  # type: ignore[no-untyped-def]
    folder = env["root"] / "flipped-folder"
    manifest = _write_bundle(folder, env["base"], "flipped-folder", {"f0": 71, "f1": 72})
    _flip_byte(folder / "adapters" / "f0" / WEIGHTS_FILE)
    r = _load(env, "flipped-folder")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "adapter_integrity" and "member 'f0'" in error["message"], error
    assert error["param"] == f"members[{[m.name for m in manifest.members].index('f0')}]"
    assert "flipped-folder" not in env["service"].ensembles


def test_a_folder_manifest_without_its_fingerprint_is_refused(env) -> None:  # type: ignore[no-untyped-def]
    folder = env["root"] / "unsigned"
    _write_bundle(folder, env["base"], "unsigned", {"g0": 81})
    data = json.loads((folder / "ensemble.json").read_text())
    data["tasks"]["sst2"]["weights"]["g0"] = 2.0  # an edit whose author also dropped the fingerprint
    del data["fingerprint"]
    (folder / "ensemble.json").write_text(json.dumps(data))
    r = _load(env, "unsigned")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_ensemble" and "records no fingerprint" in error["message"], error
    assert "unsigned" not in env["service"].ensembles


def test_ingest_refuses_a_manifest_that_does_not_match_its_adapters(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from shared.db.models import Ensemble
    from shared.db.session import session_scope

    # fingerprint no longer matches the content
    edited = tmp_path / "edited"
    _write_bundle(edited, env["base"], "ingest-edited", {"h0": 91})
    data = json.loads((edited / "ensemble.json").read_text())
    data["tasks"]["sst2"]["weights"]["h0"] = 3.0
    (edited / "ensemble.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="fingerprint") as info:
        _ingest(edited)
    assert str(edited) not in str(info.value)  # no server path in a job's error
    # an adapter's weights are not those the manifest records
    swapped = tmp_path / "swapped"
    _write_bundle(swapped, env["base"], "ingest-swapped", {"h1": 92, "h2": 93})
    _flip_byte(swapped / "adapters" / "h2" / WEIGHTS_FILE)
    with pytest.raises(ValueError, match="member 'h2'"):
        _ingest(swapped)
    with session_scope() as session:  # nothing recorded for either
        names = set(session.scalars(select(Ensemble.name)))
    assert not names & {"ingest-edited", "ingest-swapped"}
