"""`chorus inference` (services/cli/serve.py) starts a real uvicorn process on the app factory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
LAUNCH = (
    "import typer; from services.cli.serve import register\n"
    "app = typer.Typer()\n"
    "@app.callback()\n"
    "def main() -> None: ...\n"
    "register(app)\n"
    "app()\n"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_inference_command_serves_the_app(tmp_path):
    port = _free_port()
    env = {**os.environ, "CHORUS_INFERENCE_ENSEMBLES_DIR": str(tmp_path), "CHORUS_INFERENCE_USE_DATABASE": "0"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            LAUNCH,
            "inference",
            "--port",
            str(port),
            "--model",
            "tiny-llama",
            "--quantization",
            "none",
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert health is not None, proc.stdout.read().decode() if proc.poll() is not None else "server did not start"
        assert health.status_code == 200
        assert health.json()["base"] == {"base_model": "tiny-llama", "quantization": "none", "compute_dtype": "float32"}
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/ensembles/x/classify", json={"rows": [{"task": "sst2", "text": "a"}]}
        )
        assert r.status_code == 401  # real DB-backed auth, no key
        r = httpx.get(f"http://127.0.0.1:{port}/docs")
        assert r.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in r.text  # docs by default, no CDN
        assert httpx.get(f"http://127.0.0.1:{port}/docs-assets/swagger-ui.css").status_code == 200
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
