"""The study: paired statistics, random groups, the structure test, the validation fallback, and
`chorus study` end to end on tiny-llama (every headline figure recomputed from the saved predictions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from services.cli.main import app
from shared.ml.affinity import structure
from shared.ml.affinity.structure import concentration, structure_test
from shared.ml.study.run import random_groups
from shared.ml.study.stats import hierarchical_bootstrap, macro_accuracy, mcnemar

runner = CliRunner()


def _arm(
    rng: np.random.Generator, p: float, seeds: int = 3, tasks: int = 4, rows: int = 200
) -> list[dict[str, np.ndarray]]:
    return [{f"t{k}": rng.random(rows) < p for k in range(tasks)} for _ in range(seeds)]


def test_bootstrap_difference_is_the_paired_mean_and_its_ci_covers_it():
    rng = np.random.default_rng(0)
    a, b = _arm(rng, 0.8), _arm(rng, 0.6)
    res = hierarchical_bootstrap(a, b, 500, seed=1)
    manual = np.mean([macro_accuracy(x) - macro_accuracy(y) for x, y in zip(a, b, strict=True)])
    assert res["mean"] == pytest.approx(manual)
    assert res["per_seed"] == pytest.approx([macro_accuracy(x) - macro_accuracy(y) for x, y in zip(a, b, strict=True)])
    assert 0.1 < res["ci95"][0] < res["mean"] < res["ci95"][1] < 0.3
    assert res["sd_over_seeds"] == pytest.approx(np.std(res["per_seed"], ddof=1))


def test_bootstrap_of_an_arm_against_itself_is_exactly_zero_and_noise_covers_zero():
    rng = np.random.default_rng(1)
    a = _arm(rng, 0.7)
    assert hierarchical_bootstrap(a, a, 200)["ci95"] == [0.0, 0.0]
    b = _arm(rng, 0.7)
    lo, hi = hierarchical_bootstrap(a, b, 1000)["ci95"]
    assert lo < 0 < hi


def test_seed_level_spread_widens_the_interval():
    """Seeds that disagree must widen the CI beyond the rows-only interval (the hierarchy is real)."""
    rows = 400
    a = [{"t": np.ones(rows, bool)}, {"t": np.zeros(rows, bool)}, {"t": np.ones(rows, bool)}]
    b = [{"t": np.zeros(rows, bool)}, {"t": np.ones(rows, bool)}, {"t": np.zeros(rows, bool)}]
    res = hierarchical_bootstrap(a, b, 2000, seed=0)
    assert res["mean"] == pytest.approx(1 / 3)
    assert res["ci95"][0] == pytest.approx(-1.0) and res["ci95"][1] == pytest.approx(1.0)


def test_unpaired_arms_are_refused():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match="rows"):
        hierarchical_bootstrap(_arm(rng, 0.5, rows=10), _arm(rng, 0.5, rows=11))


def test_mcnemar_counts_discordant_rows_over_seeds():
    a = [{"t": np.array([1, 1, 0, 0, 1], bool)}, {"t": np.array([1, 0], bool)}]
    b = [{"t": np.array([0, 1, 1, 0, 0], bool)}, {"t": np.array([0, 0], bool)}]
    res = mcnemar(a, b)["t"]
    assert (res["only_a"], res["only_b"]) == (3, 1)
    assert res["p"] == pytest.approx(0.625)  # exact two-sided binomial, 1 of 4 discordant


def test_bootstrap_defaults_and_seed_make_it_reproducible():
    rng = np.random.default_rng(5)
    a, b = _arm(rng, 0.7, seeds=2, rows=50), _arm(rng, 0.6, seeds=2, rows=50)
    assert hierarchical_bootstrap(a, b) == hierarchical_bootstrap(a, b, 2000, seed=0)  # the documented defaults
    assert hierarchical_bootstrap(a, b, 300, seed=7) == hierarchical_bootstrap(a, b, 300, seed=7)
    assert hierarchical_bootstrap(a, b, 300, seed=7)["ci95"] != hierarchical_bootstrap(a, b, 300, seed=8)["ci95"]


def test_bootstrap_of_one_seed_resamples_every_row_and_has_no_seed_spread():
    """One seed, one task, one better row of five: the bootstrap mean is Binomial(5, 1/5) / 5, so no
    improvement (row 0 never drawn) has probability 0.8**5 and the 95 % interval is [0, 3/5]."""
    a = [{"t": np.array([1, 0, 0, 0, 0], bool)}]
    b = [{"t": np.zeros(5, bool)}]
    res = hierarchical_bootstrap(a, b, 2000, seed=0)
    assert res["mean"] == pytest.approx(0.2) and res["per_seed"] == pytest.approx([0.2])
    assert res["sd_over_seeds"] is None
    assert res["ci95"] == pytest.approx([0.0, 0.6])
    assert res["p_le_0"] == pytest.approx(0.8**5, abs=0.04)


def test_bootstrap_resamples_seeds_with_replacement():
    rows = 10
    ones, zeros = np.ones(rows, bool), np.zeros(rows, bool)
    # Two seeds that disagree completely: the mean of two draws is 1, 0 or -1 (1/4, 1/2, 1/4).
    res = hierarchical_bootstrap([{"t": ones}, {"t": zeros}], [{"t": zeros}, {"t": ones}], 2000, seed=0)
    assert res["mean"] == 0.0 and res["ci95"] == pytest.approx([-1.0, 1.0])
    assert res["sd_over_seeds"] == pytest.approx(np.sqrt(2)) and res["p_le_0"] == pytest.approx(0.75, abs=0.04)
    # Only the first of three seeds differs: no improvement when none of three draws is seed 0.
    a = [{"t": ones}, {"t": zeros}, {"t": ones}]
    b = [{"t": zeros}, {"t": zeros}, {"t": ones}]
    assert hierarchical_bootstrap(a, b, 2000, seed=0)["p_le_0"] == pytest.approx((2 / 3) ** 3, abs=0.04)


def test_bootstrap_mirrors_when_the_arms_swap_and_counts_ties_as_no_improvement():
    rng = np.random.default_rng(6)
    a, b = _arm(rng, 0.7), _arm(rng, 0.65)
    ab, ba = hierarchical_bootstrap(a, b, 1000, seed=2), hierarchical_bootstrap(b, a, 1000, seed=2)
    assert ba["mean"] == pytest.approx(-ab["mean"]) and ba["per_seed"] == pytest.approx([-x for x in ab["per_seed"]])
    assert ba["ci95"] == pytest.approx([-ab["ci95"][1], -ab["ci95"][0]])
    assert hierarchical_bootstrap(a, a, 200)["p_le_0"] == 1.0  # no improvement includes a tie
    right, wrong = [{"t": np.ones(20, bool)}] * 2, [{"t": np.zeros(20, bool)}] * 2
    assert hierarchical_bootstrap(right, wrong, 200)["p_le_0"] == 0.0
    assert hierarchical_bootstrap(wrong, right, 200)["p_le_0"] == 1.0


def test_unpaired_arms_are_refused_with_what_differs():
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=r"different numbers of seeds \(3 vs 2\)"):
        hierarchical_bootstrap(_arm(rng, 0.5), _arm(rng, 0.5, seeds=2))
    other = [{**seed, "extra": seed["t0"]} for seed in _arm(rng, 0.5)]
    with pytest.raises(ValueError, match="seed 0: arms cover different tasks"):
        mcnemar(_arm(rng, 0.5), other)


def test_mcnemar_ignores_rows_both_arms_get_right_and_tasks_without_discordance():
    a = [{"t": np.array([1, 1, 1, 0, 0], bool), "u": np.array([1, 0], bool)}]
    b = [{"t": np.array([1, 1, 0, 1, 0], bool), "u": np.array([1, 0], bool)}]
    assert mcnemar(a, b) == {
        "t": {"only_a": 1, "only_b": 1, "p": 1.0},
        "u": {"only_a": 0, "only_b": 0, "p": 1.0},  # nothing to test: p is 1
    }


def test_random_groups_keep_sizes_and_depend_on_the_seed():
    tasks = [f"t{k}" for k in range(8)]
    g0 = random_groups(tasks, [3, 3, 2], 0)
    assert [len(g) for g in g0] == [3, 3, 2] and sorted(t for g in g0 for t in g) == sorted(tasks)
    assert random_groups(tasks, [3, 3, 2], 0) == g0
    assert any(random_groups(tasks, [3, 3, 2], s) != g0 for s in range(1, 5))
    with pytest.raises(ValueError, match="add up"):
        random_groups(tasks, [3, 3], 0)


def test_structure_test_separates_planted_groups_from_noise():
    rng = np.random.default_rng(3)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    planted = (labels[:, None] == labels[None, :]) + 0.3 * rng.normal(size=(8, 8)) + rng.normal(size=(8, 1))
    res = structure_test(planted, 199, 0.05, seed=0)
    assert res["significant"] and res["p"] <= 0.01 and res["statistic"] > res["null_p95"]
    noise = structure_test(np.random.default_rng(4).normal(size=(8, 8)), 199, 0.05, seed=0)
    assert not noise["significant"] and "no group structure" in noise["reason"]
    # a per-task level (row constant) alone is not structure
    level = structure_test(np.repeat(rng.normal(size=(8, 1)), 8, axis=1) + 1e-3 * rng.normal(size=(8, 8)), 199)
    assert not level["significant"]
    assert structure_test(np.ones((2, 2)))["significant"] is False


def test_structure_test_concentration_is_the_positive_share_of_the_symmetrised_eigenvalue_mass():
    off = 0.1 * (np.ones((3, 3)) - np.eye(3))  # eigenvalues 0.2, -0.1, -0.1: positive share 0.04 / 0.06
    assert concentration(off) == pytest.approx(2 / 3)
    assert concentration(off + np.diag([5.0, -3.0, 1.0])) == pytest.approx(2 / 3)  # the diagonal is ignored
    assert concentration(np.array([[0.0, 2.0], [0.0, 0.0]])) == pytest.approx(0.5)  # symmetrised: +-1
    assert concentration(2 * (np.ones((3, 3)) - np.eye(3))) == pytest.approx(2 / 3)
    assert concentration(np.zeros((4, 4))) == 0.0


def test_structure_test_counts_ties_as_exceeding_and_reads_p_and_the_null_off_the_permutations(monkeypatch):
    """The statistic of the unpermuted matrix comes first, then one per permutation; a null value within 1e-12 of
    the observed one counts as reaching it."""
    null = [0.5, 0.5 - 1e-12, 0.5 - 1e-11, 0.9, *np.linspace(0.0, 0.4, 15)]
    values = iter([0.5, *null])
    monkeypatch.setattr(structure, "concentration", lambda R: next(values))
    res = structure_test(np.random.default_rng(0).normal(size=(4, 4)), permutations=19, alpha=0.2, seed=0)
    assert res == {
        "statistic": 0.5,
        "null_mean": pytest.approx(np.mean(null)),
        "null_p95": pytest.approx(np.percentile(null, 95)),
        "p": 0.2,  # (1 + 3) / (1 + 19): 0.5, 0.5 - 1e-12 and 0.9 reach the observed 0.5
        "alpha": 0.2,
        "significant": True,  # p <= alpha
        "permutations": 19,
        "reason": "affinity structure above noise (permutation p = 0.200 <= 0.2)",
    }


def test_structure_test_of_rows_without_contrast_has_p_one_and_three_tasks_are_enough():
    flat = np.repeat(np.arange(5.0)[:, None], 5, axis=1)  # every row constant: nothing to permute
    res = structure_test(flat, permutations=49)
    assert (res["statistic"], res["p"], res["null_mean"], res["significant"]) == (0.0, 1.0, 0.0, False)
    three = structure_test(np.array([[0.0, 1.0, -1.0], [1.0, 0.0, -1.0], [-1.0, -1.0, 0.0]]), permutations=9)
    assert three["statistic"] is not None and three["permutations"] == 9
    assert structure_test(np.ones((2, 2)), alpha=0.1) == {
        "statistic": None,
        "p": 1.0,
        "alpha": 0.1,
        "significant": False,
        "permutations": 0,
        "reason": "2 tasks: too few to test for group structure",
    }


def test_structure_test_defaults_seed_diagonal_and_missing_cells():
    rng = np.random.default_rng(5)
    T = rng.normal(size=(6, 6))
    res = structure_test(T)
    assert res == structure_test(T, permutations=999, alpha=0.05, seed=0) and res["permutations"] == 999
    assert structure_test(T, 99, seed=1) == structure_test(T, 99, seed=1)
    assert structure_test(T, 99, seed=1)["null_mean"] != structure_test(T, 99, seed=2)["null_mean"]
    # the diagonal (a task with itself) takes no part
    assert structure_test(T + np.diag(rng.normal(size=6)), 99) == pytest.approx(structure_test(T, 99))
    # a missing cell counts as its row's mean over the cells present
    gaps = T.copy()
    gaps[0, 3] = gaps[2, 5] = gaps[4, 1] = np.nan
    filled = np.where(np.isfinite(gaps), gaps, np.nanmean(gaps, axis=1, keepdims=True))
    assert structure_test(gaps, 99) == pytest.approx(structure_test(filled, 99))


TASKS = ["cb", "rte", "sst2"]


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "run"
    params = tmp_path_factory.mktemp("params") / "p.json"
    params.write_text(
        json.dumps(
            {
                "max_length": 128,
                "affinity": {"dim": 8},
                "bootstrap": 200,
                "training": {
                    "lr": 5e-3,
                    "boosting": {"error_threshold": 0, "max_rounds": 1},
                    "ensemble": {"fit_weights": True},
                },
            }
        )
    )
    result = runner.invoke(
        app,
        [
            "study",
            "--model",
            "tiny-llama",
            "--tasks",
            ",".join(TASKS),
            "--seeds",
            "1",
            "--groups",
            "auto",
            "--max-train",
            "12",
            "--max-val",
            "6",
            "--max-test",
            "6",
            "--epochs",
            "1",
            "--params",
            str(params),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    return out, result.output


def test_study_writes_the_contract_and_its_figures_recompute(study_out):
    out, output = study_out
    study = json.loads((out / "study.json").read_text())
    assert (out / "study.png").stat().st_size > 1000 and "affinity" in (out / "study.md").read_text()
    assert study["tasks"] == TASKS and study["seeds"] == [0]
    assert {"single", "per_task", "random", "affinity", "chorus"} <= set(study["arms"])
    # every arm's accuracy recomputed from the saved per-row predictions
    where = {
        "single": ("affinity", "single"),
        "per_task": ("per_task", "ensemble"),
        "random": ("random", "ensemble"),
        "affinity": ("affinity", "ensemble"),
        "affinity_no_boost": ("affinity", "ensemble_no_boost"),
    }
    for arm, (run, col) in where.items():
        preds = json.loads((out / "seed_0" / run / "predictions.json").read_text())["test"]
        acc = np.mean([np.mean(np.array(preds[t]["columns"][col]) == np.array(preds[t]["labels"])) for t in TASKS])
        assert study["arms"][arm]["average"] == pytest.approx(acc), arm
        assert study["arms"][arm]["per_seed"] == pytest.approx([acc])
    for arm in ("per_task", "random", "affinity"):
        d = study["differences"][f"{arm}-single"]
        assert d["mean"] == pytest.approx(study["arms"][arm]["average"] - study["arms"]["single"]["average"])
        assert d["ci95"][0] <= d["mean"] + 1e-12 and d["mean"] - 1e-12 <= d["ci95"][1]
    assert study["differences"]["affinity-random"]["mean"] == pytest.approx(
        study["arms"]["affinity"]["average"] - study["arms"]["random"]["average"]
    )
    # FLOPs: affinity = its group training + Stage 1 (which includes the meta fine-tune), from the run reports
    aff = json.loads((out / "seed_0" / "affinity" / "train_report.json").read_text())["cost"]
    rnd = json.loads((out / "seed_0" / "random" / "train_report.json").read_text())["cost"]
    flops = study["flops"]
    assert flops["stage1"] == pytest.approx(aff["affinity_flops"]) and flops["stage1"] > 0
    assert flops["affinity"] == pytest.approx(aff["ensemble_training"]["total_flops"] + aff["affinity_flops"])
    assert flops["random"] == pytest.approx(rnd["ensemble_training"]["total_flops"])
    assert flops["single"] == pytest.approx(aff["single"]["total_flops"])
    assert study["flops_vs_single"]["affinity"] == pytest.approx(flops["affinity"] / flops["single"])
    # random groups have the affinity groups' sizes
    groups = study["groups"]["0"]
    assert sorted(map(len, groups["random"])) == sorted(map(len, groups["affinity"]))


def _correct(out, run: str, column: str, split: str = "test") -> dict[str, np.ndarray]:
    preds = json.loads((out / "seed_0" / run / "predictions.json").read_text())[split]
    return {t: np.array(preds[t]["columns"][column]) == np.array(preds[t]["labels"]) for t in TASKS}


@pytest.mark.needs_data
def test_every_study_figure_recomputes_from_the_predictions_and_reports(study_out):
    """Each arm (the deployed `chorus` arm and zero-shot included), its per-task accuracies, every paired
    difference, the McNemar counts and exact p, the FLOP ratios and the validation choice, recomputed from the
    saved per-row predictions and run reports; study.md and the printed table show the same numbers."""
    from scipy.stats import binomtest

    out, output = study_out
    study = json.loads((out / "study.json").read_text())
    report = json.loads((out / "seed_0" / "affinity" / "train_report.json").read_text())
    selection = report.get("selection")
    chosen = (
        {"groups": "ensemble", "single": "single", "per_task": "per_task"}[selection["chosen"]]
        if selection
        else "ensemble"
    )
    columns = {
        "single": ("affinity", "single"),
        "zero_shot": ("affinity", "zero_shot"),
        "chorus": ("affinity", chosen),
        **{
            f"{arm}{v}": (arm, f"ensemble{v}")
            for arm in ("per_task", "random", "affinity")
            for v in ("", "_no_boost", "_no_fit")
        },
    }
    assert set(study["arms"]) == set(columns)
    correct = {arm: _correct(out, *where) for arm, where in columns.items()}
    acc = {arm: float(np.mean([np.mean(c[t]) for t in TASKS])) for arm, c in correct.items()}
    for arm, c in correct.items():
        assert study["arms"][arm]["average"] == pytest.approx(acc[arm], abs=1e-12), arm
        assert study["arms"][arm]["per_task"] == pytest.approx({t: float(np.mean(c[t])) for t in TASKS}, abs=1e-12), arm
    assert {k for k in study["differences"] if k.endswith("-single")} == {
        f"{a}-single" for a in columns if a != "single"
    }
    for name, d in study["differences"].items():
        a, b = name.split("-", 1)
        b = d.get("control", b)
        if name == "affinity-best_control":
            assert b == max(("single", "per_task", "random"), key=lambda arm: acc[arm])
        assert d["mean"] == pytest.approx(acc[a] - acc[b], abs=1e-12), name
        assert d["ci95"][0] <= d["mean"] + 1e-12 <= d["ci95"][1] + 2e-12, name
    assert set(study["mcnemar"]) == {
        "per_task-single",
        "random-single",
        "affinity-single",
        "chorus-single",
        "affinity-random",
    }
    for name, per_task in study["mcnemar"].items():
        a, b = name.split("-")
        for t in TASKS:
            only_a = int((correct[a][t] & ~correct[b][t]).sum())
            only_b = int((correct[b][t] & ~correct[a][t]).sum())
            p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
            assert (per_task[t]["only_a"], per_task[t]["only_b"]) == (only_a, only_b), (name, t)
            assert per_task[t]["p"] == pytest.approx(p, abs=1e-12), (name, t)
    # FLOPs: every ratio is FLOPs / single's; chorus also pays for the single and per-task adapters the validation
    # fallback compared (when it ran)
    flops, cost = study["flops"], report["cost"]
    fallback = sum((cost.get(k) or {}).get("total_flops", 0.0) for k in ("single", "per_task")) if selection else 0.0
    assert flops["chorus"] == pytest.approx(
        cost["ensemble_training"]["total_flops"] + cost["affinity_flops"] + fallback, rel=1e-12
    )
    per_task_run = json.loads((out / "seed_0" / "per_task" / "train_report.json").read_text())["cost"]
    assert flops["per_task"] == pytest.approx(per_task_run["ensemble_training"]["total_flops"], rel=1e-12)
    assert study["flops_vs_single"] == pytest.approx({k: v / flops["single"] for k, v in flops.items()}, rel=1e-12)
    # wall time beside the FLOPs: each arm's training stages, summed from its report (they ran, so they took time)
    stages = per_task_run["stages"]
    trained = ("group_adapters", "baselines", "boosting", "ensemble_weights")
    assert study["costs"]["per_task_train_seconds"] == pytest.approx(
        sum(v["wall_seconds"] for k, v in stages.items() if k in trained), rel=1e-9
    )
    assert study["costs"]["per_task_train_seconds"] > 0
    # validation: which headline arm the validation rows favour
    val = {
        arm: float(np.mean([np.mean(c) for c in _correct(out, *columns[arm], "val").values()]))
        for arm in ("single", "per_task", "random", "affinity")
    }
    pick = study["validation_choice"]["per_seed"][0]
    assert pick["val_accuracy"] == pytest.approx(val, abs=1e-12) and val[pick["choice"]] == max(val.values())
    # the table: study.md and the printed output carry the same accuracies and differences
    md = (out / "study.md").read_text()
    for arm in columns:
        assert f"| {arm} | {100 * acc[arm]:.2f} | {100 * acc[arm]:.1f} |" in md, arm
    d = study["differences"]["affinity-random"]
    assert (
        f"| affinity-random | {100 * d['mean']:+.2f} | [{100 * d['ci95'][0]:+.2f}, {100 * d['ci95'][1]:+.2f}] |" in md
    )
    printed: dict[str, list[str]] = {}  # the first printed line of each arm (the table comes before the notes)
    for line in output.splitlines():
        if line.split():
            printed.setdefault(line.split()[0], line.split()[1:])
    for arm in ("single", "per_task", "random", "affinity", "zero_shot", "chorus"):
        assert printed[arm][0] == f"{100 * acc[arm]:.2f}", (arm, output)
    assert printed["affinity-random"][0] == f"{100 * d['mean']:+.2f}", output
    assert f"{flops['stage1']:.3g} FLOPs" in md


def test_the_deployed_arm_follows_the_structure_test_and_validation(study_out):
    out, _ = study_out
    run = out / "seed_0" / "affinity"
    grouping = json.loads((run / "groups.json").read_text())
    report = json.loads((run / "train_report.json").read_text())
    assert grouping["structure"]["permutations"] >= 99 and 0 < grouping["structure"]["p"] <= 1
    manifest = json.loads((run / "ensemble.json").read_text())
    if grouping["selection"] == "validation":
        sel = report["selection"]
        scores = sel["validation_accuracy"]
        assert set(scores) == {"groups", "single", "per_task"}
        assert scores[sel["chosen"]] == max(scores.values())
        assert manifest["fingerprint"] == sel["fingerprint"] == report["ensemble"]["fingerprint"]
        assert (run / "ensemble_groups.json").is_file()
        members = {m["name"] for m in manifest["members"]}
        expected = {"single": {"single"}, "per_task": {f"task_{t}" for t in TASKS}}.get(sel["chosen"])
        assert expected is None or members == expected
    else:
        assert "selection" not in report or report["selection"] is None
