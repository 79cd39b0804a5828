"""Boosting: residuals meet their own examples in shuffled batches (the reference misaligned them)."""

from __future__ import annotations

import pytest
import torch

from shared.ml.tasks.base import Example, Task
from shared.ml.training import boosting
from shared.ml.training.boosting import (
    batch_targets,
    boost_group,
    by_id,
    increment_loss,
    residuals,
    train_booster,
)
from shared.ml.training.trainer import epoch_batches, prepare_tasks, score_split
from tests.recompute import forward_flops, llama_shape, tiny_llama_config, train_flops

CFG = dict(
    epochs=1,
    lr=5e-3,
    batch_size=4,
    eval_batch_size=16,
    rank=4,
    seed=0,
    patience=None,
    max_length=64,
    max_train=None,
    max_val=None,
    max_test=None,
)


def toy_task(name: str, n: int = 20) -> Task:
    words = ("awful", "lovely", "fine")

    def split(s: str, k: int) -> list[Example]:
        return [Example(f"{name}/{s}/{i}", {"text": f"it was {words[i % 3]} and {i}"}, i % 3) for i in range(k)]

    return Task(
        name=name,
        template="{{text}}. Yes or No or Maybe? Answer:",
        choices=["Yes", "No", "Maybe"],
        loader=lambda: {"train": split("train", n), "val": split("val", 9), "test": split("test", 9)},
    )


def test_residuals_are_onehot_minus_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    r = residuals(logits, torch.tensor([0, 2]))
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(r[0], torch.tensor([1.0, 0.0, 0.0]) - p[0])
    torch.testing.assert_close(r[1], torch.tensor([0.0, 0.0, 1.0]) - p[1])
    torch.testing.assert_close(r.sum(-1), torch.zeros(2), atol=1e-6, rtol=0)


def _distinct_residuals(data) -> dict[str, torch.Tensor]:
    """A residual row that names its own example: row i of task t = (i, -i, hash of the task)."""
    out = {}
    for t, d in data.items():
        for i, e in enumerate(d.train):
            out[e.id] = torch.tensor([float(i), -float(i), float(len(t))])
    return out


def test_batch_targets_follow_example_ids_in_shuffled_batches(tiny_base):
    data = prepare_tasks(tiny_base.tokenizer, [toy_task("toy_a"), toy_task("toy_bb")], CFG)
    res = _distinct_residuals(data)
    zbase = {eid: -r for eid, r in res.items()}
    enc = {t: d.encodings("train", tiny_base.tokenizer, 64) for t, d in data.items()}
    batches = epoch_batches(enc, 4, seed=0, epoch=1)
    natural = [e.id for d in data.values() for e in d.train]
    assert [i for b in batches for i in b.example_ids] != natural  # really shuffled
    for b in batches:
        target, zb = batch_targets(b, res, zbase)
        for row, eid in enumerate(b.example_ids):
            assert torch.equal(target[row], res[eid])
            assert torch.equal(zb[row], -res[eid])


def test_weak_learner_sees_each_examples_own_residual(tiny_base, monkeypatch):
    """Train a real weak learner and record, for every row of every (shuffled) batch, the target it was fitted to."""
    data = prepare_tasks(tiny_base.tokenizer, [toy_task("toy_a"), toy_task("toy_bb")], CFG)
    res = _distinct_residuals(data)
    base_train = {t: torch.zeros(len(d.train), 3) for t, d in data.items()}
    base_by_id = {}
    for t, d in data.items():
        base_by_id.update(by_id([e.id for e in d.train], base_train[t]))
    seen: list[tuple[str, torch.Tensor]] = []
    real = boosting.batch_targets

    def recording(batch, residual_by_id, base_lookup):
        target, zb = real(batch, residual_by_id, base_lookup)
        seen.extend(zip(batch.example_ids, target, strict=True))
        return target, zb

    monkeypatch.setattr(boosting, "batch_targets", recording)
    val = {t: torch.zeros(len(d.val), 3) for t, d in data.items()}
    trained, zb_val = train_booster(
        tiny_base,
        data,
        {**CFG, "epochs": 2},
        name="booster",
        residual_by_id=res,
        base_train_by_id=base_by_id,
        current_val=val,
        base_val=val,
        eta=0.5,
    )
    assert len(seen) == 2 * sum(len(d.train) for d in data.values())
    for eid, target in seen:
        assert torch.equal(target, res[eid])
    assert {t: z.shape for t, z in zb_val.items()} == {t: (len(d.val), 3) for t, d in data.items()}
    assert trained.best_epoch in (1, 2)


