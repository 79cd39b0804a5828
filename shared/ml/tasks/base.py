"""Tasks: a Jinja prompt template, ordered answer choices (verbalizers) and train/val/test splits."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.ml.tasks.templates import TemplateError, render_template, validate_template

SPLITS = ("train", "val", "test")

_WS = re.compile(r"\s+")


@dataclass(frozen=True)
class Example:
    """One labelled example. `id` is stable across runs (e.g. "cb/train/17"); `label` indexes the choices."""

    id: str
    fields: dict[str, Any]
    label: int


def normalise(text: str) -> str:
    """Collapse every whitespace run (newlines included) to one space and strip the ends."""
    return _WS.sub(" ", text).strip()


@dataclass
class Task:
    """A classification task rendered as a next-token prediction.

    The prompt is `template` rendered with an example's fields (whitespace-normalised); the answer is
    the first token of " " + choices[label]. `truncate_field` names the long context field that is cut
    from the LEFT when a prompt does not fit, so the question and the answer position always survive.
    The template is checked by `validate_template` (against `field_names` when given) and rendered in the
    sandbox of shared/ml/tasks/templates.py.
    """

    name: str
    template: str
    choices: list[str]
    loader: Callable[[], dict[str, list[Example]]]
    label_names: list[str] | None = None
    truncate_field: str | None = None
    description: str = ""
    source: str = "builtin"
    field_names: Sequence[str] | None = None  # the fields every example has (None: not checked)
    _splits: dict[str, list[Example]] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"task {self.name!r}: needs at least 2 answer choices, got {self.choices!r}")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError(f"task {self.name!r}: answer choices must be distinct, got {self.choices!r}")
        try:
            validate_template(self.template, self.field_names)
        except TemplateError as exc:
            raise ValueError(f"task {self.name!r}: refused template: {exc}") from exc
        if self.label_names is None:
            self.label_names = list(self.choices)

    @property
    def splits(self) -> dict[str, list[Example]]:
        """The three splits, loaded on first use and cached."""
        if self._splits is None:
            loaded = self.loader()
            missing = [s for s in SPLITS if s not in loaded]
            if missing:
                raise ValueError(f"task {self.name!r}: loader returned no {missing} split")
            self._splits = loaded
        return self._splits

    def split(self, name: str) -> list[Example]:
        """One split by name (train, val or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.splits[name]

    def sizes(self) -> dict[str, int]:
        return {s: len(self.splits[s]) for s in SPLITS}

    def render(self, fields: dict[str, Any], options: Sequence[str] | None = None) -> str:
        """The normalised prompt for `fields`. `options` (lettered fallback) lists the choices before the cue."""
        prompt = normalise(render_template(self.template, fields))
        if options is not None:
            listed = " ".join(f"{letter}: {choice}" for letter, choice in zip(options, self.choices, strict=True))
            cue = "Answer:"
            head = prompt[: -len(cue)].rstrip() if prompt.endswith(cue) else prompt
            prompt = f"{head} Options: {listed}. Answer:"
        return prompt

    def describe(self) -> dict[str, Any]:
        """The JSON shape printed by `chorus tasks --json`."""
        return {"name": self.name, "choices": list(self.choices), "sizes": self.sizes(), "source": self.source}
