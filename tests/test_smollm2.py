"""The real SmolLM2-135M-Instruct: loads offline from its package and scores a real task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.needs_data]  # sst2 and rte rows


def test_smollm2_loads_offline_and_beats_the_majority_class_on_sst2(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from scipy.stats import binomtest

    from shared.ml.data import subsample
    from shared.ml.evaluate import evaluate
    from shared.ml.models import Base
    from shared.ml.tasks.registry import get_task

    base = Base.load("smollm2-135m", "none", "cpu")
    assert base.info.name == "smollm2-135m" and len(base.info.revision) == 64
    assert base.model.config.num_hidden_layers == 30
    metrics = evaluate(base.model, base.tokenizer, ["sst2"], "test", max_examples=200, batch_size=25)
    assert metrics["sst2"].n == 200
    # A 135M instruct model reads sentiment better than always answering the most frequent label (measured:
    # 0.60 against 0.50); one-sided exact binomial test on the 200 rows.
    labels = [e.label for e in subsample(get_task("sst2").split("test"), 200, 0)]
    majority = np.bincount(labels).max() / len(labels)
    correct = round(metrics["sst2"].accuracy * 200)
    assert binomtest(correct, 200, majority, alternative="greater").pvalue < 0.01, (metrics["sst2"].accuracy, majority)


def test_smollm2_nf4_agrees_with_full_precision():
    """The NF4 base is what the README says (every decoder Linear in 4-bit NF4, double-quantized, blocks of 64),
    its weights are the full model's within NF4's rounding, and its answer-position logits follow the full
    model's row by row (a 4-bit model of other or broken weights correlates near 0)."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from shared.ml.data import subsample
    from shared.ml.encoding import bind, collate, encode_examples
    from shared.ml.models import Base, answer_logits
    from shared.ml.tasks.registry import get_task

    full = Base.load("smollm2-135m", "none", "cpu")
    nf4 = Base.load("smollm2-135m", "nf4", "cpu")
    assert nf4.info.quantization == "nf4" and nf4.info.revision == full.info.revision
    reference = dict(full.model.named_modules())
    quantized = {n: m for n, m in nf4.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    decoder_linears = {n for n, m in reference.items() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert set(quantized) == decoder_linears and len(quantized) == 30 * 7
    for name, module in quantized.items():  # before any forward: bitsandbytes may repack CPU weights on first use
        state = module.weight.quant_state
        assert (state.quant_type, state.blocksize, bool(state.nested)) == ("nf4", 64, True), name
        weight = bnbf.dequantize_4bit(module.weight.data, state).float()
        ref = reference[name].weight.float()
        assert float((weight - ref).norm() / ref.norm()) < 0.15, name  # measured about 0.10 for every layer

    task = get_task("rte")
    examples = subsample(task.split("test"), 40, 0)
    logits = {}
    with torch.no_grad():
        for kind, base in (("full", full), ("nf4", nf4)):
            enc = encode_examples(bind(task, base.tokenizer), examples, base.tokenizer, 256)
            pad = base.tokenizer.pad_token_id or 0
            logits[kind] = torch.cat(
                [answer_logits(base.model, collate(enc[i : i + 10], pad)) for i in range(0, 40, 10)]
            )
    corr = [float(np.corrcoef(logits["full"][i].numpy(), logits["nf4"][i].numpy())[0, 1]) for i in range(40)]
    assert min(corr) > 0.8 and np.mean(corr) > 0.85, corr  # measured: min 0.88, mean 0.91 over the vocabulary
    gold = torch.tensor([e.answer_token for e in enc])
    nll = {k: torch.nn.functional.cross_entropy(v, gold, reduction="none") for k, v in logits.items()}
    assert float((nll["full"] - nll["nf4"]).abs().mean()) < 0.3 * float(nll["full"].mean())  # measured 0.45 of 2.9
