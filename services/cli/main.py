"""The `chorus` command line: one typer app; each area registers its commands from its own module."""

from __future__ import annotations

import importlib

import typer

from services.cli.common import use_chorus_commands

app = typer.Typer(
    name="chorus",
    help="Fine-tune one model on many datasets and serve it as an ensemble of adapters.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

# Each module defines `register(app)`. Order = order in `chorus --help`.
COMMAND_MODULES = (
    "services.cli.core",  # tasks, import, eval
    "services.cli.stage1",  # affinity, group, approx-error, validate-estimates
    "services.cli.stage2",  # train, pipeline
    "services.cli.study",  # study
    "services.cli.jobs",  # api, worker, up, submit, status, cancel, results
    "services.cli.serve",  # inference
    "services.cli.export",  # export
    "services.cli.demo",  # demo
)

for _module in COMMAND_MODULES:
    try:
        importlib.import_module(_module).register(app)
    except ModuleNotFoundError as exc:  # an area not built yet must not break the others
        if exc.name != _module:
            raise
use_chorus_commands(app)  # help texts shown as written, flags as flags


def main() -> None:
    app()


if __name__ == "__main__":
    main()
