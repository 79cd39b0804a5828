"""Looking tasks up by name: built-in tasks first, then tasks imported into `get_settings().user_tasks`.

Built-in Task objects are created once per process, so their loaded splits are cached per process;
user tasks are re-read when their spec file changes (another process may import or delete them).
"""

from __future__ import annotations

from collections.abc import Iterable

from shared.ml.tasks.base import Task
from shared.ml.tasks.builtin import BUILTIN_TASKS, CORE_TASKS, make_builtin_tasks
from shared.ml.tasks.user_import import SkippedTask, list_user_tasks, load_user_task, scan_user_tasks

__all__ = ["BUILTIN_TASKS", "CORE_TASKS", "get_task", "list_tasks", "parse_task_list", "scan_tasks", "task_names"]

_builtin: dict[str, Task] | None = None


def _builtins() -> dict[str, Task]:
    global _builtin
    if _builtin is None:
        _builtin = {task.name: task for task in make_builtin_tasks()}
    return _builtin


def task_names() -> list[str]:
    """Every known task name: built-in ones (core first), then user tasks sorted by name."""
    return [*BUILTIN_TASKS, *(task.name for task in list_user_tasks())]


def _unknown(listed: str) -> str:
    """The message for unknown names: built-in names only (imported task names may belong to other API owners)."""
    return f"unknown {listed}; built-in tasks: {', '.join(BUILTIN_TASKS)} (imported tasks: `chorus tasks`)"


def get_task(name: str) -> Task:
    """A built-in or user-imported task; ValueError for anything else (UserTaskError for one that cannot load)."""
    task = _builtins().get(name) or load_user_task(name)
    if task is None:
        raise ValueError(_unknown(f"task {name!r}"))
    return task


def list_tasks() -> list[Task]:
    """All tasks: built-in ones (in BUILTIN_TASKS order), then user tasks sorted by name."""
    return [*_builtins().values(), *list_user_tasks()]


def scan_tasks() -> tuple[list[Task], list[SkippedTask]]:
    """All tasks (as list_tasks) and the user task folders skipped, each with the reason."""
    user, skipped = scan_user_tasks()
    return [*_builtins().values(), *user], skipped


def parse_task_list(spec: str | Iterable[str]) -> list[str]:
    """ "cb, rte,cb" -> ["cb", "rte"]: comma-separated names, validated, duplicates dropped (order kept).

    "core" expands to the 12 core built-in tasks and "builtin" to every built-in task.
    """
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    names: list[str] = []
    for item in (p.strip() for p in items):
        expanded = {"core": list(CORE_TASKS), "builtin": list(BUILTIN_TASKS)}.get(item, [item] if item else [])
        names.extend(n for n in expanded if n not in names)
    if not names:
        raise ValueError("no task names given (expected a comma-separated list such as 'cb,rte,sst2')")
    known = set(BUILTIN_TASKS)
    unknown = [n for n in names if n not in known and load_user_task(n) is None]
    if unknown:
        raise ValueError(_unknown(f"task(s) {', '.join(map(repr, unknown))}"))
    return names
