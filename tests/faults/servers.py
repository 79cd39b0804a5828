"""A PostgreSQL server and a Redis server of the fault suite's own: own ports, own data directories under a
temporary directory, started, stopped, killed and restarted by the tests (never the machine's shared
instances). PostgreSQL refuses to run as root, so as root its processes run as the `postgres` user."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


def postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin that has initdb and postgres (else PATH's)."""
    versions = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    versions.sort(key=lambda b: int(b.parent.name) if b.parent.name.isdigit() else 0)
    if versions:
        return versions[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def missing() -> str | None:
    """Why the suite cannot run here (None when it can)."""
    if postgres_bin() is None:
        return "no PostgreSQL server binaries (initdb, postgres) under /usr/lib/postgresql/*/bin or on PATH"
    if shutil.which("redis-server") is None:
        return "no redis-server on PATH"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no postgres user to run PostgreSQL as"
    return None


def die_with_parent() -> list[str]:
    """A command prefix that has the process SIGKILLed if the test process dies without cleaning up."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise RuntimeError(f"{what} did not come up (exit code {proc.poll() if proc else None}):\n{tail}")


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, timeout: float = 30) -> None:
    """Send `sig` to the process; SIGKILL its process group if it has not exited within `timeout`."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class PostgresServer:
    """`postgres -D <root>/data -p <port>` in the foreground of a Popen (its pid is the postmaster's)."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.bin = postgres_bin()
        assert self.bin is not None
        self.root, self.port = root, port or free_port()
        self.data, self.log_path = root / "data", root / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.owner: dict[str, Any] = {}
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            self.owner = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
            os.chown(root, user.pw_uid, user.pw_gid)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def init(self) -> None:
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            **self.owner,
        )

    def start(self) -> None:
        import psycopg

        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *die_with_parent(),
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-k",
                str(self.root),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **self.owner,
        )
        log.close()

        def ready() -> bool:
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                return False

        _wait(ready, 60, "PostgreSQL", self.proc, self.log_path)

    def stop(self) -> None:
        """Fast shutdown (clients are disconnected, data kept)."""
        _stop(self.proc, signal.SIGINT)


class RedisServer:
    """`redis-server` with append-only persistence (fsync always), restartable with or without its data."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root, self.port = root, port or free_port()
        self.generation = 0
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    @property
    def data(self) -> Path:
        return self.root / f"data-{self.generation}"

    @property
    def log_path(self) -> Path:
        return self.root / "redis.log"

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, keep_data: bool = True) -> None:
        import redis

        if not keep_data:
            self.generation += 1
        self.data.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                *die_with_parent(),
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.data),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--daemonize",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def ready() -> bool:
            try:
                return bool(redis.Redis.from_url(self.url(), socket_connect_timeout=1).ping())
            except redis.RedisError:
                return False

        _wait(ready, 30, "Redis", self.proc, self.log_path)

    def kill9(self) -> None:
        """Crash: SIGKILL, nothing flushed beyond what fsync=always already wrote."""
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM)