def test_increment_is_zero_at_theta0_so_loss_is_the_rows_own_residual_energy(tiny_base):
    """At theta0 (B = 0) the weak learner's choice logits equal the base's, so the increment is exactly 0 and
    the MSE of a batch equals the mean squared residual of the batch's OWN examples: base logits and
    residuals are both looked up by example id."""
    from shared.ml.training.trainer import temporary_adapter

    data = prepare_tasks(tiny_base.tokenizer, [toy_task("toy_a")], CFG)
    d = data["toy_a"]
    zbase = score_split(tiny_base.model, tiny_base, d, "train", CFG).choice_logits
    base_by_id = by_id([e.id for e in d.train], zbase)
    res = {e.id: torch.tensor([float(i), 0.5, -float(i)]) for i, e in enumerate(d.train)}
    loss_fn = increment_loss({"toy_a": d.bound.choice_token_ids}, res, base_by_id)
    batches = epoch_batches({"toy_a": d.encodings("train", tiny_base.tokenizer, 64)}, 4, seed=0, epoch=3)
    with (
        temporary_adapter(tiny_base, "theta0", 4, 32.0, ("q_proj", "k_proj", "v_proj"), 0.0, 0) as model,
        torch.no_grad(),
    ):
        for b in batches:
            expected = torch.stack([res[eid] for eid in b.example_ids]).pow(2).mean()
            assert abs(float(loss_fn(model, b)) - float(expected)) < 1e-4


def test_boost_group_keeps_only_improving_rounds(tiny_base):
    data = prepare_tasks(tiny_base.tokenizer, [toy_task("toy_a")], CFG)
    d = data["toy_a"]
    zb_train = score_split(tiny_base.model, tiny_base, d, "train", CFG).choice_logits
    zb_val = score_split(tiny_base.model, tiny_base, d, "val", CFG).choice_logits
    result = boost_group(
        tiny_base,
        data,
        {**CFG, "epochs": 2},
        group="g",
        group_train={"toy_a": zb_train},
        group_val={"toy_a": zb_val},
        base_train={"toy_a": zb_train},
        base_val={"toy_a": zb_val},
        eta=1.0,
        max_rounds=2,
    )
    assert result.rounds, "at least one round is tried"
    kept = [r for r in result.rounds if r.kept]
    assert [b.name for b in result.boosters] == [r.booster for r in kept]
    for r in kept:
        assert r.val_accuracy_after > r.val_accuracy_before
    if len(result.rounds) > len(kept):
        assert not result.rounds[-1].kept  # a round that does not improve ends boosting
    # FLOPs from the model's config.json and the formula: each round trains a booster for 2 epochs (and validates
    # it after each); a kept round before the last also scores its booster on the training rows
    shape = llama_shape(tiny_llama_config(), CFG["rank"])
    train = d.lengths("train", tiny_base.tokenizer, CFG["max_length"])
    val = d.lengths("val", tiny_base.tokenizer, CFG["max_length"])
    rescored = sum(1 for r in result.rounds if r.kept and r.round < 2)
    assert result.cost.train_flops == pytest.approx(len(result.rounds) * 2 * train_flops(shape, train), rel=1e-12)
    assert result.cost.eval_flops == pytest.approx(
        len(result.rounds) * 2 * forward_flops(shape, val) + rescored * forward_flops(shape, train), rel=1e-12
    )


def test_boosting_respects_a_flop_budget(tiny_base):
    data = prepare_tasks(tiny_base.tokenizer, [toy_task("toy_a")], CFG)
    d = data["toy_a"]
    z_train = score_split(tiny_base.model, tiny_base, d, "train", CFG).choice_logits
    z_val = score_split(tiny_base.model, tiny_base, d, "val", CFG).choice_logits
    result = boost_group(
        tiny_base,
        data,
        CFG,
        group="g",
        group_train={"toy_a": z_train},
        group_val={"toy_a": z_val},
        base_train={"toy_a": z_train},
        base_val={"toy_a": z_val},
        eta=1.0,
        max_rounds=3,
        max_flops=1e9,
        round_flops=2e9,
    )
    assert result.rounds == [] and result.boosters == [] and result.stopped == "budget"
    assert result.cost.total_flops == 0
