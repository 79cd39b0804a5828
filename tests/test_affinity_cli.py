"""The Stage-1 CLI contract (typer CliRunner, tiny-llama) and its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from services.cli.main import app
from tests.recompute import mean_defined, read_rows, rel_err, solve_logistic

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


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ('{"tasks": ["a", "b"]}', "'matrix'"),
        ('{"tasks": ["a", "b"], "matrix": [[1, 2], [3]]}', "2 x 2"),
        ('{"tasks": ["a", "b"], "matrix": [[1, "x"], [3, 4]]}', "non-numeric"),
        ("[1, 2]", "JSON object"),
    ],
)
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
    result = _invoke(
        [
            "approx-error",
            *TINY,
            "--tasks",
            "cb,rte",
            "--scales",
            "0.02,0.05",
            "--directions",
            "1",
            "--json",
            "--out",
            tmp_path / "ae",
        ]
    )
    assert result.exit_code == 0, result.output
    per_scale = json.loads(result.stdout)
    assert [s["scale"] for s in per_scale] == [0.02, 0.05]
    # every summary recomputed from the per-example rows of approx_error.csv: error = |f_lin - f_true| / max(|f_true|,
    # |f0|), and the zeroth-order error |f0 - f_true| / the same
    rows = read_rows(tmp_path / "ae" / "approx_error.csv")
    for s in per_scale:
        mine = [r for r in rows if float(r["scale"]) == s["scale"]]
        f0, lin, true = (np.array([float(r[k]) for r in mine]) for k in ("f0", "f_linear", "f_true"))
        denom = np.maximum(np.abs(true), np.abs(f0))
        rel, rel0 = np.abs(lin - true) / denom, np.abs(f0 - true) / denom
        assert s["examples"] == len(mine) == 12
        assert [float(r["rel_error"]) for r in mine] == pytest.approx(list(rel), rel=1e-5)
        assert s["mean_rel_error"] == pytest.approx(rel.mean(), rel=1e-5)
        assert s["median_rel_error"] == pytest.approx(
            np.sort(rel)[(len(rel) - 1) // 2], rel=1e-5
        )  # torch: lower median
        assert s["mean_sq_rel_error"] == pytest.approx((rel**2).mean(), rel=1e-5)
        assert s["zeroth_order_mean_rel_error"] == pytest.approx(rel0.mean(), rel=1e-5)
    # the first-order term helps: smaller error than f0 alone, and error grows with the scale
    assert per_scale[0]["mean_rel_error"] < per_scale[0]["zeroth_order_mean_rel_error"]
    assert per_scale[0]["mean_rel_error"] <= per_scale[1]["mean_rel_error"]
    bad = _invoke(["approx-error", *TINY, "--tasks", "cb,rte", "--scales", "0.1,abc"])
    assert bad.exit_code == 2 and "--scales" in bad.output


def test_validate_estimates_prints_the_comparison(tmp_path):
    out = tmp_path / "val"
    result = _invoke(
        [
            "validate-estimates",
            *TINY,
            "--tasks",
            "cb,rte",
            "--subsets",
            "1",
            "--epochs",
            "1",
            "--lams",
            "0.01",
            "--outputs",
            "vocab",
            "--step-scales",
            "2",
            "--init",
            "base",
            "--out",
            out,
        ]
    )
    assert result.exit_code == 0, result.output
    assert "compute ratio" in result.output and "cb" in result.output
    doc = json.loads((out / "validate.json").read_text())
    assert len(doc["rows"]) == 2
    assert {"est_loss", "true_loss", "rel_err_loss", "est_accuracy", "true_accuracy", "rel_err_accuracy"} <= set(
        doc["rows"][0]
    )
    _check_validate_figures(doc, out, result.output)
    assert set(doc["per_lambda"]) == {"0.001", "0.01"}
    assert set(doc["per_backmap"]) == {"sketch", "representer"}
    # every (output, back-map, lambda, step) combination is reported; the choice run has its own gradients
    combos = {(v["output"], v["backmap"], v["lam"], v["step"]) for v in doc["per_variant"]}
    assert len(combos) == 2 * 2 * 2 * 2
    assert (out / "output-vocab" / "grads_train.npy").exists()
    assert doc["theta0"]["init"] == "base" and set(doc["theta0"]["val_accuracy"]) == {"cb", "rte"}
    assert doc["theta0"]["seconds"] == 0.0 and doc["compute_ratio_with_init"] == doc["compute_ratio"]


def _ratio_within_rounding(value: float, num: float, den: float, half: float = 5e-4) -> bool:
    """value = num / den, where num and den were written rounded to 3 decimals."""
    return (num - half) / (den + half) - 1e-9 <= value <= (num + half) / (den - half) + 1e-9


def _check_validate_figures(doc: dict, out: Path, output: str) -> None:
    """validate-estimates' figures recomputed from its rows and saved files: relative errors and their means (main
    variant, per lambda), the no-change baseline, the compute ratios from the recorded seconds (the amortised ones
    spread the gradient pass over every subset a full run samples, scaled to all the tasks' training rows), and the
    linear proxy re-solved (scipy) from grads_train.npy and re-evaluated on grads_val.npy / f0_val.npy."""
    from shared.ml.data import subsample
    from shared.ml.tasks.registry import get_task

    rows = doc["rows"]
    for r in rows:
        assert r["rel_err_loss"] == (
            None if r["true_loss"] == 0 else pytest.approx(rel_err(r["est_loss"], r["true_loss"]))
        )
        assert r["rel_err_accuracy"] == (
            None if r["true_accuracy"] == 0 else pytest.approx(rel_err(r["est_accuracy"], r["true_accuracy"]))
        )
    main = {
        "mean_rel_err_loss": mean_defined(rel_err(r["est_loss"], r["true_loss"]) for r in rows),
        "mean_rel_err_accuracy": mean_defined(rel_err(r["est_accuracy"], r["true_accuracy"]) for r in rows),
        "mean_est_accuracy": float(np.mean([r["est_accuracy"] for r in rows])),
        "mean_true_accuracy": float(np.mean([r["true_accuracy"] for r in rows])),
    }
    lam_key = f"{doc['lam']:g}"
    by = {(v["output"], v["backmap"], v["lam"], v["step"]): v for v in doc["per_variant"]}
    for key, value in main.items():
        if value is None:
            assert doc.get(key) is None and doc["per_lambda"][lam_key][key] is None
            continue
        if key in doc:
            assert doc[key] == pytest.approx(value, rel=1e-9), key
        assert doc["per_lambda"][lam_key][key] == pytest.approx(value, rel=1e-9), key
        assert by[(doc["output"], doc["backmap"], doc["lam"], 1.0)][key] == pytest.approx(value, rel=1e-9), key
    assert f"mean relative error: loss {100 * main['mean_rel_err_loss']:.2f}%" in output
    theta0 = doc["theta0"]
    no_change = mean_defined(rel_err(theta0["val_accuracy"][r["task"]], r["true_accuracy"]) for r in rows)
    assert theta0["no_change_rel_err_accuracy"] == (None if no_change is None else pytest.approx(no_change, rel=1e-9))
    # the rows: the subsets' tasks (the gradient pass covers only them) and all the tasks (a full run)
    params = json.loads((out / "params.json").read_text())
    used = [t for t in params["tasks"] if any(t in s for s in doc["subsets"])]
    n_rows = {
        (t, split): len(subsample(get_task(t).split(split), params[f"max_{split}"], params["seed"]))
        for t in params["tasks"]
        for split in ("train", "val")
    }
    n_used, n_all = sum(n_rows[t, "train"] for t in used), sum(n_rows[t, "train"] for t in params["tasks"])
    # compute ratios: fine-tune seconds over estimation seconds
    ft, est, grad, sub = (
        doc[k] for k in ("finetune_seconds", "estimation_seconds", "gradient_seconds", "solve_and_forward_seconds")
    )
    k, full, init = len(doc["subsets"]), doc["amortised_over_subsets"], theta0["seconds"]
    assert _ratio_within_rounding(doc["compute_ratio"], ft, est)
    per_subset = grad * n_all / n_used / full + sub / k
    assert _ratio_within_rounding(doc["compute_ratio_amortised"], ft / k, per_subset, half=2e-3)
    assert _ratio_within_rounding(doc["compute_ratio_with_init"], ft, est + init, half=1e-3)
    assert _ratio_within_rounding(doc["compute_ratio_amortised_with_init"], ft / k, per_subset + init / full, half=3e-3)
    lin = doc["linear_proxy"]
    assert _ratio_within_rounding(lin["compute_ratio"], ft, lin["seconds"])
    # the linear proxy: w from the training gradients, z = f0 + G w on each task's validation rows
    G, f0 = np.load(out / "grads_train.npy"), np.load(out / "f0_train.npy")
    Gv, fv = np.load(out / "grads_val.npy"), np.load(out / "f0_val.npy")
    assert (len(f0), len(fv)) == (n_used, sum(n_rows[t, "val"] for t in used))
    lam = params["lam"] * float(np.mean((G.astype(np.float64) ** 2).sum(1)))
    assert doc["lam_effective"] == pytest.approx(lam, rel=1e-6) and lin["lam_effective"] == pytest.approx(lam, rel=1e-6)
    train_of = np.repeat(used, [n_rows[t, "train"] for t in used])
    val_of = np.repeat(used, [n_rows[t, "val"] for t in used])
    est_acc = {}
    for j, subset in enumerate(doc["subsets"]):
        w = solve_logistic(G[np.isin(train_of, subset)], f0[np.isin(train_of, subset)], lam)
        for t in subset:
            z = fv[val_of == t].astype(np.float64) + Gv[val_of == t].astype(np.float64) @ w
            assert np.abs(z).min() > 1e-4  # no row sits on the decision boundary, where solver noise could flip it
            est_acc[j, t] = float(np.mean(z > 0))
    assert lin["mean_est_accuracy"] == pytest.approx(
        np.mean([est_acc[r["subset"], r["task"]] for r in rows]), abs=1e-12
    )
    lin_err = mean_defined(rel_err(est_acc[r["subset"], r["task"]], r["true_accuracy"]) for r in rows)
    assert lin["mean_rel_err_accuracy"] == (None if lin_err is None else pytest.approx(lin_err, rel=1e-9))


def test_validate_estimates_from_a_meta_initialisation(tmp_path):
    out = tmp_path / "val"
    # 3 tasks, one sampled subset of 2: the amortised ratios spread the gradient pass over a full run's 3 subsets
    result = _invoke(
        [
            "validate-estimates",
            *TINY,
            "--tasks",
            "cb,rte,sst2",
            "--subsets",
            "1",
            "--epochs",
            "1",
            "--meta-epochs",
            "1",
            "--no-compare-backmaps",
            "--out",
            out,
        ]
    )  # init=meta is the default
    assert result.exit_code == 0, result.output
    assert "theta0 = meta" in result.output and "counting the meta-initialisation" in result.output
    doc = json.loads((out / "validate.json").read_text())
    theta0 = doc["theta0"]
    # the meta fine-tune: one epoch over the 24 training rows at its batch size (32): one step
    assert (theta0["init"], theta0["epochs"], theta0["rows"], theta0["steps"]) == ("meta", 1, 24, 1)
    assert theta0["seconds"] > 0 and len(doc["subsets"]) == 1 and doc["amortised_over_subsets"] == 3
    _check_validate_figures(doc, out, result.output)  # the *_with_init ratios count the meta fine-tune's seconds
    bad = _invoke(["validate-estimates", *TINY, "--tasks", "cb,rte", "--init", "warm"])
    assert bad.exit_code == 2 and "--init" in bad.output
