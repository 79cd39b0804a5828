"""Core CLI commands: list and delete tasks, import a dataset, evaluate a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.cli.common import Quantization, Split, fail, model_default
from services.cli.tables import print_metrics_table
from shared.ml.eval_params import EvalParams
from shared.ml.progress import ConsoleProgress

if TYPE_CHECKING:  # the commands import these at run time, when they need them
    from shared.ml.tasks.base import Task
    from shared.ml.tasks.user_import import ParsedDataset

console = Console()


tasks_app = typer.Typer(help="List the tasks (built-in and imported); `chorus tasks rm NAME` deletes an imported one.")


@tasks_app.callback(invoke_without_command=True)
def tasks_command(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False
) -> None:
    """List the tasks (built-in and imported) with their answer choices and split sizes, then the data folders
    skipped and why."""
    if ctx.invoked_subcommand is not None:
        return
    from shared.ml.tasks.registry import scan_tasks

    tasks, skipped = scan_tasks()
    described = [task.describe() for task in tasks]
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        for item in skipped:  # stdout stays one JSON document
            typer.echo(f"skipped {item.name}: {item.reason}", err=True)
        return
    table = Table("task", "choices", "train", "val", "test", "source")
    for d in described:
        s = d["sizes"]
        table.add_row(
            escape(d["name"]),
            escape(" / ".join(d["choices"])),
            str(s["train"]),
            str(s["val"]),
            str(s["test"]),
            d["source"],
        )
    console.print(table)
    if skipped:
        console.print(f"skipped {len(skipped)} data folder(s):")
        for item in skipped:
            console.print(f"  {escape(item.name)}: {escape(item.reason)}", highlight=False)


def _in_use(name: str) -> tuple[str | None, str | None]:
    """(why `name` must not be deleted, why that could not be checked): an API dataset owns it, or a queued or
    running job in the job database names it."""
    from sqlalchemy import inspect, select

    from shared.config import get_settings
    from shared.db.models import Dataset
    from shared.db.session import UNAVAILABLE, get_engine, session_scope
    from shared.jobs.task_refs import active_jobs_using

    settings = get_settings()
    if settings.database_url is None and not (settings.home / "chorus.db").exists():
        return None, None  # no job database yet: no job can name it
    try:
        if not inspect(get_engine()).has_table("jobs"):
            return None, None
        with session_scope() as session:
            dataset = session.scalar(select(Dataset).where(Dataset.task_name == name))
            if dataset is not None:
                return (
                    f"task {name!r} belongs to dataset {dataset.id} uploaded through the API; delete it there "
                    f"(DELETE /v1/datasets/{dataset.id})"
                ), None
            jobs = active_jobs_using(session, name)
    except UNAVAILABLE as exc:
        return None, f"cannot check the job database ({type(exc).__name__})"
    if jobs:
        return (
            f"task {name!r} is used by queued or running job(s) {', '.join(jobs)}; wait for them or cancel "
            "them (chorus cancel JOB)"
        ), None
    return None, None


@tasks_app.command("rm")
def tasks_rm_command(
    name: Annotated[str, typer.Argument(help="The imported task to delete.")],
    force: Annotated[
        bool, typer.Option("--force", help="Delete even when the job database cannot be checked.")
    ] = False,
) -> None:
    """Delete an imported task (refused while a queued or running job uses it)."""
    from shared.ml.tasks.registry import BUILTIN_TASKS
    from shared.ml.tasks.user_import import delete_user_task, user_task_exists

    if name in BUILTIN_TASKS:
        fail(f"{escape(repr(name))} is a built-in task and cannot be deleted")
    if not user_task_exists(name):
        fail(f"no imported task named {escape(repr(name))} (see `chorus tasks`)")
    blocker, unchecked = _in_use(name)
    if blocker:
        fail(escape(blocker))
    if unchecked and not force:
        fail(escape(f"{unchecked}: a queued or running job may use {name!r}; pass --force to delete anyway"))
    try:
        delete_user_task(name)
    except ValueError as exc:  # deleted meanwhile
        fail(escape(str(exc)))
    console.print(f"deleted task {escape(name)}")


def _label_names(raw: str | None) -> list[str] | None:
    """--label-names: "a,b", '["a","b"]', or @file (one name per line, or a JSON list)."""
    from shared.ml.tasks.user_import import parse_label_names, read_label_names_file

    if raw is not None and raw.startswith("@"):
        return read_label_names_file(Path(raw[1:]).expanduser())
    return parse_label_names(raw)


def import_command(
    file: Annotated[
        Path | None,
        typer.Argument(
            help="The dataset: .csv, .tsv (tab-separated), .jsonl (one JSON object per line), .json (a JSON array of "
            "objects, or JSON lines), .parquet, .arrow, or a folder written by datasets' save_to_disk. "
            "Leave it out when giving --train.",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Task name (default: from the file name: reviews.csv -> reviews).")
    ] = None,
    text_field: Annotated[
        list[str] | None,
        typer.Option(
            "--text-field", help="Text column(s), repeat or comma-separate (default: text).", show_default=False
        ),
    ] = None,
    label_field: Annotated[str, typer.Option(help="Label column.")] = "label",
    label_names: Annotated[
        str | None,
        typer.Option(
            help="Label names in label order (integer labels index them): negative,positive or "
            '\'["negative","positive"]\' or @names.txt (one per line, or a JSON list).'
        ),
    ] = None,
    template: Annotated[str | None, typer.Option(help="Jinja prompt template ending with 'Answer:'.")] = None,
    id_field: Annotated[str | None, typer.Option(help="Column holding a unique example id.")] = None,
    train: Annotated[Path | None, typer.Option("--train", help="The train split's file (one file per split).")] = None,
    validation: Annotated[
        Path | None, typer.Option("--validation", "--val", help="The validation split's file.")
    ] = None,
    test: Annotated[Path | None, typer.Option("--test", help="The test split's file.")] = None,
    split_field: Annotated[
        str,
        typer.Option(
            help="Column giving each row's split (train, validation or val, test), used when present; '' ignores it. "
            "Without splits the rows are split 80/10/10, stratified by label."
        ),
    ] = "split",
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="jsonl, json, csv, tsv, parquet or arrow (default: from the file name)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an imported task of that name.")] = False,
    description: Annotated[str | None, typer.Option(help="A description shown with the task.")] = None,
) -> None:
    """Import a labelled dataset as a task: `chorus import reviews.csv` reads the columns text and label.
    Every bad row is reported; nothing is kept on error."""
    source = _import_source(file, train, validation, test)
    task_name = _import_name(name, source.first)
    fields = [f.strip() for item in (text_field or ["text"]) for f in item.split(",") if f.strip()]
    imported = _import_task(
        source,
        task_name,
        fields,
        label_field,
        label_names,
        template,
        id_field,
        split_field,
        fmt,
        overwrite,
        description,
    )
    _print_imported(imported)


@dataclass(frozen=True)
class _ImportSource:
    """The files of an import: FILE (None with --train), the per-split files, and the file that names the task."""

    file: Path | None
    splits: dict[str, Path]
    first: Path


def _import_source(file: Path | None, train: Path | None, validation: Path | None, test: Path | None) -> _ImportSource:
    """FILE or --train (with --validation, --test); exits when neither or both are given."""
    if file is None and train is None:
        fail("give the dataset FILE, or one file per split with --train (and --validation, --test)")
    if file is not None and train is not None:
        fail("give the dataset FILE or --train, not both (with --validation/--test, FILE is the train split)")
    splits = {k: v for k, v in (("train", train), ("validation", validation), ("test", test)) if v is not None}
    first = file if file is not None else train
    assert first is not None
    return _ImportSource(file, splits, first)


def _import_name(name: str | None, first: Path) -> str:
    """--name, else the task name the file's name gives (exits when that is no valid task name)."""
    from shared.ml.tasks.import_errors import RowError
    from shared.ml.tasks.user_import import default_task_name, validate_name

    if name is not None:
        return name
    name = default_task_name(first)
    problems: list[RowError] = []
    validate_name(name, problems)
    if problems:
        fail(escape(f"the name {first.name!r} gives no valid task name ({problems[0].message}); pass --name"))
    return name


