"""What every CLI command module shares: the error exit, params validation that names the flag the user
typed, option parsing, and running a stage into --out through a hidden partial folder."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup, TyperOption

# Choices of options, spelt as the params models spell them (typer lists them in --help: <none|nf4>).
Quantization = Literal["none", "nf4"]
Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16"]
Output = Literal["vocab", "choice"]
Init = Literal["base", "meta"]
LamScale = Literal["gradient", "absolute"]
Mode = Literal["forward", "linear"]
Backmap = Literal["sketch", "representer"]
AffinityMetric = Literal["accuracy", "neg_loss", "macro_f1"]
GroupingMethod = Literal["auto", "sdp", "spectral"]
Candidates = Literal["group", "all"]
Split = Literal["train", "val", "test"]

ModelT = TypeVar("ModelT", bound=BaseModel)


def _plain_help(command: Any) -> None:
    """Escape rich markup in the help texts of a command and of its parameters."""
    for owner in (command, *command.params):
        for attr in ("help", "short_help"):
            text = getattr(owner, attr, None)
            if isinstance(text, str) and text:
                setattr(owner, attr, escape(text))


def _flags_as_flags(params: list[Any]) -> list[Any]:
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""  # typer would show the value type: --json <bool>
    return params


class ChorusCommand(TyperCommand):
    """A command whose help shows what users type: help texts are plain text (brackets such as
    `[[task, ...], ...]` are not taken for rich markup) and flags show no value type (`--json`, not
    `--json <bool>`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_help(self)

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_as_flags(super().get_params(ctx))  # --help is added here, not in __init__


class ChorusGroup(TyperGroup):
    """The same for a command group (chorus itself, `chorus keys`, `chorus tasks`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_help(self)

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_as_flags(super().get_params(ctx))


def use_chorus_commands(app: typer.Typer) -> None:
    """Build `app`, its sub-apps and all their commands as ChorusGroup / ChorusCommand (unless one chose
    a class of its own)."""
    if not (isinstance(app.info.cls, type) and app.info.cls is not TyperGroup):
        app.info.cls = ChorusGroup
    for info in app.registered_commands:
        if info.cls in (None, TyperCommand):
            info.cls = ChorusCommand
    for group in app.registered_groups:
        if group.typer_instance is not None:
            use_chorus_commands(group.typer_instance)


FLAGS = {  # params field -> CLI flag, so validation errors name what the user typed
    "tasks": "--tasks",
    "model": "--model",
    "quantization": "--quantization",
    "groups": "--groups",
    "max_train": "--max-train",
    "max_val": "--max-val",
    "max_test": "--max-test",
    "dim": "--dim",
    "seed": "--seed",
    "rank": "--rank",
    "alpha": "--alpha",
    "lam": "--lam",
    "lam_scale": "--lam-scale",
    "lams": "--lams",
    "subset_size": "--subset-size",
    "coverage": "--coverage",
    "mode": "--mode",
    "metric": "--metric",
    "method": "--method",
    "backmap": "--backmap",
    "output": "--output",
    "outputs": "--outputs",
    "step_scales": "--step-scales",
    "batch_size": "--batch-size",
    "batch_tokens": "--batch-tokens",
    "eval_batch_size": "--eval-batch-size",
    "train_batch_size": "--train-batch-size",
    "max_length": "--max-length",
    "device": "--device",
    "precision": "--precision",
    "scales": "--scales",
    "directions": "--directions",
    "subsets": "--subsets",
    "epochs": "--epochs",
    "lr": "--lr",
    "patience": "--patience",
    "error_threshold": "--boost-threshold",
    "max_rounds": "--boost-rounds",
    "eta": "--eta",
    "name": "--name",
    "candidates": "--weight-candidates",
    "init": "--init",
    "meta_epochs": "--meta-epochs",
}


def model_default(model: type[BaseModel], field: str) -> Any:
    """The default of a params-model field ("boosting.lr" descends into a nested model): options default to
    what the same job gets over HTTP, defined once in the model."""
    *parents, name = field.split(".")
    for part in parents:
        nested = model.model_fields[part].annotation
        if not (isinstance(nested, type) and issubclass(nested, BaseModel)):
            raise TypeError(f"{model.__name__}.{part} is not a nested params model")
        model = nested
    info = model.model_fields[name]
    if info.is_required():
        raise ValueError(f"{model.__name__}.{name} has no default")
    return info.get_default(call_default_factory=True)


def joined(values: list[Any]) -> str:
    """A list default as the comma-separated text the option takes ([0.02, 0.05] -> "0.02,0.05")."""
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a clear error and exit (status 2: bad input)."""
    Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code=code)


