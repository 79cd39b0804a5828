"""`chorus export`: copy an ensemble into a self-contained folder that plain transformers + peft can serve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from services.cli.common import fail


def export_command(
    source: Annotated[Path, typer.Argument(help="An ensemble.json, or a finished run folder containing one.")],
    out: Annotated[
        Path, typer.Option(help="New (or empty) folder: adapters/, ensemble.json, inference.json, README.md.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Export an ensemble: its adapters (sha256 checked), manifest, full inference recipe and a PEFT snippet."""
    from shared.ml.serving.export import export_ensemble

    try:
        summary = export_ensemble(source, out)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(
        f"exported ensemble {summary['name']!r} ({len(summary['members'])} members, tasks "
        f"{', '.join(summary['tasks'])}) to {summary['out']}; see its README.md"
    )


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
