"""Stage 2's adapters as a fan-out phase (shared/ml/training/shards.py), run here by an in-process sharder that
executes the pieces like separate workers would (an empty cache per piece): any cut of the phase gives
bitwise the same adapters, finished chunks are skipped, and a lone process trains everything in one call."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from shared.ml.sharding import Phase, use_sharder
from shared.ml.training import shards
from shared.ml.training.many import AdapterSpec
from shared.ml.training.params import TrainingParams
from shared.ml.training.trainer import prepare_tasks
from tests.test_training_multi import toy_task

TASKS = [
    toy_task("toy_a", n=8),
    toy_task("toy_b", ("terrible", "great"), n=6),
    toy_task("toy_c", ("awful", "nice"), n=6),
]


class PieceSharder:
    """Runs every piece of a phase in this process, each with its own empty cache (as another worker would)."""

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self.pieces: list[tuple[int, int]] = []
        self.results: list[dict[str, Any]] = []

    def run(self, phase: Phase, workdir: Path, progress: Any, cache: dict[str, Any]) -> None:
        module, _, name = phase.fn.partition(":")
        fn = getattr(importlib.import_module(module), name)
        for start, end in phase.ranges(self.shards):
            self.pieces.append((start, end))
            self.results.append(fn(phase.args, workdir, progress, start, end, {}))


def _params() -> TrainingParams:
    return TrainingParams(
        model="tiny-llama",
        quantization="none",
        groups=[["cb"], ["rte"]],
        epochs=1,
        batch_size=4,
        lr=2e-3,
        max_train=8,
        max_val=6,
        max_test=4,
        max_length=64,
        seed=0,
    )


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    params = _params()
    from shared.ml.models import Base

    base = Base.load(params.model, params.quantization, "cpu")
    data = prepare_tasks(base.tokenizer, TASKS, params)
    # 6 adapters: 2 chunks of CHUNK=4 (the last one short)
    specs = [AdapterSpec(f"a{i}", [t.name for t in TASKS[: 1 + i % 3]], seed=i) for i in range(6)]
    return params, base, data, specs


def _run(setup, workdir: Path, shards_n: int, monkeypatch) -> tuple[dict[str, Any], PieceSharder]:
    params, base, data, specs = setup
    monkeypatch.setattr(
        shards, "training_prepare", lambda args, wd, cache: (TrainingParams.model_validate(args["params"]), base, data)
    )
    sharder = PieceSharder(shards_n)
    with use_sharder(sharder):
        out = shards.train_adapters(base, specs, params, data, workdir, lambda *a, **k: None)
    return out, sharder


def test_any_cut_gives_bitwise_the_same_adapters(setup, tmp_path, monkeypatch):
    one, s1 = _run(setup, tmp_path / "one", 1, monkeypatch)
    three, s3 = _run(setup, tmp_path / "three", 3, monkeypatch)
    assert s1.pieces == [(0, 6)] and s3.pieces == [(0, 4), (4, 6)]  # aligned to whole chunks
    assert list(one) == [f"a{i}" for i in range(6)] == list(three)
    for name in one:
        assert one[name].state.keys() == three[name].state.keys()
        assert all(torch.equal(one[name].state[k], three[name].state[k]) for k in one[name].state)
        assert one[name].val_metrics == three[name].val_metrics and one[name].best_epoch == three[name].best_epoch
        assert one[name].cost.train_rows == three[name].cost.train_rows > 0
    # each chunk is what train_many gives for that chunk alone
    params, base, data, specs = setup
    from shared.ml.training.many import train_many

    alone = {t.name: t for t in train_many(base, specs[4:], params, data)}
    assert all(torch.equal(alone["a5"].state[k], three["a5"].state[k]) for k in alone["a5"].state)


def test_a_redone_piece_skips_finished_chunks_and_a_missing_adapter_is_an_error(setup, tmp_path, monkeypatch):
    _, first = _run(setup, tmp_path / "w", 2, monkeypatch)
    assert sum(r["trained"] for r in first.results) == 6
    again, second = _run(setup, tmp_path / "w", 2, monkeypatch)
    assert sum(r["trained"] for r in second.results) == 0 and len(again) == 6
    (tmp_path / "w" / shards.FOLDER / "a2" / "trained.json").unlink()
    with pytest.raises(RuntimeError, match="adapter 'a2' of the fanned-out training is missing"):
        shards.load_trained(tmp_path / "w" / shards.FOLDER, "a2")


def test_without_a_sharder_or_with_one_chunk_it_trains_here(setup, tmp_path):
    params, base, data, specs = setup
    out = shards.train_adapters(base, specs[:3], params, data, tmp_path, lambda *a, **k: None)
    assert list(out) == ["a0", "a1", "a2"] and not (tmp_path / shards.FOLDER).exists()
    sharder = PieceSharder(2)
    with use_sharder(sharder):
        shards.train_adapters(base, specs[:4], params, data, tmp_path, lambda *a, **k: None)
    assert sharder.pieces == [] and not (tmp_path / shards.FOLDER).exists()


def test_saved_adapters_round_trip(setup, tmp_path):
    params, base, data, specs = setup
    from shared.ml.training.many import train_many

    (t,) = train_many(base, specs[:1], params, data)
    shards.save_trained(tmp_path, t)
    back = shards.load_trained(tmp_path, t.name)
    assert all(torch.equal(back.state[k], t.state[k]) for k in t.state)
    assert (back.name, back.tasks, back.best_epoch, back.seed, back.history) == (
        t.name,
        t.tasks,
        t.best_epoch,
        t.seed,
        t.history,
    )
    assert back.val_metrics == t.val_metrics and back.cost.to_dict() == t.cost.to_dict()
    assert json.loads((tmp_path / t.name / "trained.json").read_text())["name"] == t.name