@dataclass(frozen=True)
class _Imported:
    """A registered import: the validated dataset and the task stored from it."""

    parsed: ParsedDataset
    task: Task


def _import_task(
    source: _ImportSource,
    name: str,
    fields: list[str],
    label_field: str,
    label_names: str | None,
    template: str | None,
    id_field: str | None,
    split_field: str,
    fmt: str | None,
    overwrite: bool,
    description: str | None,
) -> _Imported:
    """Validate the files and register them as task `name`; exits with every problem on bad input."""
    from shared.ml.tasks.user_import import (
        DatasetValidationError,
        register_dataset,
        user_task_exists,
        validate_dataset_paths,
    )

    try:
        labels = _label_names(label_names)
        if not overwrite and user_task_exists(name):
            fail(escape(f"a task named {name!r} already exists; pass --overwrite to replace it"))
        parsed = validate_dataset_paths(
            source.file,
            fields,
            label_field,
            template,
            labels,
            id_field,
            fmt,
            splits=source.splits,
            name=name,
            split_field=split_field or None,
        )
        task = register_dataset(parsed, name, overwrite=overwrite, description=description)
    except DatasetValidationError as exc:
        hint = ""
        if any("no column(s)" in e.message for e in exc.errors):
            hint = "\nname the columns with --text-field and --label-field"
        fail(escape(str(exc) + hint))  # rows and templates are the user's text: never read as console markup
    except ValueError as exc:
        fail(escape(str(exc)))
    except OSError as exc:
        fail(escape(f"cannot read {exc.filename or source.first}: {exc.strerror or type(exc).__name__}"))
    return _Imported(parsed, task)


