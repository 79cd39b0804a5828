"""Smoke test of the embedded defaults: `chorus up` with no DATABASE_URL / BROKER_URL runs the API and a
worker on a SQLite file and kombu's SQLAlchemy broker; the CLI submits, follows and downloads over HTTP;
an oversized upload streamed to the real server is cut off with 413."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import REPO, wait_for

pytestmark = pytest.mark.integration
ADMIN = "chorus_embedded-smoke-admin-key-0001"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("embedded-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    env.update(
        {
            "CHORUS_HOME": str(home),
            "CHORUS_ADMIN_KEY": ADMIN,
            "CHORUS_MAX_UPLOAD_BYTES": "65536",
            "CHORUS_LEASE_SECONDS": "5",
            "CHORUS_REAP_INTERVAL": "1",
        }
    )
    log = (home / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.main", "up", "--port", str(port), "--no-inference"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 90, 0.5, "the embedded API")
        yield {"url": url, "home": home, "env": {**env, "CHORUS_API_URL": url, "CHORUS_API_KEY": ADMIN}, "proc": proc}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _cli(embedded, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        cwd=REPO,
        env=embedded["env"],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_embedded_defaults_run_a_job_from_the_cli(embedded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = embedded["home"]
    assert (home / "chorus.db").exists() and (home / "broker.db").exists()
    submitted = _cli(
        embedded,
        "submit",
        "evaluation",
        "--tasks",
        "cb,rte",
        "--model",
        "tiny-llama",
        "--set",
        "max_examples=4",
        "--follow",
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "succeeded" in submitted.stdout and "job succeeded" in submitted.stdout
    job_id = submitted.stdout.split("submitted ", 1)[1].split()[0]
    status = _cli(embedded, "status", job_id, "--json")
    assert '"status": "succeeded"' in status.stdout
    results = _cli(embedded, "results", job_id, "--download", str(tmp_path / "out"))
    assert results.returncode == 0, results.stderr
    assert (tmp_path / "out" / "evaluation" / "report.json").read_text().startswith("{")
    bad = _cli(embedded, "submit", "evaluation", "--tasks", "nope", "--model", "tiny-llama")
    assert bad.returncode == 2 and "params.tasks" in bad.stderr
    stopped = _cli(embedded, "cancel", job_id)
    assert stopped.returncode == 2 and "invalid_state" in stopped.stderr


def test_streamed_oversized_upload_is_cut_off(embedded) -> None:  # type: ignore[no-untyped-def]
    sent = 0

    def body():  # type: ignore[no-untyped-def]
        nonlocal sent
        yield (b'--xx\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n')
        for _ in range(2000):  # 2000 x 8 KiB = 16 MiB, far over the 64 KiB cap
            chunk = b'{"text": "a", "label": "b"}\n' * 280
            sent += len(chunk)
            yield chunk

    headers = {"Authorization": f"Bearer {ADMIN}", "content-type": "multipart/form-data; boundary=xx"}
    try:
        response = httpx.post(f"{embedded['url']}/v1/datasets", headers=headers, content=body(), timeout=30)
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "payload_too_large"
    except (httpx.RemoteProtocolError, httpx.WriteError):
        pass  # the server answered 413 and closed while the client was still sending
    assert sent < 16 * 1024 * 1024, "the whole body was read"
    print(f"client had sent {sent:,} bytes when the server cut the upload off")
    tasks = embedded["home"] / "tasks"
    assert not tasks.exists() or list(tasks.iterdir()) == []
    datasets = httpx.get(f"{embedded['url']}/v1/datasets", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert datasets["data"] == []
