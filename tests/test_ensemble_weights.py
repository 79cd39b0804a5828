"""The numeric parts of shared/ml/training/ensemble.py: member weight fitting, default weights, the combined
logits, and the manifest fingerprint with its check on load. No model is loaded."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from shared.ml.training.ensemble import (
    BaseIdentity,
    EnsembleManifest,
    Member,
    TaskWeights,
    canonical_json,
    combine,
    compute_fingerprint,
    default_weights,
    ensemble_probabilities,
    fit_weights,
    load_manifest,
    with_fingerprint,
    write_manifest,
)


def _manifest() -> EnsembleManifest:
    return EnsembleManifest(
        name="m",
        base=BaseIdentity(base_model="tiny-llama", base_revision="r1", quantization="none"),
        members=[
            Member(name="g0", path="adapters/g0", sha256="a" * 64, role="group", tasks=["sst2"]),
            Member(name="base", path=None, sha256=None, role="base"),
        ],
        tasks={"sst2": TaskWeights(weights={"g0": 1.5, "base": -0.5})},
    )


# -- fingerprint ----------------------------------------------------------------------------------------
def test_canonical_json_sorts_keys_without_spaces() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": 2.5, "c": None}]}) == '{"a":[1,{"c":null,"d":2.5}],"b":1}'


def test_fingerprint_is_the_sha256_of_the_content_without_its_own_key() -> None:
    manifest = _manifest()
    content = manifest.content()
    assert "fingerprint" not in content and content["tasks"] == {"sst2": {"weights": {"g0": 1.5, "base": -0.5}}}
    expected = hashlib.sha256(canonical_json(content).encode()).hexdigest()
    assert compute_fingerprint(manifest) == expected
    stamped = with_fingerprint(manifest)
    assert stamped.fingerprint == expected
    assert stamped.content() == content  # a recorded fingerprint is not part of the content
    assert compute_fingerprint(stamped) == expected


def test_write_manifest_writes_indented_json_with_its_fingerprint(tmp_path: Path) -> None:
    path = tmp_path / "ensemble.json"
    written = write_manifest(_manifest(), str(path))
    assert written.fingerprint == compute_fingerprint(_manifest())
    assert path.read_text() == json.dumps(written.model_dump(mode="json"), indent=2) + "\n"
    assert load_manifest(str(path)) == written


def test_load_manifest_refuses_unreadable_files_and_other_formats(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^cannot read ensemble manifest '.*missing\.json': "):
        load_manifest(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"^cannot read ensemble manifest '.*bad\.json': Expecting"):
        load_manifest(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"list\.json' is not a chorus\.ensemble/v1 manifest \(format=None\)$"):
        load_manifest(tmp_path / "list.json")
    data = write_manifest(_manifest(), tmp_path / "ok.json").model_dump(mode="json")
    (tmp_path / "other.json").write_text(json.dumps({**data, "format": "chorus.ensemble/v0"}))
    with pytest.raises(
        ValueError, match=r"other\.json' is not a chorus\.ensemble/v1 manifest \(format='chorus\.ensemble/v0'\)$"
    ):
        load_manifest(tmp_path / "other.json")


def test_load_manifest_checks_a_recorded_fingerprint_unless_told_not_to(tmp_path: Path) -> None:
    path = tmp_path / "ensemble.json"
    written = write_manifest(_manifest(), path)
    raw = json.loads(path.read_text())
    raw["tasks"]["sst2"]["weights"]["g0"] = 2.0
    path.write_text(json.dumps(raw))
    actual = compute_fingerprint(raw)
    assert written.fingerprint is not None
    message = (
        f"ensemble manifest '{path}': fingerprint {written.fingerprint[:16]}... does not match its content "
        f"({actual[:16]}...); the file was modified"
    )
    with pytest.raises(ValueError) as info:
        load_manifest(path)
    assert str(info.value) == message
    loaded = load_manifest(path, verify_fingerprint=False)
    assert loaded.tasks["sst2"].weights["g0"] == 2.0 and loaded.fingerprint == written.fingerprint
    raw.pop("fingerprint")
    path.write_text(json.dumps(raw))
    assert load_manifest(path).fingerprint is None  # nothing recorded, nothing to check


# -- default weights and the combined logits ------------------------------------------------------------
def test_default_weights_give_each_group_its_boosters_over_the_base() -> None:
    w = default_weights(
        [("g0", ["a"]), ("g1", ["b"])],
        {"g0": ["g0_b1", "g0_b2", "g0_b3"]},
        0.25,
        ["g0", "g1", "g0_b1", "g0_b2", "g0_b3", "bare"],
        "bare",
    )
    assert w == {
        "a": {"g0": 1.0, "g1": 0.0, "g0_b1": 0.25, "g0_b2": 0.25, "g0_b3": 0.25, "bare": -0.75},
        "b": {"g0": 0.0, "g1": 1.0, "g0_b1": 0.0, "g0_b2": 0.0, "g0_b3": 0.0, "bare": 0.0},
    }
    assert all(type(v) is float for row in w.values() for v in row.values())


def test_combine_sums_every_weighted_member_after_a_zero_weight() -> None:
    z = {"a": torch.full((1, 2), 1.0), "b": torch.full((1, 2), float("nan")), "c": torch.tensor([[1.0, 2.0]])}
    out = combine({"b": 0.0, "a": 2.0, "c": -3.0}, z)
    torch.testing.assert_close(out, torch.tensor([[-1.0, -4.0]]))
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="^every weight is 0$"):
        combine({"a": 0.0}, z)


# -- weight fitting -------------------------------------------------------------------------------------
def _separable(scale: float = 1.0, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(n) % 2
    return (torch.nn.functional.one_hot(y, 2).double() * 2.0 - 1.0) * scale, y


def test_fit_weights_without_signal_keeps_init_clipped_rounded_and_thresholded() -> None:
    zero = torch.zeros(6, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    terms = {"a": zero, "b": zero, "c": zero, "d": zero, "e": zero}
    # the loss does not depend on the coefficients, so L-BFGS-B stays at init (moved into the bounds)
    w = fit_weights(terms, y, {"a": 0.123456789, "b": 0.0005, "c": 12.0, "e": 0.001})
    assert w == {"a": 0.123457, "b": 0.0, "c": 10.0, "d": 0.0, "e": 0.001}  # exactly min_weight is kept
    assert fit_weights(terms, y, {"a": 1.0, "b": 5.0}, max_weight=3.0, min_weight=2.0) == {
        "a": 0.0,
        "b": 3.0,
        "c": 0.0,
        "d": 0.0,
        "e": 0.0,
    }


def test_fit_weights_on_separable_data_reaches_the_bound_without_l2() -> None:
    good, y = _separable(0.05)  # a small margin: the loss still falls at the bound
    assert fit_weights({"good": good}, y, {"good": 1.0}, l2=0.0) == {"good": 10.0}
    assert fit_weights({"good": good}, y, {"good": 0.1}, l2=0.0, max_weight=0.5) == {"good": 0.5}


def test_fit_weights_minimises_cross_entropy_plus_the_default_l2_to_init() -> None:
    good, y = _separable()
    z = good.numpy()
    rows = np.arange(len(y))

    def objective(c: float) -> float:
        logits = c * z
        m = logits.max(axis=1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        return float(-logp[rows, y.numpy()].mean() + 0.01 * (c - 2.0) ** 2)

    best = minimize_scalar(objective, bounds=(0.0, 10.0), method="bounded", options={"xatol": 1e-9}).x
    assert 2.0 < best < 9.0
    assert fit_weights({"good": good}, y, {"good": 2.0})["good"] == pytest.approx(best, abs=1e-3)


def test_fit_weights_l2_pulls_towards_init_and_drops_anti_informative_terms() -> None:
    good, y = _separable()
    w = fit_weights({"good": good, "other": torch.zeros_like(good)}, y, {"good": 2.0}, l2=100.0)
    assert w["good"] == pytest.approx(2.0, abs=2e-3) and w["good"] > 2.0
    assert w["other"] == 0.0
    # every coefficient at 0: the fit is degenerate and the initial weights are kept
    assert fit_weights({"bad": -good}, y, {"bad": 0.7}, l2=0.0) == {"bad": 0.7}


def test_fit_weights_runs_l_bfgs_b_for_at_most_500_iterations(monkeypatch: pytest.MonkeyPatch) -> None:
    import scipy.optimize

    calls: list[dict[str, Any]] = []
    real = scipy.optimize.minimize

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(scipy.optimize, "minimize", spy)
    good, y = _separable()
    fit_weights({"good": good, "other": -good}, y, {"good": 1.0}, max_weight=4.0)
    assert [(c["method"], c["options"], c["bounds"], c["jac"]) for c in calls] == [
        ("L-BFGS-B", {"maxiter": 500}, [(0.0, 4.0), (0.0, 4.0)], True)
    ]


# -- the weights a task runs with -----------------------------------------------------------------------
def test_a_task_runs_only_its_members_with_non_zero_weight_in_manifest_order() -> None:
    manifest = _manifest().model_copy(
        update={
            "tasks": {"sst2": TaskWeights(weights={"base": -0.5, "g0": 0.0}), "rte": TaskWeights(weights={"g0": 1.0})}
        }
    )
    assert manifest.active_members("sst2") == ["base"]
    assert manifest.active_members("rte") == ["g0"]  # a member without a weight for the task does not run
    weights = manifest.task_weights("sst2")
    assert weights == {"base": -0.5, "g0": 0.0}
    weights["g0"] = 9.0  # a copy: the manifest is not changed through it
    assert manifest.task_weights("sst2")["g0"] == 0.0
    with pytest.raises(KeyError, match=r"task 'boolq' is not served by ensemble 'm' \(tasks: \['rte', 'sst2'\]\)"):
        manifest.task_weights("boolq")
    assert manifest.member("base").role == "base"
    with pytest.raises(KeyError, match="^'nope'$"):
        manifest.member("nope")


def test_ensemble_probabilities_are_a_float_softmax_over_the_choices() -> None:
    logits = torch.tensor([[0.0, float(np.log(3.0))], [2.0, 2.0]], dtype=torch.float16)
    probs = ensemble_probabilities(logits)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, torch.tensor([[0.25, 0.75], [0.5, 0.5]]), atol=1e-3, rtol=0)
