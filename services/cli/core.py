"""Core CLI commands: list tasks, import a dataset, evaluate a model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from services.cli.common import fail

console = Console()


def tasks_command(as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False) -> None:
    """List the tasks (built-in and imported) with their answer choices and split sizes."""
    from shared.ml.tasks.registry import list_tasks

    described = [task.describe() for task in list_tasks()]
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    table = Table("task", "choices", "train", "val", "test", "source")
    for d in described:
        s = d["sizes"]
        table.add_row(d["name"], " / ".join(d["choices"]), str(s["train"]), str(s["val"]), str(s["test"]), d["source"])
    console.print(table)


def import_command(
    file: Annotated[Path, typer.Argument(help="A .jsonl or .csv file.")],
    name: Annotated[str, typer.Option(help="Task name to register.")],
    text_field: Annotated[list[str], typer.Option("--text-field", help="Text field (repeat or comma-separate).")],
    label_field: Annotated[str, typer.Option(help="Label field.")],
    template: Annotated[Optional[str], typer.Option(help="Jinja prompt template ending with 'Answer:'.")] = None,
    label_names: Annotated[Optional[str], typer.Option(help="Comma-separated label names, in label order.")] = None,
    id_field: Annotated[Optional[str], typer.Option(help="Field holding a unique example id.")] = None,
) -> None:
    """Import a labelled JSONL/CSV file as a task (every bad row is reported; nothing is kept on error)."""
    from shared.ml.tasks.user_import import DatasetValidationError, import_dataset

    fields = [f.strip() for item in text_field for f in item.split(",") if f.strip()]
    labels = [x.strip() for x in label_names.split(",")] if label_names else None
    try:
        task = import_dataset(file, name, fields, label_field, template=template, label_names=labels, id_field=id_field)
    except DatasetValidationError as exc:
        fail(escape(str(exc)))  # rows and templates are the user's text: never read as console markup
    except ValueError as exc:
        fail(escape(str(exc)))
    except OSError as exc:
        fail(escape(f"cannot read {file}: {exc.strerror or type(exc).__name__}"))
    console.print(f"imported task [bold]{task.name}[/]: sizes {task.sizes()}, choices {escape(str(task.choices))}")


def eval_command(
    model: Annotated[str, typer.Option(help="smollm2-135m, tiny-llama, or a local HF folder.")] = "smollm2-135m",
    tasks: Annotated[str, typer.Option(help="Comma-separated task names.")] = "cb,rte,sst2",
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    quantization: Annotated[str, typer.Option(help="none or nf4.")] = "none",
    max_examples: Annotated[Optional[int], typer.Option(help="Stratified subsample per task.")] = None,
    batch_size: Annotated[int, typer.Option()] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Zero-shot evaluation: accuracy, macro-F1 and answer loss per task."""
    import tempfile

    from pydantic import ValidationError

    from shared.ml.evaluate import EvalParams, run_evaluation
    from shared.ml.progress import TqdmProgress

    try:
        params = EvalParams(model=model, quantization=quantization, tasks=tasks.split(","), split=split,
                            max_examples=max_examples, batch_size=batch_size)
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report = run_evaluation(params, Path(tmp), TqdmProgress())["report"]
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    print_metrics_table(report["tasks"], f"{report['model']['name']} ({params.quantization}) on {split}")
    console.print(f"wall time {report['wall_seconds']:.1f} s")


def print_metrics_table(tasks: dict[str, dict[str, float]], title: str) -> None:
    table = Table("task", "n", "accuracy", "macro-F1", "loss", title=title)
    for name, m in tasks.items():
        table.add_row(name, str(m["n"]), f"{100 * m['accuracy']:.1f}", f"{100 * m['macro_f1']:.1f}", f"{m['loss']:.3f}")
    n = len(tasks)
    table.add_row("average", "", f"{100 * sum(m['accuracy'] for m in tasks.values()) / n:.1f}",
                  f"{100 * sum(m['macro_f1'] for m in tasks.values()) / n:.1f}",
                  f"{sum(m['loss'] for m in tasks.values()) / n:.3f}", style="bold")
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command("tasks")(tasks_command)
    app.command("import")(import_command)
    app.command("eval")(eval_command)
