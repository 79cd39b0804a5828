"""The Stage-1 CLI contract (typer CliRunner, tiny-llama) and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli.main import app

runner = CliRunner()
TINY = ["--model", "tiny-llama", "--max-train", "8", "--max-val", "6", "--dim", "16", "--device", "cpu"]


def _invoke(args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def aff_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = _invoke(["affinity", *TINY, "--tasks", "cb,rte,sst2", "--seed", "1", "--subset-size", "2", "--out", out])
    assert result.exit_code == 0, result.output
    return out


def test_affinity_contract(aff_dir):
    doc = json.loads((aff_dir / "affinity.json").read_text())
    assert {"tasks", "metric", "matrix", "subsets"} <= set(doc)
    assert doc["tasks"] == ["cb", "rte", "sst2"] and doc["seed"] == 1 and doc["dim"] == 16
    assert len(doc["matrix"]) == 3 and all(len(r) == 3 for r in doc["matrix"])
    assert (aff_dir / "affinity.png").exists()
    assert (aff_dir / "subset_results.csv").exists() and (aff_dir / "subset_results.json").exists()
    assert not list(aff_dir.parent.glob(".*partial*"))  # the work folder was published and removed


def test_group_contract(aff_dir):
    result = _invoke(["group", "--affinity", aff_dir / "affinity.json", "--groups", "2", "--out", aff_dir])
    assert result.exit_code == 0, result.output
    doc = json.loads((aff_dir / "groups.json").read_text())
    assert len(doc["groups"]) == 2 and all(doc["groups"]) and doc["method"] in ("sdp", "spectral")
    assert sorted(t for g in doc["groups"] for t in g) == ["cb", "rte", "sst2"]
    result = _invoke(["group", "--affinity", aff_dir / "affinity.json", "--groups", "auto", "--out", aff_dir / "g"])
    assert result.exit_code == 0, result.output
    auto = json.loads((aff_dir / "g" / "groups.json").read_text())
    assert 1 <= len(auto["groups"]) <= 3 and "m_rule" in auto["details"]


def test_unknown_task_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "x"
    result = _invoke(["affinity", *TINY, "--tasks", "cb,nosuchtask", "--out", out])
    assert result.exit_code == 2
    assert "nosuchtask" in result.output
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_option_values_name_the_flag(tmp_path):
    result = _invoke(["affinity", "--model", "tiny-llama", "--tasks", "cb,rte", "--dim", "0", "--out", tmp_path / "y"])
    assert result.exit_code == 2 and "--dim" in result.output
    result = _invoke(["affinity", "--model", "tiny-llama", "--tasks", "cb", "--out", tmp_path / "y"])
    assert result.exit_code == 2 and "--tasks" in result.output
    result = _invoke(["affinity", "--model", "no-such-model", "--tasks", "cb,rte", "--out", tmp_path / "y"])
    assert result.exit_code == 2 and "no-such-model" in result.output
    assert not list(tmp_path.iterdir())


def test_group_rejects_too_many_groups(aff_dir, tmp_path):
    result = _invoke(["group", "--affinity", aff_dir / "affinity.json", "--groups", "4", "--out", tmp_path])
    assert result.exit_code == 2 and "4 groups" in result.output and "3 tasks" in result.output
    result = _invoke(["group", "--affinity", aff_dir / "affinity.json", "--groups", "two", "--out", tmp_path])
    assert result.exit_code == 2 and "--groups" in result.output
    assert not (tmp_path / "groups.json").exists()


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ('{"tasks": ["a", "b"]}', "'matrix'"),
    ('{"tasks": ["a", "b"], "matrix": [[1, 2], [3]]}', "2 x 2"),
    ('{"tasks": ["a", "b"], "matrix": [[1, "x"], [3, 4]]}', "non-numeric"),
    ('[1, 2]', "JSON object"),
])
def test_group_rejects_malformed_affinity(tmp_path, content, needle):
    path = tmp_path / "affinity.json"
    path.write_text(content)
    result = _invoke(["group", "--affinity", path, "--groups", "2", "--out", tmp_path / "out"])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "--affinity" in result.output
    assert not (tmp_path / "out").exists()


def test_group_missing_file(tmp_path):
    result = _invoke(["group", "--affinity", tmp_path / "nope.json", "--groups", "auto"])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_approx_error_prints_mean_and_median_per_scale(tmp_path):
    result = _invoke(["approx-error", *TINY, "--tasks", "cb,rte", "--scales", "0.02,0.05", "--directions", "1", "--json"])
    assert result.exit_code == 0, result.output
    per_scale = json.loads(result.stdout)
    assert [s["scale"] for s in per_scale] == [0.02, 0.05]
    for s in per_scale:
        assert 0 <= s["median_rel_error"] and 0 <= s["mean_rel_error"] and s["examples"] == 12
    # the first-order term helps: smaller error than f0 alone, and error grows with the scale
    assert per_scale[0]["mean_rel_error"] < per_scale[0]["zeroth_order_mean_rel_error"]
    assert per_scale[0]["mean_rel_error"] <= per_scale[1]["mean_rel_error"]
    bad = _invoke(["approx-error", *TINY, "--tasks", "cb,rte", "--scales", "0.1,abc"])
    assert bad.exit_code == 2 and "--scales" in bad.output


def test_validate_estimates_prints_the_comparison(tmp_path):
    out = tmp_path / "val"
    result = _invoke(["validate-estimates", *TINY, "--tasks", "cb,rte", "--subsets", "1", "--epochs", "1",
                      "--lams", "0.01", "--outputs", "vocab", "--step-scales", "2", "--init", "base", "--out", out])
    assert result.exit_code == 0, result.output
    assert "compute ratio" in result.output and "cb" in result.output
    doc = json.loads((out / "validate.json").read_text())
    assert len(doc["rows"]) == 2 and doc["compute_ratio"] > 0
    assert {"est_loss", "true_loss", "rel_err_loss", "est_accuracy", "true_accuracy", "rel_err_accuracy"} <= set(doc["rows"][0])
    assert set(doc["per_lambda"]) == {"0.001", "0.01"}
    assert set(doc["per_backmap"]) == {"sketch", "representer"}
    # every (output, back-map, lambda, step) combination is reported; the choice run has its own gradients
    combos = {(v["output"], v["backmap"], v["lam"], v["step"]) for v in doc["per_variant"]}
    assert len(combos) == 2 * 2 * 2 * 2
    assert (out / "output-vocab" / "grads_train.npy").exists()
    by = {(v["output"], v["backmap"], v["lam"], v["step"]): v for v in doc["per_variant"]}
    assert by[("choice", "sketch", 0.001, 1.0)]["mean_est_accuracy"] == doc["per_lambda"]["0.001"]["mean_est_accuracy"]
    assert doc["theta0"]["init"] == "base" and set(doc["theta0"]["val_accuracy"]) == {"cb", "rte"}
    assert 0 <= doc["linear_proxy"]["mean_est_accuracy"] <= 1 and doc["linear_proxy"]["compute_ratio"] > 0
    assert doc["linear_proxy"]["compute_ratio_amortised"] > 0 and doc["theta0"]["no_change_rel_err_accuracy"] >= 0


def test_validate_estimates_from_a_meta_initialisation(tmp_path):
    out = tmp_path / "val"
    result = _invoke(["validate-estimates", *TINY, "--tasks", "cb,rte", "--subsets", "1", "--epochs", "1",
                      "--meta-epochs", "1", "--no-compare-backmaps", "--out", out])  # init=meta is the default
    assert result.exit_code == 0, result.output
    assert "theta0 = meta" in result.output and "counting the meta-initialisation" in result.output
    doc = json.loads((out / "validate.json").read_text())
    assert doc["theta0"]["init"] == "meta" and doc["theta0"]["steps"] > 0
    assert 0 < doc["compute_ratio_with_init"] < doc["compute_ratio"]
    assert 0 < doc["compute_ratio_amortised_with_init"] < doc["compute_ratio_amortised"]
    bad = _invoke(["validate-estimates", *TINY, "--tasks", "cb,rte", "--init", "warm"])
    assert bad.exit_code == 2 and "--init" in bad.output
