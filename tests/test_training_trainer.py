"""Stage-2 trainer on the tiny Llama (NF4 on CPU): learning, best-epoch restore, early stopping, seeding."""

from __future__ import annotations

import pytest
import torch

from shared.ml.evaluate import TaskMetrics, metrics_from_scores
from shared.ml.models import Base
from shared.ml.tasks.base import Example, Task
from shared.ml.training.params import TrainingParams
from shared.ml.training.trainer import (
    answer_ce_loss,
    batching_of,
    epoch_batches,
    extract_state,
    fit_lora,
    prepare_tasks,
    score_split,
    temporary_adapter,
    train_adapter,
    trainable_4bit,
)
from tests.recompute import forward_flops, llama_shape, tiny_llama_config, train_flops

CFG = dict(
    epochs=3,
    lr=5e-3,
    batch_size=8,
    eval_batch_size=16,
    rank=4,
    seed=0,
    patience=None,
    max_length=64,
    max_train=None,
    max_val=None,
    max_test=None,
)


def toy_task(name: str, words: tuple[str, str] = ("bad", "good"), n: int = 32) -> Task:
    def split(s: str, k: int) -> list[Example]:
        return [
            Example(f"{name}/{s}/{i}", {"text": f"the movie was {words[i % 2]} number {i}"}, i % 2) for i in range(k)
        ]

    return Task(
        name=name,
        template="{{text}}. Is the review positive or negative? Answer:",
        choices=["negative", "positive"],
        loader=lambda: {"train": split("train", n), "val": split("val", 12), "test": split("test", 12)},
    )


@pytest.fixture(scope="module")
def nf4_base():
    return Base.load("tiny-llama", "nf4", "cpu")


def _plain(base: Base) -> bool:
    from peft import PeftModel

    return not isinstance(base.model, PeftModel) and not any("lora_" in n for n, _ in base.model.named_parameters())


def test_training_reduces_loss_and_leaves_the_base_clean(nf4_base):
    tasks = [toy_task("toy_a"), toy_task("toy_b", ("terrible", "great"))]
    trained = train_adapter(nf4_base, tasks, CFG, name="g0")
    losses = [h["train_loss"] for h in trained.history]
    assert len(losses) == 3
    assert losses[-1] < losses[0]
    assert set(trained.val_metrics) == {"toy_a", "toy_b"}
    assert all("train_accuracy" in h and "val_accuracy" in h for h in trained.history)
    assert trained.state and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in trained.state)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in trained.state.values())
    # B moved away from 0
    assert any(float(v.abs().max()) > 0 for k, v in trained.state.items() if "lora_B" in k)
    assert _plain(nf4_base)
    c = trained.cost
    assert c.steps == 3 * 8
    assert c.peak_memory_bytes > 0 and c.wall_seconds > 0
    # the FLOPs, recomputed from the model's config.json and the formula: 3 epochs over every training row,
    # and each epoch's validation pass over both tasks (forward with the adapter)
    shape = llama_shape(tiny_llama_config(), CFG["rank"])
    data = prepare_tasks(nf4_base.tokenizer, tasks, CFG)
    train = [n for d in data.values() for n in d.lengths("train", nf4_base.tokenizer, CFG["max_length"])]
    val = [n for d in data.values() for n in d.lengths("val", nf4_base.tokenizer, CFG["max_length"])]
    assert len(train) == 64 and len(val) == 24
    assert (c.train_rows, c.train_tokens) == (3 * 64, 3 * sum(train))
    assert c.train_flops == pytest.approx(3 * train_flops(shape, train), rel=1e-12)
    assert (c.eval_rows, c.eval_tokens) == (3 * 24, 3 * sum(val))
    assert c.eval_flops == pytest.approx(3 * forward_flops(shape, val), rel=1e-12)
    assert c.total_flops == pytest.approx(c.train_flops + c.eval_flops, rel=1e-12)


def test_same_seed_same_adapter(tiny_base):
    cfg = {**CFG, "epochs": 1}
    a = train_adapter(tiny_base, [toy_task("toy_a")], cfg, name="x")
    b = train_adapter(tiny_base, [toy_task("toy_a")], cfg, name="x")
    c = train_adapter(tiny_base, [toy_task("toy_a")], {**cfg, "seed": 1}, name="x")
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)
    assert _plain(tiny_base)


def test_one_task_per_batch_interleaved_and_seeded(tiny_base):
    data = prepare_tasks(tiny_base.tokenizer, [toy_task("toy_a"), toy_task("toy_b")], CFG)
    enc = {t: d.encodings("train", tiny_base.tokenizer, 64) for t, d in data.items()}
    batches = epoch_batches(enc, 5, seed=0, epoch=1, batching="task")
    assert all(len(set(b.tasks)) == 1 for b in batches)
    order = [b.tasks[0] for b in batches]
    assert order != sorted(order)  # interleaved, not task after task
    again = epoch_batches(enc, 5, seed=0, epoch=1, batching="task")
    assert [b.example_ids for b in batches] == [b.example_ids for b in again]
    other_epoch = epoch_batches(enc, 5, seed=0, epoch=2, batching="task")
    assert [b.example_ids for b in batches] != [b.example_ids for b in other_epoch]
    ids = sorted(i for b in batches for i in b.example_ids)
    assert ids == sorted(e.id for d in data.values() for e in d.train)


