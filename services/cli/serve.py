"""`chorus inference`: run the inference service (one process, the base model loaded once); and how every
chorus command starts uvicorn behind (or without) a reverse proxy."""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer

from services.cli.common import Quantization


def forwarded_allow_ips() -> str:
    """CHORUS_FORWARDED_ALLOW_IPS: the proxies whose X-Forwarded-* headers are trusted ("" = none)."""
    from services.api.settings import ApiSettings

    return ApiSettings().forwarded_allow_ips.strip()


def uvicorn_proxy_options() -> dict[str, Any]:
    """uvicorn.run / uvicorn.Config keyword arguments: proxy headers only from the configured proxies. By
    default uvicorn trusts X-Forwarded-For from 127.0.0.1, which lets any local process (or a proxy that
    passes the header through) choose the client address the rate limits see."""
    ips = forwarded_allow_ips()
    return {"proxy_headers": bool(ips), "forwarded_allow_ips": ips}


def uvicorn_proxy_args() -> list[str]:
    """The same for the `uvicorn` command line."""
    ips = forwarded_allow_ips()
    return ["--proxy-headers", "--forwarded-allow-ips", ips] if ips else ["--no-proxy-headers"]


def inference_command(
    host: Annotated[str, typer.Option(help="Bind address (keep it private unless behind a proxy).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8001,
    model: Annotated[
        str | None,
        typer.Option(
            help="Base model: smollm2-135m, tiny-llama or a local HF folder "
            "(default CHORUS_INFERENCE_MODEL or smollm2-135m)."
        ),
    ] = None,
    quantization: Annotated[
        Quantization | None, typer.Option(help="Base weights (default CHORUS_INFERENCE_QUANTIZATION or nf4).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="cuda, cuda:N or cpu (default: cuda when available).")] = None,
    preload: Annotated[str | None, typer.Option(help="Comma-separated ensemble ids to load at startup.")] = None,
    lazy_load: Annotated[
        bool | None,
        typer.Option(
            "--lazy-load/--no-lazy-load",
            show_default=False,
            help="Load an ensemble on the first classify request that names it, for keys that may see it "
            "(default: CHORUS_INFERENCE_LAZY_LOAD, else off: InferenceSettings.lazy_load).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve weighted adapter ensembles on one 4-bit base model (hot-swappable; API keys from the job database)."""
    import uvicorn

    for name, value in (
        ("MODEL", model),
        ("QUANTIZATION", quantization),
        ("DEVICE", device),
        ("PRELOAD", preload),
        ("LAZY_LOAD", None if lazy_load is None else str(lazy_load).lower()),
    ):
        if value is not None:
            os.environ[f"CHORUS_INFERENCE_{name}"] = value
    # One worker: the model lives in this process; concurrency comes from the dynamic batcher.
    uvicorn.run(
        "services.inference.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=1,
        log_level=log_level,
        **uvicorn_proxy_options(),
    )


def register(app: typer.Typer) -> None:
    app.command("inference")(inference_command)
