"""Adapter folders: PEFT format + chorus metadata, sha256 and base checks, no pickle."""

from __future__ import annotations

import json

import pytest
import torch

from shared.ml.encoding import Encoded, collate
from shared.ml.models import Base, answer_logits, attach_lora
from shared.ml.training.adapters import (
    CONFIG_FILE,
    META_FILE,
    WEIGHTS_FILE,
    AdapterFormatError,
    AdapterIntegrityError,
    AdapterMismatchError,
    load_adapter_state,
    save_adapter,
)
from shared.ml.training.trainer import extract_state, temporary_adapter

TARGETS = ("q_proj", "k_proj", "v_proj")


def _meta(base: Base, name: str = "g0") -> dict:
    return {
        "name": name,
        **base.info.identity(),
        "tasks": ["cb", "rte"],
        "seed": 3,
        "rank": 4,
        "alpha": 32.0,
        "targets": list(TARGETS),
        "hyperparameters": {"lr": 1e-3},
        "val_metrics": {"cb": {"accuracy": 0.5}},
    }


@pytest.fixture()
def saved(tmp_path):
    """A LoRA with non-zero B saved from a live PeftModel on a fresh tiny base; returns (folder, state, base)."""
    base = Base.load("tiny-llama", "none", "cpu")
    model = attach_lora(base.model, rank=4, seed=3, adapter_name="g0")
    gen = torch.Generator().manual_seed(0)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=gen) * 0.2
    state = extract_state(model, "g0")
    folder = tmp_path / "adapters" / "g0"
    meta = save_adapter(model, "g0", folder, _meta(base))
    base.model = model.unload()
    return folder, state, base, meta


def test_round_trip_with_hash(saved):
    folder, state, base, meta = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, META_FILE])
    assert not any(p.name.startswith(".") for p in folder.parent.iterdir())  # no temp dirs left behind
    loaded, config, meta2 = load_adapter_state(folder, base.info)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    assert config["r"] == 4 and config["lora_alpha"] == 32 and sorted(config["target_modules"]) == sorted(TARGETS)
    on_disk = json.loads((folder / META_FILE).read_text())
    for key in (
        "name",
        "base_model",
        "base_revision",
        "quantization",
        "tasks",
        "seed",
        "rank",
        "alpha",
        "targets",
        "hyperparameters",
        "val_metrics",
        "sha256",
        "created_at",
    ):
        assert key in on_disk
    assert meta2.sha256 == meta.sha256 == on_disk["sha256"] and len(meta.sha256) == 64


def test_tampered_weights_are_refused(saved):
    folder, _, base, _ = saved
    raw = bytearray((folder / WEIGHTS_FILE).read_bytes())
    raw[-1] ^= 0x01
    (folder / WEIGHTS_FILE).write_bytes(bytes(raw))
    with pytest.raises(AdapterIntegrityError, match="sha256"):
        load_adapter_state(folder, base.info)


def test_expected_sha_from_a_manifest_must_match(saved):
    folder, _, base, _ = saved
    with pytest.raises(AdapterIntegrityError, match="expected"):
        load_adapter_state(folder, base.info, sha256="0" * 64)


def test_other_base_or_quantization_is_refused(saved):
    folder, _, _, _ = saved
    other = Base.load("tiny-llama-seed1", "none", "cpu")
    with pytest.raises(AdapterMismatchError, match="base_revision"):
        load_adapter_state(folder, other.info)
    nf4 = Base.load("tiny-llama", "nf4", "cpu")
    with pytest.raises(AdapterMismatchError, match="quantization"):
        load_adapter_state(folder, nf4.info)
    load_adapter_state(folder, None)  # no expectation: only integrity is checked


def test_pickle_weights_are_refused(saved):
    folder, _, base, _ = saved
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(AdapterFormatError, match="pickle"):
        load_adapter_state(folder, base.info)
    (folder / "adapter_model.bin").unlink()
    (folder / "extra.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(AdapterIntegrityError):
        load_adapter_state(folder, base.info)


def test_missing_files_are_reported(saved, tmp_path):
    folder, _, base, _ = saved
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(AdapterIntegrityError, match="missing"):
        load_adapter_state(folder, base.info)
    with pytest.raises(AdapterIntegrityError, match="does not exist"):
        load_adapter_state(tmp_path / "nope", base.info)


def test_peft_loads_the_folder_and_computes_the_same_logits(saved):
    from peft import PeftModel

    folder, state, base, _ = saved
    batch = collate([Encoded(str(i), "x", list(range(20, 40 + i)), 0, 5) for i in range(3)])
    with temporary_adapter(base, "ours", 4, 32.0, TARGETS, 0.0, 0, state) as model, torch.no_grad():
        ours = answer_logits(model, batch)
    fresh = Base.load("tiny-llama", "none", "cpu")
    with torch.no_grad():
        plain = answer_logits(fresh.model, batch)
        peft_model = PeftModel.from_pretrained(fresh.model, str(folder))
        theirs = answer_logits(peft_model, batch)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert float((theirs - plain).abs().max()) > 1e-3  # the adapter does change the output


def test_saving_again_replaces_atomically(saved):
    folder, state, base, meta = saved
    from shared.ml.training.adapters import save_adapter_state

    doubled = {k: v * 2 for k, v in state.items()}
    config = json.loads((folder / CONFIG_FILE).read_text())
    meta2 = save_adapter_state(doubled, config, folder, _meta(base))
    assert meta2.sha256 != meta.sha256
    loaded, _, _ = load_adapter_state(folder, base.info)
    assert all(torch.equal(loaded[k], doubled[k]) for k in state)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["g0"]
