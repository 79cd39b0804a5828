"""Model loading (tiny and NF4), seeded LoRA, answer-position logits."""

from __future__ import annotations

import pytest
import torch

from shared.ml.encoding import Encoded, collate
from shared.ml.models import Base, answer_logits, attach_lora, load_model, lora_state, resolve_model


def test_tiny_llama_is_deterministic(tiny_base):
    again = Base.load("tiny-llama", "none", "cpu")
    for (n1, p1), (n2, p2) in zip(tiny_base.model.named_parameters(), again.model.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert tiny_base.info.identity() == {
        "base_model": "tiny-llama",
        "base_revision": "tiny-llama-seed0",
        "quantization": "none",
    }


def test_other_seed_gives_other_weights(tiny_base):
    other = Base.load("tiny-llama-seed1", "none", "cpu")
    w0 = tiny_base.model.get_input_embeddings().weight
    w1 = other.model.get_input_embeddings().weight
    assert not torch.equal(w0, w1)
    assert other.info.revision != tiny_base.info.revision


def test_unknown_model_and_quantization_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown quantization"):
        load_model("tiny-llama", "int3")


def test_folder_without_safetensors_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="safetensors"):
        resolve_model(str(tmp_path))


def test_nf4_quantizes_linear_layers():
    import bitsandbytes as bnb

    base = Base.load("tiny-llama", "nf4", "cpu")
    q_proj = base.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_state.quant_type == "nf4"
    assert base.info.quantization == "nf4"


def test_nf4_logits_close_to_full_precision(tiny_base):
    nf4 = Base.load("tiny-llama", "nf4", "cpu")
    batch = collate([Encoded("x/0", "t", list(range(3, 20)), 0, 5)])
    full = answer_logits(tiny_base.model, batch)
    quant = answer_logits(nf4.model, batch)
    # 4-bit weights change logits a little, not a lot.
    assert torch.corrcoef(torch.stack([full[0], quant[0]]))[0, 1] > 0.95


def test_lora_is_seeded_with_zero_b():
    base = Base.load("tiny-llama", "none", "cpu")
    peft_a = attach_lora(base.model, rank=4, seed=7)
    state_a = {k: v.clone() for k, v in lora_state(peft_a).items()}
    assert all(torch.count_nonzero(v) == 0 for k, v in state_a.items() if "lora_B" in k)
    assert all(torch.count_nonzero(v) > 0 for k, v in state_a.items() if "lora_A" in k)
    assert len(state_a) == 2 * 3 * 2  # A and B for q, k, v in 2 layers
    base2 = Base.load("tiny-llama", "none", "cpu")
    peft_b = attach_lora(base2.model, rank=4, seed=7)
    for k, v in lora_state(peft_b).items():
        assert torch.equal(v, state_a[k])
    cfg = peft_a.peft_config["default"]
    assert cfg.r == 4 and cfg.lora_alpha == 32


def test_answer_logits_match_full_forward(tiny_base):
    items = [Encoded("a", "t", [5, 6, 7, 8, 9], 0, 1), Encoded("b", "t", [10, 11, 12], 1, 2)]
    batch = collate(items)
    got = answer_logits(tiny_base.model, batch)
    for row, it in enumerate(items):
        ids = torch.tensor([it.input_ids])
        ref = tiny_base.model(input_ids=ids).logits[0, -1]
        torch.testing.assert_close(got[row], ref, atol=1e-5, rtol=1e-5)
