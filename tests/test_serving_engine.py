"""The multi-LoRA engine: per-row outputs equal PEFT's (set_adapter per adapter), slots, LRU, pinning, loading."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from shared.ml.models import Base, answer_logits, attach_lora, lora_state
from shared.ml.serving.multi_lora import (
    AdapterFormatError,
    AdapterShapeError,
    MultiLoRAEngine,
    NoFreeSlotError,
    prepare_adapter,
)
from shared.ml.serving.synthetic import random_lora_state, write_random_adapter

# (name, rank, targets, seed, extra config)
ADAPTERS = [
    ("a0", 4, ("q_proj", "v_proj"), 1, {}),
    ("a1", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 2, {"use_rslora": True}),
    ("a2", 2, ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"), 3, {}),
]


def _peft_with_adapters(quantization: str):
    """A fresh base with three PEFT adapters (random non-zero B), their states, and reference logits per adapter."""
    base = Base.load("tiny-llama", quantization, "cpu")
    peft_model = None
    for name, rank, targets, seed, extra in ADAPTERS:
        peft_model = attach_lora(
            base.model if peft_model is None else peft_model, rank=rank, targets=targets, seed=seed, adapter_name=name
        )
        for key, value in extra.items():
            setattr(peft_model.peft_config[name], key, value)
        gen = torch.Generator().manual_seed(100 + seed)
        for pname, param in peft_model.named_parameters():
            if f"lora_B.{name}." in pname:
                param.data = torch.randn(param.shape, generator=gen) * 0.2
        if extra.get("use_rslora"):  # PEFT fixes the scaling when the layer is created; redo it
            for module in peft_model.modules():
                if isinstance(getattr(module, "scaling", None), dict) and name in module.scaling:
                    module.scaling[name] = module.lora_alpha[name] / module.r[name] ** 0.5
    assert peft_model is not None
    # named_parameters, not get_peft_model_state_dict: state_dict() on a CPU 4-bit model that has run a
    # forward re-packs its weights (bitsandbytes), which changes later logits by ~1e-3.
    states = {
        name: (
            {k: v.detach().clone() for k, v in lora_state(peft_model, name).items()},
            {**peft_model.peft_config[name].to_dict(), **extra},
        )
        for name, *_ in ADAPTERS
    }
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 600, (7, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[4, 5:] = 0
    mask[6, 11:] = 0
    batch = SimpleNamespace(input_ids=ids, attention_mask=mask, last_index=mask.sum(1) - 1)
    reference = {}
    with torch.no_grad():
        for name, *_ in ADAPTERS:
            peft_model.set_adapter(name)
            reference[name] = answer_logits(peft_model, batch)
        with peft_model.disable_adapter():
            reference[None] = answer_logits(peft_model, batch)
    model = peft_model.unload()
    return model, states, batch, reference


@pytest.fixture(scope="module")
def fp32_setup():
    return _peft_with_adapters("none")


@pytest.mark.parametrize("mode", ["stacked", "bmm"])
def test_mixed_batch_equals_peft_set_adapter(fp32_setup, mode):
    model, states, batch, reference = fp32_setup
    engine = MultiLoRAEngine(model, max_slots=4, mode=mode, targets=("q_proj",))
    try:
        for name, (state, config) in states.items():
            engine.load_state(name, state, config)
        slots = {name: engine.activate(name) for name in states}
        assignment = ["a0", "a1", None, "a2", "a1", "a0", None]
        rows = [slots[a] if a is not None else -1 for a in assignment]
        out = engine.answer_logits(batch.input_ids, batch.attention_mask, batch.last_index, rows)
        for row, adapter in enumerate(assignment):
            torch.testing.assert_close(out[row], reference[adapter][row], atol=1e-4, rtol=0)
        # each adapter alone ("single" routing), and every row through the same adapter
        for name in states:
            alone = engine.answer_logits(batch.input_ids, batch.attention_mask, batch.last_index, [slots[name]] * 7)
            torch.testing.assert_close(alone, reference[name], atol=1e-4, rtol=0)
        # one adapter mixed with base rows
        rows = [slots["a1"], -1, -1, slots["a1"], -1, slots["a1"], -1]
        out = engine.answer_logits(batch.input_ids, batch.attention_mask, batch.last_index, rows)
        for row, slot in enumerate(rows):
            torch.testing.assert_close(out[row], reference["a1" if slot >= 0 else None][row], atol=1e-4, rtol=0)
        # no adapter at all: exactly the base model
        base_only = engine.answer_logits(batch.input_ids, batch.attention_mask, batch.last_index, [-1] * 7)
        torch.testing.assert_close(base_only, reference[None], atol=1e-5, rtol=0)
        # the adapters really differ from the base (the comparison above is not vacuous)
        assert (reference["a0"] - reference[None]).abs().max() > 0.05
    finally:
        engine.unwrap()


def test_nf4_mixed_batch_matches_peft():
    """On a 4-bit base the bitsandbytes CPU kernel rounds activations to bf16, so results agree to ~1e-3
    (not 1e-4): any difference in the 7th digit of an input can flip a bf16 rounding downstream."""
    model, states, batch, reference = _peft_with_adapters("nf4")
    engine = MultiLoRAEngine(model, max_slots=3)
    for name, (state, config) in states.items():
        engine.load_state(name, state, config)
    slots = {name: engine.activate(name) for name in states}
    assignment = ["a2", "a0", "a1", None, "a0", "a2", "a1"]
    rows = [slots[a] if a is not None else -1 for a in assignment]
    out = engine.answer_logits(batch.input_ids, batch.attention_mask, batch.last_index, rows)
    for row, adapter in enumerate(assignment):
        torch.testing.assert_close(out[row], reference[adapter][row], atol=2e-2, rtol=0)
        if adapter is not None:  # far closer to its own adapter than to the base
            assert (out[row] - reference[adapter][row]).abs().max() < 0.2 * (
                reference[adapter][row] - reference[None][row]
            ).abs().max()


def test_slots_lru_and_pinning():
    model = Base.load("tiny-llama", "none", "cpu").model
    engine = MultiLoRAEngine(model, max_slots=2, max_host_adapters=4)
    for i in range(5):
        state, config = random_lora_state(model, rank=2, seed=i)
        engine.load_state(f"k{i}", state, config)
    # the host cache keeps at most 4 adapters (the oldest non-resident one goes)
    assert len(engine._host) == 4 and not engine.is_registered("k0")
    engine.acquire(["k1"])  # pinned
    engine.activate("k2")
    engine.activate("k3")  # evicts k2 (LRU, unpinned), never k1
    assert set(engine.resident()) == {"k1", "k3"}
    engine.acquire(["k3"])
    with pytest.raises(NoFreeSlotError):
        engine.activate("k4")
    engine.release(["k3"])
    engine.activate("k4")
    assert set(engine.resident()) == {"k1", "k4"}
    assert engine.pinned() == {"k1": 1}
    with pytest.raises(RuntimeError, match="pinned"):
        engine.evict("k1")
    engine.release(["k1"])
    assert engine.evict("k1") and engine.slot_of("k1") is None
    # resident and pinned adapters are never dropped from the host cache
    engine.acquire(["k4"])
    for i in range(5, 9):
        state, config = random_lora_state(model, rank=2, seed=i)
        engine.load_state(f"k{i}", state, config)
    assert engine.is_registered("k4")


def test_results_survive_slot_reuse_and_rank_growth():
    model = Base.load("tiny-llama", "none", "cpu").model
    engine = MultiLoRAEngine(model, max_slots=2, max_rank=2, targets=("q_proj",))
    ids = torch.randint(3, 600, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    last = mask.sum(1) - 1
    state, config = random_lora_state(model, rank=2, seed=5)
    engine.load_state("small", state, config)
    first = engine.answer_logits(ids, mask, last, [engine.activate("small")] * 3)
    # an adapter of higher rank on more modules forces a relayout; "small" must give the same result after it
    state, config = random_lora_state(model, rank=8, targets=("q_proj", "v_proj", "o_proj", "down_proj"), seed=6)
    engine.load_state("big", state, config)
    big_slot = engine.activate("big")
    assert engine.rank == 8 and engine.stats["relayouts"] >= 2
    again = engine.answer_logits(ids, mask, last, [engine.slot_of("small"), big_slot, engine.slot_of("small")])
    torch.testing.assert_close(again[0], first[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(again[2], first[2], atol=1e-5, rtol=0)
    # evict and bring back from the host cache ("warm" load): same numbers
    engine.evict("small")
    third = engine.answer_logits(ids, mask, last, [engine.activate("small")] * 3)
    torch.testing.assert_close(third, first, atol=1e-5, rtol=0)


def test_load_folder_checks_identity_and_integrity(tmp_path, tiny_base):
    from shared.ml.training.adapters import AdapterIntegrityError, AdapterMismatchError

    model = Base.load("tiny-llama", "none", "cpu").model
    engine = MultiLoRAEngine(model, max_slots=2)
    meta = write_random_adapter(tmp_path / "ad", model, tiny_base.info, name="ad", rank=4, seed=1)
    prepared = engine.load_folder("ad", tmp_path / "ad", tiny_base.info)
    assert prepared.meta["sha256"] == meta.sha256 and engine.is_registered("ad")
    other = Base.load("tiny-llama-seed1", "none", "cpu")
    with pytest.raises(AdapterMismatchError):
        engine.load_folder("x", tmp_path / "ad", other.info)
    weights = tmp_path / "ad" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(AdapterIntegrityError):
        engine.load_folder("y", tmp_path / "ad", tiny_base.info)


def test_unsupported_adapters_are_refused(tiny_base):
    model = Base.load("tiny-llama", "none", "cpu").model
    engine = MultiLoRAEngine(model, max_slots=2)
    state, config = random_lora_state(model, rank=2)
    with pytest.raises(AdapterFormatError, match="use_dora"):
        prepare_adapter("d", state, {**config, "use_dora": True})
    with pytest.raises(AdapterFormatError, match="unsupported tensor"):
        prepare_adapter(
            "b", {**state, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.zeros(64)}, config
        )
    key = next(k for k in state if "lora_A" in k)
    bad = {**state, key: torch.zeros(2, 99)}
    with pytest.raises(AdapterShapeError):
        engine.load_state("s", bad, config)
    missing = {k.replace("layers.0", "layers.9"): v for k, v in state.items()}
    with pytest.raises(AdapterShapeError, match="no module"):
        engine.load_state("m", missing, config)
