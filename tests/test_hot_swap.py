"""Hot swap really swaps: two versions of one ensemble id (different adapters, different fingerprints) are
swapped while threads keep classifying. Requests in flight across the swap finish on the old version, every
request sent after the swap returns carries the new fingerprint and the new adapters' outputs, none fails."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from shared.ml.serving.synthetic import write_ensemble, write_random_adapter
from tests.bad_input_apps import auth, isolated_home, make_keys

ID = "swapped"
THREADS = 4
AFTER_SWAP = 3  # responses per thread sent after the swap returned
N_ROWS = 3


def _versions(folder: Path, base: Any) -> dict[str, Any]:
    """v1.json (adapter a0) and v2.json (adapter b0) in `folder`; ensemble.json starts as v1."""
    versions = {}
    for version, (member, seed) in enumerate([("a0", 101), ("b0", 102)], start=1):
        meta = write_random_adapter(
            folder / "adapters" / member,
            base.model,
            base.info,
            name=member,
            tasks=["sst2"],
            rank=4,
            seed=seed,
            b_scale=0.5,
            targets=("q_proj", "v_proj", "o_proj"),
        )
        versions[f"v{version}"] = write_ensemble(
            folder, base.info, {member: meta}, {"sst2": {member: 1.0}}, name=ID, version=version
        )
        (folder / f"v{version}.json").write_text((folder / "ensemble.json").read_text())
    (folder / "ensemble.json").write_text((folder / "v1.json").read_text())
    return versions


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # type: ignore[no-untyped-def]
    from services.inference.app import create_app
    from services.inference.auth import DbKeyAuthenticator
    from services.inference.sources import DirectoryEnsembleSource
    from shared.ml.models import Base
    from shared.ml.tasks.registry import get_task
    from shared.ml.training.ensemble import ensemble_choice_logits

    with isolated_home(tmp_path_factory.mktemp("swap-home")):
        keys = make_keys("swap")
        root = tmp_path_factory.mktemp("swap-ensembles")
        base = Base.load("tiny-llama", "none", "cpu")
        versions = _versions(root / ID, base)
        examples = get_task("sst2").split("test")[:N_ROWS]
        ref_base = Base.load("tiny-llama", "none", "cpu")  # the offline reference, on a base of its own
        expected = {
            m.fingerprint: torch.softmax(ensemble_choice_logits(ref_base, m, root / ID, "sst2", examples), -1)
            for m in versions.values()
        }
        app = create_app(
            base=base,
            source=DirectoryEnsembleSource(root),
            authenticator=DbKeyAuthenticator(0),
            max_wait_ms=1,
            max_adapters=4,
        )
        with TestClient(app, raise_server_exceptions=False) as client:
            yield {
                "client": client,
                "keys": keys,
                "root": root,
                "service": app.state.service,
                "expected": expected,
                "v1": versions["v1"].fingerprint,
                "v2": versions["v2"].fingerprint,
                "rows": [{"task": "sst2", "fields": ex.fields} for ex in examples],
            }


def test_versions_differ_in_fingerprint_and_output(env) -> None:  # type: ignore[no-untyped-def]
    assert env["v1"] != env["v2"]
    assert (env["expected"][env["v1"]] - env["expected"][env["v2"]]).abs().max() > 1e-3


def test_hot_swap_under_concurrent_requests(env) -> None:  # type: ignore[no-untyped-def]
    client, service, admin = env["client"], env["service"], auth(env["keys"]["admin"])
    infer = auth(env["keys"]["infer"])
    folder = env["root"] / ID
    loaded = client.post(f"/v1/ensembles/{ID}/load", headers=admin, json={"owner": "swap-infer"})
    assert loaded.status_code == 200 and loaded.json()["fingerprint"] == env["v1"], loaded.text

    swapping, swapped, stop = threading.Event(), threading.Event(), threading.Event()
    progress = threading.Condition()
    # per response: (sent after the swap began, sent after it returned, finished after it began, status, body)
    results: list[list[tuple[bool, bool, bool, int, Any]]] = [[] for _ in range(THREADS)]

    def worker(i: int) -> None:
        while not stop.is_set():
            began, returned = swapping.is_set(), swapped.is_set()
            r = client.post(f"/v1/ensembles/{ID}/classify", headers=infer, json={"rows": env["rows"]})
            with progress:
                results[i].append((began, returned, swapping.is_set(), r.status_code, r.json()))
                progress.notify_all()

    def wait_for(condition: Any, what: str) -> None:
        with progress:
            assert progress.wait_for(condition, timeout=300), what

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(THREADS)]
    for t in threads:
        t.start()
    gate = threading.Event()
    swap: dict[str, Any] = {}
    try:
        wait_for(lambda: all(results), "every thread got a response from v1")
        # Hold the model thread so that every thread has one request in flight on v1 while the swap runs. Wait
        # until the hold is running: a batch already on the model thread could otherwise still finish (and its
        # thread send the next request) after in_flight was read.
        holding = threading.Event()
        service.model_executor.submit(lambda: (holding.set(), gate.wait(300)))
        assert holding.wait(300), "the model thread never took the hold"
        v1 = service.ensembles[ID]
        # Every thread blocked on v1: in_flight at THREADS and no response arriving for 0.5 s (a batch the model
        # thread finished just before the hold can still be answered, and its thread send the next request, after
        # in_flight first reads THREADS).
        stable_since, seen = time.monotonic(), None
        for _ in range(3000):
            with progress:
                counts = [len(r) for r in results]
            if counts != seen or v1.in_flight != THREADS:
                stable_since, seen = time.monotonic(), counts
            elif time.monotonic() - stable_since > 0.5:
                break
            threading.Event().wait(0.01)
        assert v1.in_flight == THREADS

        def do_swap() -> None:
            (folder / "ensemble.json").write_text((folder / "v2.json").read_text())
            swapping.set()
            swap["response"] = client.post(f"/v1/ensembles/{ID}/load", headers=admin)
            swapped.set()

        swapper = threading.Thread(target=do_swap, daemon=True)
        swapper.start()
        for _ in range(3000):  # the load has begun (it holds the admin lock) and waits for the model thread
            if any(lock.locked() for lock in service._admin_locks.values()):
                break
            threading.Event().wait(0.01)
        assert any(lock.locked() for lock in service._admin_locks.values())
        assert not swapped.is_set() and service.ensembles[ID] is v1 and v1.in_flight == THREADS
        gate.set()
        swapper.join(300)
        assert swapped.is_set(), "the swap did not return"
        wait_for(lambda: all(sum(r[1] for r in rs) >= AFTER_SWAP for rs in results), "responses after the swap")
    finally:
        gate.set()
        stop.set()
        for t in threads:
            t.join(300)

    r = swap["response"]
    assert r.status_code == 200 and r.json()["loaded"] is True and r.json()["fingerprint"] == env["v2"], r.text
    flat = [entry for rs in results for entry in rs]
    assert all(status == 200 for *_, status, _ in flat), [body for *_, status, body in flat if status != 200]
    assert {body["fingerprint"] for *_, body in flat} == {env["v1"], env["v2"]}
    for began, returned, _, _, body in flat:
        if not began:
            assert body["fingerprint"] == env["v1"]  # sent before the swap began
        if returned:
            assert body["fingerprint"] == env["v2"] and body["version"] == 2  # sent after it returned
        want = env["expected"][body["fingerprint"]]  # the outputs are those of the version it names
        got = torch.tensor([list(row["probabilities"].values()) for row in body["results"]])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # The requests held in flight across the swap finished, on v1.
    across = [body for began, _, finished_late, _, body in flat if not began and finished_late]
    assert len(across) == THREADS and all(b["fingerprint"] == env["v1"] for b in across)
    # v1's adapters were unpinned once its last request finished; only v2's stay pinned.
    v2 = service.ensembles[ID]
    for _ in range(3000):
        if set(service.engine.pinned()) == set(v2.adapter_keys):
            break
        threading.Event().wait(0.01)
    assert set(service.engine.pinned()) == set(v2.adapter_keys) and v1.adapter_keys != v2.adapter_keys
    one = client.get(f"/v1/ensembles/{ID}", headers=infer).json()
    assert one["fingerprint"] == env["v2"] and [m["name"] for m in one["members"]] == ["b0"]
