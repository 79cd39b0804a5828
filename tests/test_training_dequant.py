"""The dequantised-base cache of 4-bit training (shared/ml/training/dequant.py): same model, restored after."""

from __future__ import annotations

import pytest
import torch

from shared.ml.models import Base, answer_logits
from shared.ml.training import dequant
from shared.ml.training.dequant import dequantized_base, resolve
from shared.ml.training.many import AdapterSpec, train_many
from shared.ml.training.trainer import prepare_tasks, trainable_4bit
from tests.test_training_multi import CFG, toy_task


@pytest.fixture(scope="module")
def nf4():
    base = Base.load("tiny-llama", "nf4", "cpu")
    trainable_4bit(base.model)
    return base


def _batch(base: Base):
    from shared.ml.encoding import Encoded, collate

    texts = ("the movie was good", "a long and rather bad film indeed")
    enc = [Encoded(f"r{i}", "t", base.tokenizer(t).input_ids, 0, 1) for i, t in enumerate(texts)]
    return collate(enc, base.tokenizer.pad_token_id or 0)


def test_cached_forward_and_backward_equal_bitsandbytes(nf4):
    import bitsandbytes as bnb

    layers = [m for m in nf4.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    x = torch.randn(3, 5, layers[0].in_features, requires_grad=True)
    ref = layers[0](x)
    (g_ref,) = torch.autograd.grad(ref.square().sum(), x)
    with dequantized_base(nf4.model, "cached") as use:
        assert use == "cached" and all("forward" in vars(m) for m in layers)
        out = layers[0](x)
        (g_out,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-5, atol=1e-5)
    # restored: the class's forward again, no cached copy left behind
    assert not any("forward" in vars(m) or hasattr(m, "_chorus_dequantized") for m in layers)


def test_whole_model_logits_equal(nf4):
    batch = _batch(nf4)
    with torch.no_grad():
        ref = answer_logits(nf4.model, batch)
        with dequantized_base(nf4.model, "cached"):
            out = answer_logits(nf4.model, batch)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert not torch.equal(out, torch.zeros_like(out))


def test_policy_resolution(nf4, tiny_base, monkeypatch):
    assert resolve("auto", tiny_base.model) == "per_call"  # nothing 4-bit to cache
    assert resolve("cached", tiny_base.model) == "per_call"
    assert resolve("per_call", nf4.model) == "per_call" and resolve("cached", nf4.model) == "cached"
    monkeypatch.setattr(dequant, "_free_bytes", lambda device: 10**12)
    assert resolve("auto", nf4.model) == "cached"
    monkeypatch.setattr(dequant, "_free_bytes", lambda device: 1000)  # the copies would not fit
    assert resolve("auto", nf4.model) == "per_call"
    with pytest.raises(ValueError, match="dequantize must be one of"):
        resolve("sometimes", nf4.model)
    with dequantized_base(nf4.model, "per_call") as use:
        assert use == "per_call" and not any("forward" in vars(m) for m in nf4.model.modules())


def test_training_with_the_cache_equals_training_without(nf4):
    data = prepare_tasks(nf4.tokenizer, [toy_task("toy_a", n=12), toy_task("toy_c", ("awful", "nice"), n=8)], CFG)
    specs = [AdapterSpec("x", ["toy_a", "toy_c"], seed=1), AdapterSpec("y", ["toy_c"], seed=2)]
    cfg = {**CFG, "epochs": 2, "patience": None}
    cached = train_many(nf4, specs, {**cfg, "dequantize": "cached"}, data)
    plain = train_many(nf4, specs, {**cfg, "dequantize": "per_call"}, data)
    for a, b in zip(cached, plain, strict=True):
        assert a.best_epoch == b.best_epoch
        for k in a.state:
            torch.testing.assert_close(a.state[k], b.state[k], rtol=1e-3, atol=1e-4)
        for t in a.val_metrics:
            assert a.val_metrics[t].accuracy == pytest.approx(b.val_metrics[t].accuracy, abs=1e-9)