def validation_message(exc: Any) -> str:
    """A pydantic ValidationError as "--flag: what is wrong; ..."."""
    parts = []
    for e in exc.errors():
        loc = [str(x) for x in e["loc"]]
        msg = e["msg"].removeprefix("Value error, ")
        named = re.match(r"(\w+)=", msg)  # model-level checks name their field as "field=value"
        if not loc and named:
            loc = [named.group(1)]
        key = next((x for x in reversed(loc) if x in FLAGS), loc[0] if loc else "input")
        parts.append(f"{FLAGS.get(key, '.'.join(loc) or 'input')}: {msg}")
    return "; ".join(parts)


def validate(cls: type[ModelT], data: dict[str, Any], drop_none: bool = False) -> ModelT:
    """cls.model_validate(data), exiting with a flag-named error on bad input. drop_none: options left
    unset (None) take the params class's defaults."""
    from pydantic import ValidationError

    if drop_none:
        data = {k: v for k, v in data.items() if v is not None}
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        fail(validation_message(exc))
    except ValueError as exc:
        fail(str(exc))


def floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{flag}: expected comma-separated numbers, got {text!r}")
    if not values:
        fail(f"{flag}: expected at least one number")
    return values


def task_list(text: str) -> list[str]:
    from shared.ml.tasks.registry import parse_task_list

    if not text:
        fail("--tasks: give at least 2 comma-separated task names")
    try:
        return list(parse_task_list(text))
    except ValueError as exc:
        fail(f"--tasks: {exc}")
    raise AssertionError


def groups_option(text: str) -> int | str:
    """--groups: a positive number of groups, or 'auto'."""
    text = text.strip().lower()
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        fail(f"--groups: expected a number of groups or 'auto', got {text!r}")
    if value < 1:
        fail(f"--groups: must be >= 1, got {value}")
    return value


def check_model(model: str) -> None:
    from shared.ml.models import resolve_model

    try:
        resolve_model(model)
    except (ValueError, FileNotFoundError) as exc:
        fail(f"--model: {exc}")


def check_out(out: Path) -> Path:
    out = out.expanduser().resolve()
    if out.exists() and not out.is_dir():
        fail(f"--out: {str(out)!r} exists and is not a directory")
    return out


def _replace_in_strings(value: Any, old: str, new: str) -> Any:
    """`value` (JSON data) with every occurrence of `old` inside its strings replaced by `new`."""
    if isinstance(value, str):
        return value.replace(old, new)
    if isinstance(value, list):
        return [_replace_in_strings(v, old, new) for v in value]
    if isinstance(value, dict):
        return {_replace_in_strings(k, old, new): _replace_in_strings(v, old, new) for k, v in value.items()}
    return value


def _rewrite_paths(partial: Path, out: Path) -> None:
    """Point paths that JSON files of `partial` record inside `partial` at `out`, where they are published."""
    old, new = str(partial), str(out)
    for path in partial.rglob("*.json"):
        text = path.read_text()
        if json.dumps(old)[1:-1] not in text:
            continue
        try:
            data = json.loads(text)
        except ValueError:
            continue  # not one JSON document: left as written
        tmp = path.with_name(f".{path.name}.publish")
        tmp.write_text(json.dumps(_replace_in_strings(data, old, new), indent=2) + "\n")
        os.replace(tmp, path)


def _publish(partial: Path, out: Path, last: str) -> None:
    """Move the finished files of `partial` into `out`; `last` (the index/report file) moves last. Paths
    the JSON files record inside `partial` are rewritten to `out` first."""
    _rewrite_paths(partial, out)
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(partial, out)
        return
    for entry in sorted(partial.iterdir(), key=lambda p: p.name == last):
        target = out / entry.name
        if entry.is_dir() and target.exists():
            shutil.rmtree(target)
        os.replace(entry, target)
    shutil.rmtree(partial, ignore_errors=True)


def run_into(
    out: Path, kind: str, last: str, fn: Callable[[Path], dict[str, Any]], keep_partial: bool = True
) -> dict[str, Any]:
    """Run fn(workdir) in the hidden sibling `.<out>.partial-<kind>`, then publish into `out` (`last` last).

    Bad input (ValueError) exits with status 2 and removes a partial folder this call created. Any other
    interruption keeps the partial folder when `keep_partial` (re-running the command resumes there)."""
    out = check_out(out)
    partial = out.parent / f".{out.name}.partial-{kind}"
    created = not partial.exists()
    if created:
        partial.mkdir(parents=True)
    try:
        summary = fn(partial)
    except ValueError as exc:
        if created or not keep_partial:
            shutil.rmtree(partial, ignore_errors=True)
        fail(str(exc))
    except BaseException:
        if not keep_partial:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    _publish(partial, out, last)
    return summary
