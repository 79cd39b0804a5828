"""Regression tests of the hardening against bad input and leaks: model names at job submit, the bootstrap
admin key's file, forwarded headers under uvicorn, portable adapter identities, server paths in error
messages, and the inference service's documented errors."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.bad_input_apps import ENSEMBLE, auth, inference_app, isolated_home, job_api, make_keys, store_state

EVAL = {"model": "tiny-llama", "tasks": ["cb", "rte"], "max_examples": 4}


# -- model names (torch-free) ------------------------------------------------------------------------
def test_model_names_registry_and_allowed_dirs(tmp_path: Path) -> None:
    from shared.ml.model_names import ModelNameError, check_api_model, parse_dirs, portable_name, tiny_llama_seed

    names = ("tiny-llama", "tiny-llama-seed0", "tiny-llama-seed7", "smollm2-135m")
    assert [tiny_llama_seed(n) for n in names] == [0, 0, 7, None]
    for name in ("tiny-llama-seed8", "tiny-llama-seed01", "tiny-llama-seed-1", "tiny-llama-seed", "tiny-llama-seed1x"):
        with pytest.raises(ModelNameError):
            tiny_llama_seed(name)
    allowed = tmp_path / "models"
    (allowed / "mine").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)
    dirs = parse_dirs(f" {allowed} ,")
    assert dirs == [allowed.resolve()]
    assert check_api_model("smollm2-135m") == "smollm2-135m"
    assert check_api_model(str(allowed / "mine"), dirs) == str(allowed / "mine")
    for name, dirs_given in [
        (str(allowed / "mine"), []),
        (str(outside), dirs),
        (str(allowed / "escape"), dirs),
        (str(allowed / ".." / "elsewhere"), dirs),
        ("models/mine", dirs),
        ("tmp", dirs),
    ]:
        with pytest.raises(ModelNameError):
            check_api_model(name, dirs_given)
    assert portable_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_name("tiny-llama") == "tiny-llama" and portable_name("/srv/models/my-llama") == "my-llama"


def test_resolve_model_refuses_unregistered_seeds() -> None:
    from shared.ml.models import resolve_model

    with pytest.raises(ValueError, match="tiny-llama seeds"):
        resolve_model("tiny-llama-seed12345")


def test_api_params_modules_stay_torch_free() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from services.api import job_params; from shared.ml import model_names; "
        "from shared.jobs.registry import JOB_TYPES; [jt.params_class() for jt in JOB_TYPES.values()]; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    with isolated_home(tmp_path_factory.mktemp("hardening-home")) as path:
        yield path


def test_model_folders_only_inside_allowed_dirs(home: Path, tmp_path: Path) -> None:
    allowed = tmp_path / "models"
    (allowed / "mine").mkdir(parents=True)
    (allowed / "escape").symlink_to(tmp_path)
    keys = make_keys("folders")
    with TestClient(job_api(rate_limit_enabled=False, allowed_model_dirs=str(allowed))) as client:
        ok = client.post(
            "/v1/jobs",
            headers=auth(keys["submit"]),
            json={"type": "evaluation", "params": {**EVAL, "model": str(allowed / "mine")}},
        )
        assert ok.status_code == 201, ok.text
        before = store_state()
        for model in (str(allowed / "escape"), str(tmp_path), "mine", "tiny-llama-seed9"):
            r = client.post(
                "/v1/jobs",
                headers=auth(keys["submit"]),
                json={"type": "evaluation", "params": {**EVAL, "model": model}},
            )
            assert r.status_code == 422 and r.json()["error"]["param"] == "params.model", (model, r.text)
            assert str(tmp_path) not in r.json()["error"]["message"]  # server paths are scrubbed
        assert store_state() == before
    with TestClient(job_api(rate_limit_enabled=False)) as client:  # default: no folders at all
        r = client.post(
            "/v1/jobs",
            headers=auth(keys["submit"]),
            json={"type": "evaluation", "params": {**EVAL, "model": str(allowed / "mine")}},
        )
        assert r.status_code == 422 and r.json()["error"]["param"] == "params.model"


# -- the bootstrap admin key -------------------------------------------------------------------------
def test_bootstrap_admin_key_goes_to_a_private_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli.jobs import bootstrap_admin_key
    from shared.db.keys import verify_key
    from shared.db.session import session_scope

    with isolated_home(tmp_path / "home"):
        old = os.umask(0)  # the file is private whatever the umask
        try:
            path = bootstrap_admin_key()
        finally:
            os.umask(old)
        assert path == tmp_path / "home" / "admin-key"
        secret = path.read_text().strip()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with session_scope() as session:
            row = verify_key(session, secret)
            assert row is not None and row.scopes == ["admin"]
        printed = capsys.readouterr()
        assert secret not in printed.out + printed.err and str(path) in printed.err.replace("\n", "")
        assert bootstrap_admin_key() is None  # an admin key exists: nothing new
    custom = tmp_path / "secrets" / "admin.key"
    os.environ["CHORUS_ADMIN_KEY_FILE"] = str(custom)
    try:
        with isolated_home(tmp_path / "home2"):
            assert bootstrap_admin_key() == custom and stat.S_IMODE(custom.stat().st_mode) == 0o600
    finally:
        del os.environ["CHORUS_ADMIN_KEY_FILE"]


# -- forwarded headers -------------------------------------------------------------------------------
def _serve(app: Any, options: dict[str, Any]) -> tuple[Any, threading.Thread, int]:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):
        if server.started or not thread.is_alive():
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    return server, thread, server.servers[0].sockets[0].getsockname()[1]


def _keyless_statuses(options: dict[str, Any]) -> list[int]:
    """Six keyless requests from loopback, each claiming another client address in X-Forwarded-For."""
    app = job_api(rate_limit_anon_burst=3, rate_limit_anon_rate=0.001, rate_limit_redis_url="memory")
    server, thread, port = _serve(app, options)
    try:
        return [
            httpx.get(
                f"http://127.0.0.1:{port}/v1/jobs", headers={"X-Forwarded-For": f"203.0.113.{i}"}, timeout=30
            ).status_code
            for i in range(6)
        ]
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_forwarded_for_is_ignored_unless_a_proxy_is_configured(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.cli.serve import uvicorn_proxy_args, uvicorn_proxy_options

    monkeypatch.delenv("CHORUS_FORWARDED_ALLOW_IPS", raising=False)
    assert uvicorn_proxy_options() == {"proxy_headers": False, "forwarded_allow_ips": ""}
    assert uvicorn_proxy_args() == ["--no-proxy-headers"]
    # Default: limited by the real (loopback) address whatever the header says.
    assert _keyless_statuses(uvicorn_proxy_options()) == [401, 401, 401, 429, 429, 429]
    # A configured proxy's header is believed: six different clients, none over its limit.
    monkeypatch.setenv("CHORUS_FORWARDED_ALLOW_IPS", "127.0.0.1")
    assert uvicorn_proxy_args() == ["--proxy-headers", "--forwarded-allow-ips", "127.0.0.1"]
    assert _keyless_statuses(uvicorn_proxy_options()) == [401] * 6


def test_cli_commands_start_uvicorn_without_proxy_trust(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from services.cli.jobs import _inference_cmd, api_command
    from services.cli.serve import inference_command

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: calls.append(kwargs))
    monkeypatch.delenv("CHORUS_FORWARDED_ALLOW_IPS", raising=False)
    for name in ("MODEL", "QUANTIZATION", "DEVICE", "PRELOAD"):
        monkeypatch.delenv(f"CHORUS_INFERENCE_{name}", raising=False)
    api_command(host="127.0.0.1", port=8000, workers=1, log_level="warning")
    inference_command(
        host="127.0.0.1", port=8001, model=None, quantization=None, device=None, preload=None, log_level="warning"
    )
    assert [(c["proxy_headers"], c["forwarded_allow_ips"]) for c in calls] == [(False, "")] * 2
    cmd = _inference_cmd("127.0.0.1", 8001)
    assert cmd is not None and ("--no-proxy-headers" in cmd or cmd[2:4] == ["services.cli.main", "inference"])


# -- portable identities and server paths ------------------------------------------------------------
def test_adapter_config_names_the_base_portably(tmp_path: Path, tiny_base: Any) -> None:
    from shared.ml.serving.synthetic import write_random_adapter
    from shared.ml.training.adapters import load_adapter_state

    write_random_adapter(tmp_path / "ad", tiny_base.model, tiny_base.info, name="ad", tasks=["sst2"], seed=1)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert str(tiny_base.info.path) not in (tmp_path / "ad" / "adapter_config.json").read_text()
    state, loaded, meta = load_adapter_state(tmp_path / "ad", tiny_base.info)  # still loads on its base
    assert state and meta.base_model == "tiny-llama" and loaded["base_model_name_or_path"] == "tiny-llama"


def test_error_messages_never_show_server_paths() -> None:
    from services.http_errors import error_body, scrub_paths

    message = "adapter folder '/var/lib/chorus/artifacts/ab/cd/g1' is missing ['adapter_config.json']"
    assert error_body("x", message)["error"]["message"] == "adapter folder '.../g1' is missing ['adapter_config.json']"
    for kept in ("see http://host:8000/v1/jobs/x", "1/2 of the rows", "GET /v1/jobs/{id}", "a/b/c"):
        assert scrub_paths(kept) == kept


@pytest.fixture(scope="module")
def inference(home: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    keys = make_keys("inf")
    root = tmp_path_factory.mktemp("hardening-ensembles")
    app = inference_app(root, docs=True)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, keys, root


def test_inference_errors_hide_server_paths(inference) -> None:  # type: ignore[no-untyped-def]
    import shutil

    client, keys, root = inference
    broken = root / "broken"
    shutil.copytree(root / ENSEMBLE, broken)
    (broken / "adapters" / "g1" / "adapter_config.json").unlink()
    r = client.post("/v1/ensembles/broken/load", headers=auth(keys["admin"]))
    assert r.status_code == 422, r.text
    assert str(root) not in r.text and "/tmp" not in r.text


def test_inference_openapi_documents_the_error_shape(inference) -> None:  # type: ignore[no-untyped-def]
    client, keys, _ = inference
    spec = client.get("/openapi.json").json()
    classify = spec["paths"]["/v1/ensembles/{ensemble_id}/classify"]["post"]["responses"]
    for code in ("400", "401", "403", "404", "413", "422"):
        assert classify[code]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "409" in spec["paths"]["/v1/ensembles/{ensemble_id}/load"]["post"]["responses"]
    text = spec["components"]["schemas"]["Row"]["properties"]["text"]
    assert {"type": "string", "minLength": 1, "pattern": r"\S"} in text["anyOf"]
    r = client.options(f"/v1/ensembles/{ENSEMBLE}", headers=auth(keys["infer"]))
    assert r.status_code == 405 and r.headers["allow"] == "GET, DELETE"
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_names_with_a_trailing_newline_are_refused():
    """`$` matches before a final newline: every name pattern is applied with fullmatch."""
    import pydantic

    from services.api.job_params import ARTIFACT_ID
    from shared.ml.training.params import TrainingParams

    for bad in ({"ensemble": {"name": "chorus\n"}}, {"targets": ["q_proj\n"]}):
        with pytest.raises(pydantic.ValidationError):
            TrainingParams(**bad)
    assert ARTIFACT_ID.fullmatch("art-" + "0" * 24) and not ARTIFACT_ID.fullmatch("art-" + "0" * 24 + "\n")