def test_mixed_batches_are_the_default_and_shuffle_tasks_together(tiny_base):
    """The default batching shuffles the rows of all tasks together (a plain loop's batches): full batches except
    the last, tasks mixed within batches, every row once an epoch, seeded."""
    data = prepare_tasks(tiny_base.tokenizer, [toy_task("toy_a"), toy_task("toy_b")], CFG)
    enc = {t: d.encodings("train", tiny_base.tokenizer, 64) for t, d in data.items()}
    assert TrainingParams().batching == "mixed" and batching_of({}) == ("mixed", None)
    batches = epoch_batches(enc, 5, seed=0, epoch=1)
    n = sum(len(v) for v in enc.values())
    assert sorted(len(b) for b in batches) == sorted([5] * (n // 5) + ([n % 5] if n % 5 else []))
    assert any(len(set(b.tasks)) > 1 for b in batches)
    ids = sorted(i for b in batches for i in b.example_ids)
    assert ids == sorted(e.id for d in data.values() for e in d.train)
    assert [b.example_ids for b in batches] == [b.example_ids for b in epoch_batches(enc, 5, seed=0, epoch=1)]
    assert [b.example_ids for b in batches] != [b.example_ids for b in epoch_batches(enc, 5, seed=1, epoch=1)]


def test_best_epoch_is_restored_and_early_stopping(tiny_base):
    data = prepare_tasks(tiny_base.tokenizer, [toy_task("toy_a")], CFG)
    scores = iter([0.3, 0.9, 0.5, 0.4, 0.2])
    snapshots = []

    def evaluate(model, cost):
        snapshots.append(extract_state(model, "sel"))
        s = next(scores)
        return (s,), {"val_accuracy": s}, {"toy_a": TaskMetrics(0.0, s, s, 1)}

    trained = fit_lora(
        tiny_base, data, {**CFG, "epochs": 5, "patience": 2}, name="sel", loss_fn=answer_ce_loss, evaluate_fn=evaluate
    )
    assert trained.best_epoch == 2
    assert len(trained.history) == 4  # epochs 3 and 4 did not improve: stopped after patience=2
    assert all(torch.equal(trained.state[k], snapshots[1][k]) for k in trained.state)
    assert not all(torch.equal(trained.state[k], snapshots[3][k]) for k in trained.state)
    assert trained.val_metrics["toy_a"].accuracy == 0.9


def test_restored_state_reproduces_the_recorded_validation_metrics(nf4_base):
    data = prepare_tasks(nf4_base.tokenizer, [toy_task("toy_a")], CFG)
    trained = train_adapter(nf4_base, ["toy_a"], {**CFG, "epochs": 2}, name="g1", data=data)
    with temporary_adapter(nf4_base, "check", 4, 32.0, ("q_proj", "k_proj", "v_proj"), 0.0, 0, trained.state) as m:
        scores = score_split(m, nf4_base, data["toy_a"], "val", CFG)
    again = metrics_from_scores(scores, 2)
    best = trained.val_metrics["toy_a"]
    assert again.accuracy == best.accuracy
    assert again.loss == pytest.approx(best.loss, abs=1e-5)


def test_init_state_replaces_the_fresh_initialisation(tiny_base):
    data = prepare_tasks(tiny_base.tokenizer, [toy_task("toy_a")], CFG)
    first = train_adapter(tiny_base, ["toy_a"], {**CFG, "epochs": 1}, name="first", data=data)
    seen = {}

    def evaluate(model, cost):
        seen.update(extract_state(model, "b"))
        return (0.0,), {}, {}

    with pytest.raises(ValueError, match="does not fit"):
        fit_lora(
            tiny_base,
            data,
            {**CFG, "epochs": 1},
            name="b",
            loss_fn=answer_ce_loss,
            evaluate_fn=evaluate,
            init_state={"nonsense.lora_A.weight": torch.zeros(1)},
        )
    assert _plain(tiny_base)
    # live-key form (".lora_A.<adapter>.weight") is accepted too
    live = {
        k.replace(".lora_A.weight", ".lora_A.zz.weight").replace(".lora_B.weight", ".lora_B.zz.weight"): v
        for k, v in first.state.items()
    }
    with temporary_adapter(tiny_base, "b", 4, 32.0, ("q_proj", "k_proj", "v_proj"), 0.0, 5, live) as m:
        loaded = extract_state(m, "b")
    assert all(torch.equal(loaded[k], first.state[k]) for k in first.state)


def test_cpu_repacking_is_switched_off_for_training():
    """bitsandbytes' AVX512-BF16 inference packing has no backward: after an eval pass, training must
    still get gradients in every layer (layer 0 included)."""
    from shared.ml.encoding import Encoded, collate
    from shared.ml.models import answer_logits

    base = Base.load("tiny-llama", "nf4", "cpu")  # fresh: nothing switched off yet
    batch = collate([Encoded(str(i), "x", list(range(10, 30 + i)), 0, 5) for i in range(3)])
    with torch.no_grad():
        answer_logits(base.model, batch)  # an eval-mode, no-grad forward: packs on AVX512-BF16 CPUs
    trainable_4bit(base.model)
    with temporary_adapter(base, "grad", 4, 32.0, ("q_proj", "k_proj", "v_proj"), 0.0, 0) as m:
        with torch.no_grad():
            answer_logits(m, batch)  # an eval-mode, no-grad forward (where packing would happen)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
        m.train()
        loss = torch.nn.functional.cross_entropy(answer_logits(m, batch), batch.answer_tokens)
        loss.backward()
        grads = {n: p.grad for n, p in m.named_parameters() if "lora_A" in n}
        assert all(g is not None and float(g.abs().sum()) > 0 for g in grads.values())
