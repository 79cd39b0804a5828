"""`chorus study`: the method against its controls (single, per-task, random groups) over seeds.

Writes OUT/study.json, OUT/study.md (the table printed here) and OUT/study.png, with every arm's runs
under OUT/seed_<s>/. Computed in the hidden sibling `.<OUT>.partial-study`; re-running the same command
resumes there (finished arms are not trained again).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markdown import Markdown

from services.cli.common import (
    check_model,
    check_out,
    fail,
    groups_option,
    joined,
    model_default,
    run_into,
    task_list,
    validate,
)
from shared.ml.progress import ConsoleProgress
from shared.ml.study.params import StudyParams
from shared.ml.training.params import TrainingParams

console = Console()


def _STUDY(name: str) -> Any:
    return model_default(StudyParams, name)  # the study job's defaults


def _seeds(text: str) -> int | list[int]:
    try:
        if "," in text:
            return [int(x) for x in text.split(",") if x.strip()]
        return int(text)
    except ValueError:
        fail(f"--seeds: expected a count (3) or a list (0,1,2), got {text!r}")
        raise


def study_command(
    out: Annotated[Path, typer.Option(help="Output directory: study.json, study.md, study.png, seed_<s>/.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated task names (at least 2).")] = "",
    model: Annotated[
        str | None, typer.Option(help=f"smollm2-135m, tiny-llama, or a local HF folder [default: {_STUDY('model')}].")
    ] = None,
    seeds: Annotated[
        str | None,
        typer.Option(help=f"Seeds: a count S (seeds 0..S-1) or a comma list [default: {joined(_STUDY('seeds'))}]."),
    ] = None,
    groups: Annotated[
        str | None, typer.Option(help=f"Number of affinity groups M, or 'auto' [default: {_STUDY('groups')}].")
    ] = None,
    max_train: Annotated[
        int | None, typer.Option(help=f"Training examples per task [default: {_STUDY('max_train')}].")
    ] = None,
    max_val: Annotated[
        int | None, typer.Option(help=f"Validation examples per task [default: {_STUDY('max_val')}].")
    ] = None,
    max_test: Annotated[
        int | None, typer.Option(help=f"Test examples per task [default: {_STUDY('max_test')}].")
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help=f"Training epochs of every adapter [default: {model_default(TrainingParams, 'epochs')}]."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help=f"Arms trained at once, in processes spread over the visible GPUs [default: {_STUDY('workers')}]."
        ),
    ] = None,
    params_file: Annotated[
        Path | None,
        typer.Option("--params", help="A JSON file of study params (affinity/grouping/training overrides); flags win."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print study.json instead of the table.")] = False,
) -> None:
    """Train single, per-task, random-group and affinity-group arms for each seed; compare them on test.
    Options left out take the --params file's values, else the study's defaults."""
    from shared.ml.study.run import run_study

    out = check_out(out)
    data: dict[str, Any] = {}
    if params_file is not None:
        try:
            data = json.loads(params_file.expanduser().read_text())
        except (OSError, json.JSONDecodeError) as exc:
            fail(f"--params: cannot read {params_file}: {exc}")
        if not isinstance(data, dict):
            fail("--params: the file must hold a JSON object")
    if tasks:
        data["tasks"] = task_list(tasks)
    given = {
        "model": model,
        "seeds": None if seeds is None else _seeds(seeds),
        "groups": None if groups is None else groups_option(groups),
        "workers": workers,
        "max_train": max_train,
        "max_val": max_val,
        "max_test": max_test,
    }
    data.update({k: v for k, v in given.items() if v is not None})
    if epochs is not None:
        data["training"] = {**(data.get("training") or {}), "epochs": epochs}
    params = validate(StudyParams, data)
    check_model(params.model)
    with ConsoleProgress() as progress:
        run_into(out, "study", "study.json", lambda wd: run_study(params, wd, progress), keep_partial=True)
    if as_json:
        typer.echo((out / "study.json").read_text())
        return
    console.print(Markdown((out / "study.md").read_text()))
    console.print(f"wrote {out / 'study.json'}, {out / 'study.md'} and {out / 'study.png'}")


def register(app: typer.Typer) -> None:
    app.command("study")(study_command)
