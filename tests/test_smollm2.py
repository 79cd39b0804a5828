"""The real SmolLM2-135M-Instruct: loads offline from its package and scores a real task."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_smollm2_loads_offline_and_beats_chance_on_sst2(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from shared.ml.evaluate import evaluate
    from shared.ml.models import Base

    base = Base.load("smollm2-135m", "none", "cpu")
    assert base.info.name == "smollm2-135m" and len(base.info.revision) == 64
    assert base.model.config.num_hidden_layers == 30
    metrics = evaluate(base.model, base.tokenizer, ["sst2"], "test", max_examples=200, batch_size=25)
    # A 135M instruct model reads sentiment clearly better than a coin flip.
    assert metrics["sst2"].accuracy > 0.55
    assert metrics["sst2"].n == 200


def test_smollm2_nf4_agrees_with_full_precision():
    from shared.ml.evaluate import evaluate
    from shared.ml.models import Base

    full = Base.load("smollm2-135m", "none", "cpu")
    nf4 = Base.load("smollm2-135m", "nf4", "cpu")
    a = evaluate(full.model, full.tokenizer, ["rte"], "test", max_examples=40, batch_size=20)["rte"]
    b = evaluate(nf4.model, nf4.tokenizer, ["rte"], "test", max_examples=40, batch_size=20)["rte"]
    assert abs(a.accuracy - b.accuracy) <= 0.15
    assert abs(a.loss - b.loss) < 0.5 * a.loss
