"""Ensemble manifest (fingerprint, validation) and the reference ensemble scorer (zero weights never run)."""

from __future__ import annotations

import json

import pytest
import torch

from shared.ml.data import subsample
from shared.ml.encoding import bind
from shared.ml.evaluate import score_task
from shared.ml.models import Base, lora_config
from shared.ml.tasks.registry import get_task
from shared.ml.training import ensemble as ens
from shared.ml.training.adapters import save_adapter_state
from shared.ml.training.ensemble import (
    AdapterPool,
    EnsembleManifest,
    Member,
    TaskWeights,
    combine,
    compute_fingerprint,
    default_weights,
    ensemble_choice_logits,
    fit_weights,
    load_manifest,
    member_choice_logits,
    write_manifest,
)
from shared.ml.training.trainer import peft_config_dict, temporary_adapter

TARGETS = ("q_proj", "k_proj", "v_proj")


def _random_state(base: Base, seed: int) -> dict[str, torch.Tensor]:
    from shared.ml.training.trainer import extract_state

    with temporary_adapter(base, "tmp", 4, 32.0, TARGETS, 0.0, seed) as model:
        gen = torch.Generator().manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data = torch.randn(p.shape, generator=gen) * 0.3
        return extract_state(model, "tmp")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = Base.load("tiny-llama", "none", "cpu")
    root = tmp_path_factory.mktemp("ens")
    config = peft_config_dict(lora_config(4, 32.0, TARGETS))
    states, members = {}, []
    for i, name in enumerate(["g0", "g1", "g0_boost1"]):
        states[name] = _random_state(base, 10 + i)
        meta = save_adapter_state(
            states[name],
            config,
            root / "adapters" / name,
            {
                "name": name,
                **base.info.identity(),
                "tasks": ["sst2"],
                "rank": 4,
                "alpha": 32.0,
                "targets": list(TARGETS),
            },
        )
        members.append(
            Member(
                name=name,
                path=f"adapters/{name}",
                sha256=meta.sha256,
                role="booster" if "boost" in name else "group",
                tasks=["sst2", "cr"],
            )
        )
    members.append(Member(name="base", path=None, sha256=None, role="base", tasks=[]))
    manifest = EnsembleManifest(
        name="t",
        version=1,
        base=base.info.identity(),
        max_length=64,
        members=members,
        tasks={
            "sst2": TaskWeights(weights={"g0": 1.0, "g1": 0.0, "g0_boost1": 0.5, "base": -0.5}),
            "cr": TaskWeights(weights={"g0": 0.0, "g1": 1.0, "g0_boost1": 0.0, "base": 0.0}),
        },
    )
    manifest = write_manifest(manifest, root / "ensemble.json")
    examples = subsample(get_task("sst2").split("test"), 10, 0)
    return base, root, manifest, states, examples


def test_fingerprint_is_stable_canonical_and_weight_sensitive(setup):
    _, root, manifest, _, _ = setup
    raw = json.loads((root / "ensemble.json").read_text())
    assert raw["fingerprint"] == compute_fingerprint(raw) == manifest.fingerprint
    assert compute_fingerprint(manifest) == manifest.fingerprint
    reordered = dict(reversed(list(raw.items())))
    assert compute_fingerprint(reordered) == manifest.fingerprint  # key order does not matter
    loaded = load_manifest(root / "ensemble.json")
    assert loaded == manifest
    changed = json.loads(json.dumps(raw))
    changed["tasks"]["sst2"]["weights"]["g0_boost1"] = 0.25
    assert compute_fingerprint(changed) != manifest.fingerprint
    assert raw["format"] == "chorus.ensemble/v1"
    assert set(raw) == {"format", "name", "version", "base", "max_length", "members", "tasks", "fingerprint"}


