"""docker-compose.yml and the Dockerfiles stay in step with the CLI and the settings (Docker cannot run
here, so every `chorus ...` command they use is parsed by the real CLI, and every env var is checked)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _cli_commands() -> list[list[str]]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    commands = [svc["command"] for svc in compose["services"].values() if svc.get("command", [""])[0] == "chorus"]
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        for match in re.finditer(r"^CMD (\[.*\])$", (REPO / dockerfile).read_text(), re.M):
            commands.append(yaml.safe_load(match.group(1)))
    return commands


def test_every_chorus_command_in_the_deploy_files_parses() -> None:
    from services.cli.main import app

    root = typer.main.get_command(app)
    seen = set()
    for argv in _cli_commands():
        name, args = argv[1], argv[2:]
        if name == "inference" and name not in root.commands:  # type: ignore[attr-defined]
            pytest.skip("`chorus inference` (services.cli.serve) is not registered in this checkout")
        assert name in root.commands, f"unknown command: {shlex.join(argv)}"  # type: ignore[attr-defined]
        command = root.commands[name]  # type: ignore[attr-defined]
        command.make_context(name, list(args))  # raises on an unknown option or a bad value
        seen.add(name)
    assert {"api", "worker"} <= seen


def test_compose_env_vars_are_settings() -> None:
    from services.api.settings import ApiSettings
    from shared.config import Settings
    from shared.jobs.config import ServiceSettings

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    known = {"DATABASE_URL", "BROKER_URL"}
    for settings in (Settings, ServiceSettings, ApiSettings):
        known |= {f"CHORUS_{name.upper()}" for name in settings.model_fields}
    for name, svc in compose["services"].items():
        if name in ("postgres", "redis"):
            continue
        unknown = set(svc["environment"]) - known
        assert not unknown, f"{name}: {unknown}"
        assert "chorus-home:/var/lib/chorus" in svc["volumes"], name
    assert compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["count"] == 1
    for svc in ("postgres", "redis", "api", "worker", "inference"):
        assert "healthcheck" in compose["services"][svc], svc
