"""`chorus demo`: the main job end to end on the embedded defaults, on real data."""

from __future__ import annotations

from typing import Annotated

import typer

DEMO_TASKS = "cb,rte,sst2"


def demo_command(
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks.")] = DEMO_TASKS,
    max_examples: Annotated[int, typer.Option(help="Test examples per task.")] = 300,
) -> None:
    """Zero-shot evaluation of the real SmolLM2-135M on real tasks, with progress bars and a table."""
    from services.cli.core import eval_command

    eval_command(model="smollm2-135m", tasks=tasks, split="test", quantization="none", max_examples=max_examples,
                 batch_size=16, as_json=False)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