def test_a_modified_manifest_is_refused(setup, tmp_path):
    _, root, _, _, _ = setup
    raw = json.loads((root / "ensemble.json").read_text())
    raw["tasks"]["sst2"]["weights"]["g0"] = 2.0
    (tmp_path / "ensemble.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="fingerprint"):
        load_manifest(tmp_path / "ensemble.json")


def test_manifest_validation(setup):
    base = setup[0]
    ok = dict(
        name="x",
        base=base.info.identity(),
        members=[{"name": "a", "path": "adapters/a", "sha256": "0" * 64, "role": "group"}],
        tasks={"sst2": {"weights": {"a": 1.0}}},
    )
    EnsembleManifest.model_validate(ok)
    for bad, match in [
        ({"members": [{"name": "a", "path": "../a", "sha256": "0" * 64, "role": "group"}]}, "relative"),
        ({"members": [{"name": "a", "path": "/abs/a", "sha256": "0" * 64, "role": "group"}]}, "relative"),
        ({"members": [{"name": "a", "path": "adapters/a", "sha256": None, "role": "group"}]}, "sha256"),
        ({"members": [{"name": "base", "path": "x", "sha256": None, "role": "base"}]}, "path null"),
        ({"tasks": {"sst2": {"weights": {"zz": 1.0}}}}, "unknown member"),
        ({"tasks": {"sst2": {"weights": {"a": 0.0}}}}, "every weight is 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            EnsembleManifest.model_validate({**ok, **bad})


def test_default_weights():
    w = default_weights(
        [("g0", ["a", "b"]), ("g1", ["c"])], {"g0": ["g0_b1", "g0_b2"]}, 0.5, ["g0", "g1", "g0_b1", "g0_b2", "base"]
    )
    assert w["a"] == {"g0": 1.0, "g1": 0.0, "g0_b1": 0.5, "g0_b2": 0.5, "base": -1.0}
    assert w["c"] == {"g0": 0.0, "g1": 1.0, "g0_b1": 0.0, "g0_b2": 0.0, "base": 0.0}


def test_reference_scorer_combines_members_and_never_runs_zero_weights(setup, monkeypatch):
    base, root, manifest, states, examples = setup
    loaded: list[str] = []
    real_load = ens.load_adapter_state

    def spy(folder, expected=None, sha256=None):
        loaded.append(folder.name)
        return real_load(folder, expected, sha256)

    monkeypatch.setattr(ens, "load_adapter_state", spy)
    calls: list[str] = []
    decoder = base.model.get_decoder()
    handle = decoder.register_forward_hook(lambda *a: calls.append("fwd"))
    try:
        pool = AdapterPool(base)
        zs = member_choice_logits(base, manifest, root, "sst2", examples, batch_size=4, pool=pool)
        logits = ensemble_choice_logits(base, manifest, root, "sst2", examples, batch_size=4, pool=pool)
        pool.close()
    finally:
        handle.remove()
    assert set(zs) == {"g0", "g0_boost1", "base"}  # g1 has weight 0 for sst2
    assert "g1" not in loaded and sorted(set(loaded)) == ["g0", "g0_boost1"]
    n_batches = 3  # 10 examples, batch size 4
    assert len(calls) == 2 * 3 * n_batches  # two calls x three non-zero members, nothing for g1
    expected = 1.0 * zs["g0"] + 0.5 * zs["g0_boost1"] - 0.5 * zs["base"]
    torch.testing.assert_close(logits, expected)
    # member logits match an independent path: the adapter state attached directly
    bound = bind(get_task("sst2"), base.tokenizer)
    with temporary_adapter(base, "direct", 4, 32.0, TARGETS, 0.0, 0, states["g0"]) as model:
        direct = score_task(model, base.tokenizer, bound, examples, 4, 64).choice_logits
    torch.testing.assert_close(zs["g0"], direct, atol=1e-5, rtol=1e-5)
    plain = score_task(base.model, base.tokenizer, bound, examples, 4, 64).choice_logits
    torch.testing.assert_close(zs["base"], plain, atol=1e-5, rtol=1e-5)
    assert float((zs["g0"] - zs["base"]).abs().max()) > 1e-3
    from peft import PeftModel

    assert not isinstance(base.model, PeftModel)  # the pool cleaned up


def test_ensemble_on_another_base_is_refused(setup):
    _, root, manifest, _, examples = setup
    other = Base.load("tiny-llama-seed1", "none", "cpu")
    from shared.ml.training.adapters import AdapterMismatchError

    with pytest.raises(AdapterMismatchError):
        ensemble_choice_logits(other, manifest, root, "sst2", examples)


def test_combine_skips_zero_weights():
    z = {"a": torch.ones(2, 2), "b": torch.full((2, 2), float("nan"))}
    torch.testing.assert_close(combine({"a": 2.0, "b": 0.0}, z), torch.full((2, 2), 2.0))


def test_fit_weights_is_non_negative_and_prefers_the_informative_member():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=gen)
    good = torch.nn.functional.one_hot(y, 2).float() * 2.0 + 0.5 * torch.randn(200, 2, generator=gen)
    bad = -good  # anti-correlated: its weight must go to 0 (not negative)
    noise = torch.randn(200, 2, generator=gen)
    w = fit_weights({"good": good, "bad": bad, "noise": noise}, y, {"good": 1.0, "bad": 0.0, "noise": 0.0}, l2=0.0)
    assert all(v >= 0 for v in w.values())
    assert w["good"] > 0.5 and w["bad"] == 0.0
