"""Turning (task, example) into token ids, identically in every stage.

One rule for BOS: special tokens are never added by the tokenizer call; `bos_policy` decides once
per tokenizer whether a BOS is prepended (it is when the tokenizer adds one by default), and every
stage (gradients, estimation, training, evaluation, serving) goes through `encode_prompt`.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shared.ml.defaults import DEFAULT_MAX_LENGTH
from shared.ml.tasks.base import Example, Task


def bos_policy(tokenizer: Any) -> int | None:
    """The BOS id to prepend to every prompt, or None when the tokenizer does not use one."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bos if ids and ids[0] == bos else None


def first_token(tokenizer: Any, choice: str) -> int:
    """The first token of the answer as it follows the prompt (a leading space, no special tokens)."""
    ids = tokenizer(" " + choice, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"answer choice {choice!r} tokenizes to nothing")
    return ids[0]


@dataclass
class BoundTask:
    """A task bound to a tokenizer: answer token ids, and lettered options when first tokens collide."""

    task: Task
    choice_token_ids: list[int]
    letters: list[str] | None  # set when the verbalizers' first tokens collided

    @property
    def name(self) -> str:
        return self.task.name

    @property
    def num_choices(self) -> int:
        return len(self.choice_token_ids)

    def prompt(self, example_fields: dict[str, Any]) -> str:
        return self.task.render(example_fields, options=self.letters)


def bind(task: Task, tokenizer: Any) -> BoundTask:
    """Check that the choices have distinct first tokens; fall back to lettered options (A, B, ...) if not."""
    ids = [first_token(tokenizer, c) for c in task.choices]
    if len(set(ids)) == len(ids):
        return BoundTask(task, ids, None)
    letters = list(string.ascii_uppercase[: len(task.choices)])
    letter_ids = [first_token(tokenizer, letter) for letter in letters]
    if len(set(letter_ids)) != len(letter_ids):
        raise ValueError(f"task {task.name!r}: neither its choices nor letters have distinct first tokens")
    return BoundTask(task, letter_ids, letters)


@dataclass(frozen=True)
class Encoded:
    """One encoded prompt: its ids end at the answer position (the answer token is predicted next)."""

    example_id: str
    task: str
    input_ids: list[int]
    label: int  # index into the task's choices
    answer_token: int  # vocabulary id of the gold answer's first token
    choice_tokens: tuple[int, ...] = ()  # first-token ids of every choice of the task (label indexes it)


def encode_prompt(bound: BoundTask, example: Example, tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH) -> Encoded:
    """Encode one example; a too-long prompt loses tokens from the left of its context, never its cue."""
    bos = bos_policy(tokenizer)
    budget = max_length - (1 if bos is not None else 0)
    fields = dict(example.fields)
    ids = tokenizer(bound.prompt(fields), add_special_tokens=False).input_ids
    field_name = bound.task.truncate_field
    if len(ids) > budget and field_name and isinstance(fields.get(field_name), str):
        context_ids = tokenizer(fields[field_name], add_special_tokens=False).input_ids
        for _ in range(4):  # re-tokenisation at the cut can shift a token or two; converge in a few steps
            overflow = len(ids) - budget
            if overflow <= 0:
                break
            context_ids = context_ids[overflow + 1 :]
            fields[field_name] = tokenizer.decode(context_ids)
            ids = tokenizer(bound.prompt(fields), add_special_tokens=False).input_ids
    if len(ids) > budget:  # last resort: keep the end of the prompt (the question and the cue)
        ids = ids[-budget:]
    if bos is not None:
        ids = [bos, *ids]
    return Encoded(
        example.id, bound.name, ids, example.label, bound.choice_token_ids[example.label], tuple(bound.choice_token_ids)
    )


def encode_examples(
    bound: BoundTask, examples: Iterable[Example], tokenizer: Any, max_length: int = DEFAULT_MAX_LENGTH
) -> list[Encoded]:
    return [encode_prompt(bound, ex, tokenizer, max_length) for ex in examples]


@dataclass
class Batch:
    """A right-padded batch. `last_index[i]` is the answer position (last prompt token) of row i."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    last_index: torch.Tensor
    labels: torch.Tensor  # class indices
    answer_tokens: torch.Tensor
    example_ids: list[str]
    tasks: list[str]
    choice_tokens: torch.Tensor | None = None  # [b, C_max] choice token ids per row, -1 = padding

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.last_index.to(device),
            self.labels.to(device),
            self.answer_tokens.to(device),
            self.example_ids,
            self.tasks,
            None if self.choice_tokens is None else self.choice_tokens.to(device),
        )

    def __len__(self) -> int:
        return len(self.example_ids)


def collate(items: Sequence[Encoded], pad_id: int = 0) -> Batch:
    """Dynamic padding to the longest row of the batch (right padding)."""
    width = max(len(it.input_ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        ids[row, : len(it.input_ids)] = torch.tensor(it.input_ids)
        mask[row, : len(it.input_ids)] = 1
    width_c = max(len(it.choice_tokens) for it in items)
    choices = None
    if width_c:
        choices = torch.full((len(items), width_c), -1, dtype=torch.long)
        for row, it in enumerate(items):
            choices[row, : len(it.choice_tokens)] = torch.tensor(it.choice_tokens, dtype=torch.long)
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        last_index=torch.tensor([len(it.input_ids) - 1 for it in items]),
        labels=torch.tensor([it.label for it in items]),
        answer_tokens=torch.tensor([it.answer_token for it in items]),
        example_ids=[it.example_id for it in items],
        tasks=[it.task for it in items],
        choice_tokens=choices,
    )


def batches(items: Sequence[Encoded], batch_size: int, pad_id: int = 0, sort_by_length: bool = True) -> list[Batch]:
    """Split into padded batches; sorting by length (stable) keeps padding small for scoring passes."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids)) if sort_by_length else range(len(items))
    ordered = [items[i] for i in order]
    return [collate(ordered[i : i + batch_size], pad_id) for i in range(0, len(ordered), batch_size)]
