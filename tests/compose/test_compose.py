"""`docker compose up` for real: the images are built (stand-in bases from Debian packages when no image
registry answers), the stack runs with the CPU override, and everything below goes over HTTP from the host:
a key, a tiny-llama pipeline followed to `succeeded`, its ensemble loaded and classifying in the inference
container, a worker container restarted mid-job whose job still finishes exactly once, and `down` + `up`
with the volumes kept finding the jobs and artifacts again. Everything it made is removed at the end.

Needs Docker (engine + compose) and root or the docker group: `make compose-test` (or `.ci/run`, which
installs and starts Docker). Skipped unless CHORUS_COMPOSE_TEST=1. CHORUS_COMPOSE_KEEP_IMAGES=1 with a fixed
CHORUS_COMPOSE_PROJECT keeps the images between local runs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.compose.stack import Stack

pytestmark = [
    pytest.mark.skipif(
        os.environ.get("CHORUS_COMPOSE_TEST") != "1",
        reason="the compose test runs with `make compose-test` (needs Docker; CHORUS_COMPOSE_TEST=1)",
    ),
    pytest.mark.timeout(3600),
]
PIPELINE = {
    "model": "tiny-llama",
    "quantization": "none",
    "tasks": ["cb", "rte", "copa"],
    "groups": 2,
    "seed": 0,
    "max_train": 16,
    "max_val": 8,
    "max_test": 8,
    "affinity": {"dim": 16},
    "training": {"epochs": 2},
}
TERMINAL = ("succeeded", "failed", "cancelled")
SERVICES = ["postgres", "redis", "api", "worker-cpu", "inference-cpu"]
STATE: dict[str, Any] = {}


def say(message: str) -> None:
    print(f"[compose-test] {message}", flush=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack(keep_images=os.environ.get("CHORUS_COMPOSE_KEEP_IMAGES") == "1", log=say)
    started = time.monotonic()
    try:
        s.timed("base images", s.prepare_bases)
        s.timed("site folder", s.prepare_site)
        s.timed("build project images", s.build)
        s.timed("up (until healthy)", s.up)
        yield s
    finally:
        s.timed("teardown", s.teardown)
        say(
            "timings: "
            + ", ".join(f"{k} {v:.0f}s" for k, v in s.timings.items())
            + f"; total {time.monotonic() - started:.0f}s"
        )


def admin(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.admin_key}"}


def user(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def api(stack: Stack) -> httpx.Client:
    return httpx.Client(base_url=stack.api_url, timeout=60)


def events(stack: Stack, key: str, job_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    after = None
    with api(stack) as http:
        while True:
            params: dict[str, Any] = {"limit": 1000, **({"after": after} if after is not None else {})}
            page = http.get(f"/v1/jobs/{job_id}/events", headers=user(key), params=params).json()
            out += page["data"]
            if not page["has_more"]:
                return out
            after = page["last_id"]


def job(stack: Stack, key: str, job_id: str) -> dict[str, Any]:
    with api(stack) as http:
        r = http.get(f"/v1/jobs/{job_id}", headers=user(key))
        assert r.status_code == 200, r.text
        return dict(r.json())


def submit(stack: Stack, key: str, params: dict[str, Any]) -> str:
    with api(stack) as http:
        r = http.post("/v1/jobs", headers=user(key), json={"type": "pipeline", "params": params})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)


def rows() -> list[dict[str, Any]]:
    """Two validation rows of each pipeline task, as an HTTP client sends them (label and index dropped)."""
    from tests.compose.stack import REPO

    data = os.environ.get("CHORUS_DATA_DIR") or str(REPO.parent / "shared" / "data")
    out = []
    for task in PIPELINE["tasks"]:
        with open(os.path.join(data, task, "val.jsonl")) as fh:
            for line in list(fh)[:2]:
                fields = {k: v for k, v in json.loads(line).items() if k not in ("label", "idx")}
                out.append({"task": task, "fields": fields})
    return out


def classify(stack: Stack, key: str, ensemble_id: str) -> dict[str, Any]:
    with httpx.Client(base_url=stack.inference_url, timeout=120) as http:
        loaded = http.post(f"/v1/ensembles/{ensemble_id}/load", headers=admin(stack))
        assert loaded.status_code == 200, loaded.text
        r = http.post(f"/v1/ensembles/{ensemble_id}/classify", headers=user(key), json={"rows": rows()})
        assert r.status_code == 200, r.text
        return dict(r.json())


def exactly_once(stack: Stack, key: str, job_id: str) -> dict[str, Any]:
    """The evidence that a job ran to success once: events, stage attempts and artifact rows."""
    messages = [e["message"] for e in events(stack, key, job_id)]
    finished = Counter(m.split(" finished")[0] for m in messages if m.startswith("stage ") and " finished" in m)
    with api(stack) as http:
        arts = http.get(f"/v1/jobs/{job_id}/artifacts", headers=user(key)).json()["data"]
    pairs = Counter((a["stage"], a["name"]) for a in arts)
    return {
        "succeeded_events": Counter(messages)["job succeeded"],
        "stage_finished": dict(finished),
        "duplicate_artifacts": [p for p, n in pairs.items() if n > 1],
        "artifacts": len(arts),
        "messages": messages,
    }


# -- the scenario, in order ------------------------------------------------------------------------------
def test_cpu_services_twin_the_gpu_ones_and_images_carry_only_what_they_need(stack: Stack) -> None:
    config = stack.config()["services"]
    for gpu, cpu in (("worker", "worker-cpu"), ("inference", "inference-cpu")):
        assert config[gpu]["profiles"] == ["gpu"] and "deploy" not in config[cpu]
        assert config[gpu]["command"] == config[cpu]["command"]
        assert sorted(config[gpu]["volumes"], key=str) == sorted(config[cpu]["volumes"], key=str)
        assert {k: v for k, v in config[cpu]["environment"].items() if k in config[gpu]["environment"]} == config[gpu][
            "environment"
        ], cpu
    running = stack.dc("ps", "--services", "--filter", "status=running").stdout.split()
    assert sorted(running) == sorted(SERVICES)
    probe = (
        "import importlib.util as u; print(*(u.find_spec(m) is not None for m in ('torch', 'bitsandbytes', 'cvxpy')))"
    )
    assert stack.exec("api", "python", "-c", probe).split() == ["False", "False", "False"]
    assert stack.exec("worker-cpu", "python", "-c", probe).split() == ["True", "True", "True"]
    for service in ("api", "worker-cpu", "inference-cpu"):
        assert stack.exec(service, "id", "-u").strip() == "1000", service


def test_key_and_pipeline_job_followed_to_succeeded(stack: Stack) -> None:
    from services.client import Client

    with api(stack) as http:
        r = http.post("/v1/keys", headers=admin(stack), json={"owner": "compose", "scopes": ["submit", "infer"]})
    assert r.status_code == 201, r.text
    key = STATE["key"] = r.json()["key"]
    # A dataset upload: the API image imports it without the ML stack (pyarrow, numpy, scikit-learn only).
    csv = "text,label\n" + "".join(f"great film {i},positive\nawful film {i},negative\n" for i in range(20))
    with api(stack) as http:
        r = http.post(
            "/v1/datasets",
            headers=user(key),
            files={"file": ("reviews.csv", csv)},
            data={"name": "reviews", "text_fields": "text", "label_field": "label"},
        )
    assert r.status_code == 201, r.text
    STATE["dataset"] = r.json()["id"]
    job_id = STATE["job1"] = submit(stack, key, PIPELINE)
    start = time.monotonic()
    with Client(stack.api_url, key) as client:
        for event in client.follow(job_id, poll=2.0):
            if (event.get("data") or {}).get("type") != "progress":
                say(f"{job_id}: {event['message']}")
            assert time.monotonic() - start < 1800, "the pipeline did not finish within 30 min"
    done = job(stack, key, job_id)
    say(f"pipeline {job_id} {done['status']} in {time.monotonic() - start:.0f}s")
    assert done["status"] == "succeeded", done
    assert [(s["name"], s["status"], s["attempts"]) for s in done["stages"]] == [
        ("affinity", "succeeded", 1),
        ("grouping", "succeeded", 1),
        ("training", "succeeded", 1),
    ]
    # Sent to the broker when created (not by the reaper after a failed send), and run once.
    evidence = exactly_once(stack, key, job_id)
    assert not [m for m in evidence["messages"] if "broker unavailable" in m], evidence["messages"]
    assert evidence["succeeded_events"] == 1 and not evidence["duplicate_artifacts"]
    with api(stack) as http:
        ensembles = http.get("/v1/ensembles", headers=user(key), params={"job_id": job_id}).json()["data"]
    STATE["ensemble"] = next(e for e in ensembles if e["name"] == "chorus")


def test_inference_container_loads_the_ensemble_and_classifies(stack: Stack) -> None:
    ensemble = STATE["ensemble"]
    out = classify(stack, STATE["key"], ensemble["id"])
    assert out["fingerprint"] == ensemble["fingerprint"] and len(out["results"]) == len(rows())
    for row, result in zip(rows(), out["results"], strict=False):
        assert result["task"] == row["task"] and result["label"] in result["probabilities"]
        assert abs(sum(result["probabilities"].values()) - 1) < 1e-4
    STATE["probabilities"] = [r["probabilities"] for r in out["results"]]
    say(f"inference: {len(out['results'])} rows classified by {ensemble['id']} (fingerprint {out['fingerprint'][:12]})")


def test_worker_container_restarted_mid_job_finishes_it_exactly_once(stack: Stack) -> None:
    key = STATE["key"]
    job_id = STATE["job2"] = submit(stack, key, {**PIPELINE, "seed": 1})

    def training_running() -> bool:
        j = job(stack, key, job_id)
        assert j["status"] not in TERMINAL, j
        stages = {s["name"]: s["status"] for s in j["stages"]}
        return stages.get("grouping") == "succeeded" and stages.get("training") == "running"

    wait_for(training_running, 1800, "the training stage to start", 0.5)
    lease_before = job(stack, key, job_id)
    old = stack.container("worker-cpu")
    say(f"restarting worker-cpu during {job_id}'s training stage (attempt {lease_before['attempt']})")
    stack.dc("restart", "-t", "1", "worker-cpu")  # SIGTERM, then SIGKILL after 1 s: the job process dies
    assert stack.container("worker-cpu") == old  # the same container, restarted
    done = wait_for(lambda: (j := job(stack, key, job_id))["status"] in TERMINAL and j, 1800, f"{job_id} to finish")
    evidence = exactly_once(stack, key, job_id)
    say(
        f"restart: {job_id} {done['status']}, attempt {done['attempt']}, stages "
        f"{[(s['name'], s['attempts']) for s in done['stages']]}, 'job succeeded' x{evidence['succeeded_events']}, "
        f"stages finished {evidence['stage_finished']}, {evidence['artifacts']} artifacts, duplicates "
        f"{evidence['duplicate_artifacts']}"
    )
    say(
        "restart events: "
        + " | ".join(m for m in evidence["messages"] if "requeued" in m or "resuming" in m or "succeeded" in m)
    )
    assert done["status"] == "succeeded", done
    assert done["attempt"] == 2, "the job was not interrupted by the restart (it ran once, in one attempt)"
    assert [(s["name"], s["status"], s["attempts"]) for s in done["stages"]] == [
        ("affinity", "succeeded", 1),
        ("grouping", "succeeded", 1),
        ("training", "succeeded", 2),
    ]
    assert evidence["succeeded_events"] == 1 and not evidence["duplicate_artifacts"]
    assert evidence["stage_finished"] == {"stage affinity": 1, "stage grouping": 1, "stage training": 1}
    assert any(m.startswith("resuming after finished stage(s): affinity, grouping") for m in evidence["messages"])
    assert any("requeued" in m for m in evidence["messages"])


def test_down_and_up_with_volumes_kept_finds_jobs_and_artifacts(stack: Stack) -> None:
    key = STATE["key"]
    before: dict[str, list[dict[str, Any]]] = {}
    with api(stack) as http:
        for name in ("job1", "job2"):
            before[STATE[name]] = http.get(f"/v1/jobs/{STATE[name]}/artifacts", headers=user(key)).json()["data"]
    stack.dc("down")  # containers and network go; the named volumes stay
    assert stack.dc("ps", "-q").stdout.split() == []
    assert set(stack.volumes()) == {"pgdata", "redisdata", "chorus-home"}
    stack.up()
    with api(stack) as http:
        listed = http.get("/v1/jobs", headers=user(key), params={"limit": 100}).json()["data"]
        assert {j["id"]: j["status"] for j in listed} == {STATE["job1"]: "succeeded", STATE["job2"]: "succeeded"}
        assert http.get(f"/v1/datasets/{STATE['dataset']}", headers=user(key)).status_code == 200
        checked = 0
        for job_id, artifacts in before.items():
            after = http.get(f"/v1/jobs/{job_id}/artifacts", headers=user(key)).json()["data"]
            assert [(a["id"], a["sha256"]) for a in after] == [(a["id"], a["sha256"]) for a in artifacts]
            for art in artifacts:
                if art["kind"] != "file":
                    continue
                content = http.get(f"/v1/artifacts/{art['id']}/content", headers=user(key))
                assert content.status_code == 200, art
                assert hashlib.sha256(content.content).hexdigest() == art["sha256"], art["name"]
                checked += 1
    out = classify(stack, key, STATE["ensemble"]["id"])
    again = [r["probabilities"] for r in out["results"]]
    for first, second in zip(STATE["probabilities"], again, strict=False):
        assert first.keys() == second.keys() and all(abs(first[k] - second[k]) < 1e-5 for k in first)
    say(
        f"persistence: after down/up both jobs listed as succeeded, the uploaded dataset found, {checked} artifact files re-downloaded with "
        f"their sha256, the ensemble reloaded and classified the same rows to the same probabilities"
    )
