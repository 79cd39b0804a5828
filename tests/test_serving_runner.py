"""The ensemble runner without HTTP: chunked forwards equal the offline reference; row validation."""

from __future__ import annotations

import pytest
import torch

from shared.ml.models import Base
from shared.ml.serving.ensemble_runner import EnsembleLoadError, EnsembleRunner, RowError
from shared.ml.serving.multi_lora import MultiLoRAEngine
from shared.ml.serving.synthetic import write_ensemble, write_random_adapter


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ens")
    base = Base.load("tiny-llama", "none", "cpu")
    metas = {
        n: write_random_adapter(
            folder / "adapters" / n, base.model, base.info, name=n, tasks=["cb", "sst2"], rank=r, seed=s, b_scale=0.3
        )
        for n, r, s in (("g0", 4, 1), ("g1", 8, 2))
    }
    manifest = write_ensemble(
        folder,
        base.info,
        metas,
        {"cb": {"g0": 1.0, "g1": 0.7, "base": -0.2}, "sst2": {"g1": 1.0}},
        name="r",
        base_member="base",
        max_length=48,
    )
    return folder, base, manifest


def test_chunked_run_equals_offline_reference(built):
    from shared.ml.tasks.registry import get_task
    from shared.ml.training.ensemble import ensemble_choice_logits

    folder, base, manifest = built
    engine = MultiLoRAEngine(base.model, max_slots=2)
    runner = EnsembleRunner(engine, base.tokenizer, base.info, max_forward_rows=3)  # forces several chunks
    ensemble = runner.prepare("r", manifest, {m.name: folder / m.path for m in manifest.members if m.path})
    runner.activate(ensemble)
    examples = {t: get_task(t).split("test")[:4] for t in ("cb", "sst2")}
    rows = [{"task": t, "fields": ex.fields} for t in ("cb", "sst2") for ex in examples[t]]
    # two "requests" in one run, the second reversed
    encoded_a = runner.encode_rows(ensemble, rows)
    encoded_b = runner.encode_rows(ensemble, rows[::-1])
    out_a, out_b = runner.run([(ensemble, encoded_a), (ensemble, encoded_b)])
    assert runner.pair_count(encoded_a) == 4 * 3 + 4 * 1
    reference = Base.load("tiny-llama", "none", "cpu")
    want = {t: ensemble_choice_logits(reference, manifest, folder, t, examples[t]) for t in examples}
    flat = [want["cb"][i] for i in range(4)] + [want["sst2"][i] for i in range(4)]
    for got, logits in zip(out_a, flat, strict=True):
        torch.testing.assert_close(torch.tensor(list(got.logits.values())), logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(
            torch.tensor(list(got.probabilities.values())), torch.softmax(logits, -1), atol=1e-4, rtol=0
        )
    for got_b, got_a in zip(out_b, out_a[::-1], strict=True):
        assert got_b.probabilities == pytest.approx(got_a.probabilities, abs=1e-5)
    runner.deactivate(ensemble)
    assert not engine.pinned()
    engine.unwrap()


def test_row_errors_and_base_check(built):
    from shared.ml.models import ModelInfo

    folder, base, manifest = built
    engine = MultiLoRAEngine(base.model, max_slots=2)
    runner = EnsembleRunner(engine, base.tokenizer, base.info, max_row_chars=50)
    members = {m.name: folder / m.path for m in manifest.members if m.path}
    ensemble = runner.prepare("r", manifest, members)
    with pytest.raises(RowError) as err:
        runner.encode_rows(ensemble, [{"task": "sst2", "text": "ok"}, {"task": "cb", "fields": {"premise": "p"}}])
    assert err.value.index == 1 and err.value.param == "rows[1].fields.hypothesis"
    with pytest.raises(RowError) as err:
        runner.encode_rows(ensemble, [{"task": "sst2", "text": "z" * 51}])
    assert err.value.param == "rows[0].fields.sentence"
    other = ModelInfo("tiny-llama", "tiny-llama-seed0", "nf4", "float32")
    with pytest.raises(EnsembleLoadError) as load_err:
        EnsembleRunner(engine, base.tokenizer, other).prepare("r", manifest, members)
    assert load_err.value.kind == "base_mismatch"
    engine.unwrap()
