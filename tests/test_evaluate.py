"""Evaluation primitive on the tiny model: metrics are consistent with the raw scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.ml.data import subsample
from shared.ml.encoding import bind
from shared.ml.evaluate import macro_f1, metrics_from_scores, score_task
from shared.ml.tasks.base import Example, Task


def toy_task(n: int = 24) -> Task:
    examples = [
        Example(f"toy/test/{i}", {"text": f"review number {i} was {'good' if i % 2 else 'bad'}"}, i % 2)
        for i in range(n)
    ]
    return Task(
        name="toy",
        template="{{text}}. Is it positive or negative? Answer:",
        choices=["negative", "positive"],
        loader=lambda: {"train": examples, "val": examples, "test": examples},
    )


def test_scores_are_in_example_order_and_batch_independent(tiny_base):
    task = toy_task()
    bound = bind(task, tiny_base.tokenizer)
    examples = task.split("test")
    a = score_task(tiny_base.model, tiny_base.tokenizer, bound, examples, batch_size=5)
    b = score_task(tiny_base.model, tiny_base.tokenizer, bound, examples, batch_size=1)
    assert a.example_ids == [e.id for e in examples]
    torch.testing.assert_close(a.choice_logits, b.choice_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.token_nll, b.token_nll, atol=1e-4, rtol=1e-4)
    assert a.labels.tolist() == [e.label for e in examples]


def test_metrics_follow_from_scores():
    from shared.ml.evaluate import TaskScores

    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    scores = TaskScores(["a", "b", "c", "d"], logits, torch.tensor([0, 1, 1, 1]), torch.tensor([0.5, 1.0, 1.5, 2.0]))
    m = metrics_from_scores(scores, 2)
    assert m.accuracy == pytest.approx(0.75)
    assert m.loss == pytest.approx(1.25)
    assert m.macro_f1 == pytest.approx(macro_f1(np.array([0, 1, 0, 1]), np.array([0, 1, 1, 1]), 2))
    assert m.n == 4


def test_subsample_is_stratified_and_seeded():
    exs = [Example(str(i), {}, 0 if i < 80 else 1) for i in range(100)]
    a = subsample(exs, 10, seed=3)
    assert len(a) == 10 and sum(e.label for e in a) == 2
    assert [e.id for e in a] == [e.id for e in subsample(exs, 10, seed=3)]
    assert [e.id for e in a] != [e.id for e in subsample(exs, 10, seed=4)]
    assert subsample(exs, None) == exs