def _print_imported(imported: _Imported) -> None:
    """The warnings, then one line with the task's name, row count, split sizes and choices."""
    parsed, task = imported.parsed, imported.task
    for warning in parsed.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)
    sizes = task.sizes()
    spec_note = "splits as given" if parsed.split_source else "split 80/10/10"
    console.print(
        f"imported task [bold]{escape(task.name)}[/]: {len(parsed.rows):,} rows ({spec_note}: train "
        f"{sizes['train']:,}, val {sizes['val']:,}, test {sizes['test']:,}), choices "
        f"{escape(str(task.choices))}",
        highlight=False,
    )


def _EVAL(name: str) -> Any:
    return model_default(EvalParams, name)  # the evaluation job's defaults


def eval_command(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny-llama, or a local HF folder.")] = _EVAL("model"),
    tasks: Annotated[str, typer.Option(help="Comma-separated task names.")] = "cb,rte,sst2",
    split: Annotated[Split, typer.Option(help="The split to evaluate on.")] = _EVAL("split"),
    quantization: Annotated[Quantization, typer.Option(help="Base model weights (nf4: 4-bit).")] = _EVAL(
        "quantization"
    ),
    max_examples: Annotated[int | None, typer.Option(help="Stratified subsample per task.")] = _EVAL("max_examples"),
    batch_size: Annotated[int, typer.Option(help="Rows per scoring batch.")] = _EVAL("batch_size"),
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Zero-shot evaluation: accuracy, macro-F1 and answer loss per task."""
    import tempfile

    from pydantic import ValidationError

    from shared.ml.evaluate import run_evaluation

    try:
        params = EvalParams(
            model=model,
            quantization=quantization,
            tasks=tasks.split(","),
            split=split,
            max_examples=max_examples,
            batch_size=batch_size,
        )
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    try:
        with tempfile.TemporaryDirectory() as tmp, ConsoleProgress() as progress:
            report = run_evaluation(params, Path(tmp), progress)["report"]
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    print_metrics_table(report["tasks"], f"{report['model']['name']} ({params.quantization}) on {split}")
    console.print(f"wall time {report['wall_seconds']:.1f} s")


def register(app: typer.Typer) -> None:
    app.add_typer(tasks_app, name="tasks")
    app.command("import")(import_command)
    app.command("eval")(eval_command)
