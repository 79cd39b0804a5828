"""The compose stack of tests/compose: base images (official, or stand-ins built from Debian packages when
no image registry answers), the build site folder (CA bundle, local torch wheel), `docker compose` with the
CPU override on free loopback ports, health waits, and a teardown that leaves nothing behind."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "docker" / "standin"
SITE = REPO / ".carry" / "docker-site"  # the Dockerfiles' default SITE_DIR (ignored by git and not committed)
FILES = ["docker-compose.yml", "docker-compose.cpu.yml", "tests/compose/docker-compose.test.yml"]
CHORUS_LABEL = "org.opencontainers.image.title=chorus"  # on every stage of our Dockerfiles
# Official image -> (stand-in Dockerfile, compose variable naming the image).
BASES = {
    "postgres:16": ("postgres.Dockerfile", "CHORUS_POSTGRES_IMAGE"),
    "redis:7": ("redis.Dockerfile", "CHORUS_REDIS_IMAGE"),
    "python:3.11-slim": ("python.Dockerfile", "CHORUS_BASE_IMAGE"),
}


def run(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float | None = None,
    capture: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output (the tail) in the message."""
    proc = subprocess.run(
        cmd,
        env=env,
        text=True,
        timeout=timeout,
        cwd=REPO,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.STDOUT if capture else None,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{(proc.stdout or '')[-4000:]}")
    return proc


def compose_command() -> list[str]:
    """`docker compose` (v2) when the plugin is there, else `docker-compose` (v1.29); CHORUS_COMPOSE overrides."""
    if os.environ.get("CHORUS_COMPOSE"):
        return os.environ["CHORUS_COMPOSE"].split()
    if run(["docker", "compose", "version"], check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise RuntimeError("neither `docker compose` nor `docker-compose` is installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], check=False).returncode == 0


def pullable(tag: str) -> bool:
    """Whether the official image is here or can be pulled (no registry here: fails within seconds)."""
    if image_exists(tag):
        return True
    try:
        return run(["docker", "pull", "-q", tag], check=False, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pip_settings() -> tuple[Path | None, list[Path]]:
    """This machine's pip CA bundle and find-links folders (env, then `pip config list`)."""
    config: dict[str, str] = {}
    listed = run([sys.executable, "-m", "pip", "config", "list"], check=False).stdout or ""
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        config[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    cert = os.environ.get("PIP_CERT") or config.get("cert") or "/etc/ssl/certs/ca-certificates.crt"
    links = f"{os.environ.get('PIP_FIND_LINKS', '')} {config.get('find-links', '')}".split()
    folders = [Path(x.removeprefix("file://")) for x in links if Path(x.removeprefix("file://")).is_dir()]
    return (Path(cert) if Path(cert).is_file() else None), folders


def torch_pin() -> str:
    return run([sys.executable, "docker/requirements.py", "pyproject.toml", "--pin", "torch"]).stdout.strip()


class Stack:
    """One compose project of this checkout (CPU override + test settings), with its own images."""

    def __init__(self, keep_images: bool = False, log: Callable[[str], None] = print) -> None:
        # A fixed CHORUS_COMPOSE_PROJECT with keep_images reuses the images of the previous run (local loops).
        self.project = os.environ.get("CHORUS_COMPOSE_PROJECT") or f"chorusct{os.getpid()}"
        self.keep_images = keep_images
        self.log = log
        self.compose = compose_command()
        self.admin_key = "chorus_" + secrets.token_urlsafe(32).replace("-", "a").replace("_", "b")
        self.api_port, self.inference_port = free_port(), free_port()
        self.standins: list[str] = []
        self.timings: dict[str, float] = {}
        self.env: dict[str, str] = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "CHORUS_ADMIN_KEY": self.admin_key,
            "CHORUS_BIND_ADDRESS": "127.0.0.1",
            "CHORUS_API_PORT": str(self.api_port),
            "CHORUS_INFERENCE_PORT": str(self.inference_port),
            "CHORUS_INFERENCE_MODEL": "tiny-llama",
            "CHORUS_INFERENCE_QUANTIZATION": "none",
            "CHORUS_DATA": os.environ.get("CHORUS_DATA_DIR") or str(REPO.parent / "shared" / "data"),
        }
        for name in ("DOCKER_HOST", "DOCKER_CONFIG"):
            if os.environ.get(name):
                self.env[name] = os.environ[name]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.monotonic()
        try:
            return fn()
        finally:
            self.timings[name] = time.monotonic() - start
            self.log(f"{name}: {self.timings[name]:.0f}s")

    # -- images -------------------------------------------------------------------------------------
    def prepare_bases(self) -> None:
        """Use the official base images when they can be pulled; else build stand-ins from Debian packages."""
        missing = [tag for tag in BASES if not pullable(tag)]
        if not missing:
            return
        debian = f"chorus-standin/bookworm:{self.project}"
        run([str(STANDIN / "base.sh"), debian], capture=False)
        self.standins.append(debian)
        for tag in missing:
            dockerfile, variable = BASES[tag]
            standin = f"chorus-standin/{tag.split(':')[0]}:{self.project}"
            self.log(f"{tag} cannot be pulled: building the stand-in {standin}")
            run(
                [
                    "docker",
                    "build",
                    "-q",
                    "-f",
                    str(STANDIN / dockerfile),
                    "--build-arg",
                    f"BASE_IMAGE={debian}",
                    "-t",
                    standin,
                    str(STANDIN),
                ],
                env={**os.environ, "DOCKER_BUILDKIT": "0"},
            )
            self.standins.append(standin)
            self.env[variable] = standin

    def prepare_site(self) -> None:
        """SITE_DIR for the builds: this machine's CA bundle (its TLS to the registries is intercepted) and
        the pinned CPU torch wheel from pip's find-links (then torch comes from PyPI + that wheel, not from
        the PyTorch index)."""
        shutil.rmtree(SITE, ignore_errors=True)
        (SITE / "wheels").mkdir(parents=True)
        cert, folders = pip_settings()
        if cert:
            shutil.copyfile(cert, SITE / "ca.crt")
        version = torch_pin().split("==")[1]
        wheels = [w for folder in folders for w in folder.glob(f"torch-{version}+cpu-*.whl")]
        for wheel in wheels[:1]:
            try:
                os.link(wheel, SITE / "wheels" / wheel.name)
            except OSError:
                shutil.copyfile(wheel, SITE / "wheels" / wheel.name)
            self.env["CHORUS_TORCH_INDEX_URL"] = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
        self.log(f"site: CA bundle {cert}, wheels {[w.name for w in wheels[:1]]}")

    def build(self) -> None:
        self.dc("build", "api", "worker-cpu", "inference-cpu", capture=False)

    # -- compose ------------------------------------------------------------------------------------
    def dc(
        self, *args: str, check: bool = True, capture: bool = True, timeout: float | None = None
    ) -> subprocess.CompletedProcess[str]:
        files = [arg for f in FILES for arg in ("-f", str(REPO / f))]
        return run(
            [*self.compose, "-p", self.project, *files, *args],
            env=self.env,
            check=check,
            capture=capture,
            timeout=timeout,
        )

    def config(self) -> dict[str, Any]:
        import yaml

        return yaml.safe_load(self.dc("config").stdout)

    def container(self, service: str) -> str:
        ids = self.dc("ps", "-q", service).stdout.split()
        if len(ids) != 1:
            raise RuntimeError(f"expected one {service} container, found {ids}")
        return ids[0]

    def health(self, service: str) -> str:
        state = json.loads(run(["docker", "inspect", "--format", "{{json .State}}", self.container(service)]).stdout)
        if state.get("Status") in ("exited", "dead"):
            raise RuntimeError(f"{service} {state['Status']} (exit {state.get('ExitCode')}):\n{self.logs(service)}")
        return str((state.get("Health") or {}).get("Status", state.get("Status")))

    def wait_healthy(self, services: list[str], timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        pending = list(services)
        while pending:
            pending = [s for s in pending if self.health(s) != "healthy"]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(
                    f"not healthy after {timeout:.0f}s: {pending}\n" + "\n".join(self.logs(s) for s in pending)
                )
            if pending:
                time.sleep(2)

    def up(self) -> None:
        self.dc("up", "-d", "--no-build", capture=False)
        self.wait_healthy(["postgres", "redis", "api", "worker-cpu", "inference-cpu"])

    def logs(self, service: str, tail: int = 60) -> str:
        return self.dc("logs", "--no-color", "--tail", str(tail), service, check=False).stdout or ""

    def exec(self, service: str, *cmd: str) -> str:
        return self.dc("exec", "-T", service, *cmd).stdout

    def volumes(self) -> list[str]:
        """The project's named volumes that exist (as compose names them in the file)."""
        fmt = '{{.Label "com.docker.compose.volume"}}'
        return run(
            ["docker", "volume", "ls", "--filter", f"label=com.docker.compose.project={self.project}", "--format", fmt]
        ).stdout.split()

    def images(self) -> list[str]:
        """The images this project built (compose tags them <project>_<service>)."""
        out = run(["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"]).stdout.split()
        return [i for i in out if i.startswith((f"{self.project}_", f"{self.project}-"))]

    def teardown(self) -> None:
        """Containers, networks and volumes always; images too unless keep_images (fast local re-runs)."""
        rmi = [] if self.keep_images else ["--rmi", "local"]
        self.dc("down", "-v", "--remove-orphans", *rmi, check=False, capture=False)
        if self.keep_images:
            return
        for image in self.images() + self.standins[::-1]:
            run(["docker", "rmi", "-f", image], check=False)
        # Stages of our multi-stage builds left untagged (they carry the Dockerfiles' label).
        run(["docker", "image", "prune", "-f", "--filter", f"label={CHORUS_LABEL}"], check=False)
        shutil.rmtree(SITE, ignore_errors=True)
