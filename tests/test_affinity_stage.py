"""End-to-end Stage 1 on tiny-llama (3 tasks, ~10 examples each, small d): files, resume, shards, estimates."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.ml.affinity.params import AffinityParams, GroupingParams
from shared.ml.affinity.stage import (
    finalize_affinity,
    prepare_affinity,
    run_affinity,
    run_base_eval,
    run_estimate_shard,
    run_gradient_batches,
    run_grouping,
)
from tests.recompute import logistic_stationarity, read_rows, softplus, solve_logistic

TASKS = ["cb", "rte", "sst2"]


def _params(**kw) -> AffinityParams:
    # forward mode and the accuracy metric: these tests pin the forward estimate's machinery (the defaults are
    # mode linear, metric neg_loss: test_defaults_are_the_measured_stage1)
    base = dict(
        model="tiny-llama",
        tasks=TASKS,
        max_train=10,
        max_val=6,
        dim=16,
        subset_size=2,
        lam=0.05,
        device="cpu",
        batch_size=4,
        eval_batch_size=8,
        init="base",
        mode="forward",
        metric="accuracy",
        meta_batch_size=8,
        meta_lr=5e-4,
    )
    base.update(kw)
    return AffinityParams(**base)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("aff") / "run"
    summary = run_affinity(_params(), wd)
    assert set(summary["artifacts"]) >= {
        "affinity_heatmap",
        "subset_results_csv",
        "gradients",
        "theta0",
        "projection_spec",
    }
    for rel in summary["artifacts"].values():
        assert (wd / rel).exists(), rel
    return wd


def test_affinity_files_are_valid(run_dir):
    doc = json.loads((run_dir / "affinity.json").read_text())
    assert doc["tasks"] == TASKS and doc["metric"] == "accuracy"
    assert doc["subsets"] == [["cb", "rte"], ["cb", "sst2"], ["rte", "sst2"]]
    T = np.array(doc["matrix"], dtype=float)
    assert T.shape == (3, 3) and np.isfinite(T).all() and ((0 <= T) & (T <= 1)).all()
    assert np.array(doc["counts"]).tolist() == [[2, 1, 1], [1, 2, 1], [1, 1, 2]]
    assert set(doc["matrices"]) == {"accuracy", "neg_loss", "macro_f1"}
    assert (np.array(doc["matrices"]["neg_loss"], dtype=float) < 0).all()
    assert len(doc["per_subset"]) == 6 and set(doc["base"]) == set(TASKS)
    # the table makes every cell auditable: T[cb][rte] = cb's accuracy in the only subset with both
    row = next(r for r in doc["per_subset"] if r["subset"] == 0 and r["task"] == "cb")
    assert T[0, 1] == pytest.approx(row["accuracy"])
    with (run_dir / "subset_results.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and {r["task"] for r in rows} == set(TASKS)
    assert (run_dir / "affinity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    G = np.load(run_dir / "grads_train.npy", allow_pickle=False)
    f0 = np.load(run_dir / "f0_train.npy", allow_pickle=False)
    assert G.shape == (30, 16) and G.dtype == np.float32 and f0.shape == (30,) and np.isfinite(G).all()
    assert np.abs(G).sum(1).min() > 0
    with (run_dir / "rows_train.csv").open() as fh:
        ids = list(csv.DictReader(fh))
    assert len(ids) == 30 and ids[0]["task"] == "cb" and ids[0]["example_id"].startswith("cb/train/")
    from safetensors.torch import load_file

    theta0 = load_file(str(run_dir / "theta0.safetensors"))
    assert all(float(v.abs().max()) == 0 for k, v in theta0.items() if "lora_B" in k)
    assert all(float(v.abs().max()) > 0 for k, v in theta0.items() if "lora_A" in k)
    spec = json.loads((run_dir / "projection_spec.json").read_text())
    assert spec["dim"] == 16 and spec["seed"] == 0 and spec["total"] == sum(np.prod(p["shape"]) for p in spec["params"])
    assert all("lora_B" in p["name"] for p in spec["params"])
    W = np.load(run_dir / "weights.npy", allow_pickle=False)
    assert W.shape == (3, 16)
    assert not (run_dir / "gradients").exists()  # shards removed after the merge


def _assert_estimate_equals_plain_forward(p: AffinityParams, run_dir: Path) -> None:
    """Subset 1's (cb + sst2) multiplexed estimate at theta0 + P w equals a plain forward of the adapter with
    B set to B0 + P w (theta0's B0 is kept, not replaced)."""
    from shared.ml.affinity.runtime import Runtime
    from shared.ml.data import subsample
    from shared.ml.evaluate import metrics_from_scores, score_task
    from shared.ml.tasks.registry import get_task

    rt = Runtime.load(p, run_dir / "theta0.safetensors")
    W = torch.from_numpy(np.load(run_dir / "weights.npy"))
    params = dict(rt.model.named_parameters())
    with torch.no_grad():
        for name, value in rt.projector.backmap(W[1]).items():
            params[name].add_(value)
    doc = json.loads((run_dir / "affinity.json").read_text())
    for task in ("cb", "sst2"):
        examples = subsample(get_task(task).split("val"), p.max_val, p.seed)
        scores = score_task(rt.model, rt.tokenizer, rt.bound[task], examples, batch_size=3)
        m = metrics_from_scores(scores, rt.bound[task].num_choices)
        row = next(r for r in doc["per_subset"] if r["subset"] == 1 and r["task"] == task)
        assert m.loss == pytest.approx(row["loss"], rel=1e-5)
        assert m.accuracy == pytest.approx(row["accuracy"])
        assert m.macro_f1 == pytest.approx(row["macro_f1"])


def test_batched_estimate_equals_loading_the_adapter(run_dir):
    """The multiplexed forward at theta0 + P w equals a plain forward with B set to P w."""
    _assert_estimate_equals_plain_forward(_params(), run_dir)


def test_resume_recomputes_only_missing_pieces(run_dir, tmp_path):
    wd = tmp_path / "copy"
    shutil.copytree(run_dir, wd)
    before = json.loads((wd / "affinity.json").read_text())
    (wd / "estimates" / "subset-000001.json").unlink()
    (wd / "affinity.json").unlink()
    run_affinity(_params(), wd)
    after = json.loads((wd / "affinity.json").read_text())
    assert np.allclose(np.array(after["matrix"], dtype=float), np.array(before["matrix"], dtype=float))
    with pytest.raises(ValueError, match="different parameters"):
        run_affinity(_params(dim=8), wd)


def test_sharded_run_matches_the_single_run(run_dir, tmp_path):
    p = _params()
    wd = tmp_path / "sharded"
    rt = prepare_affinity(p, wd)
    run_gradient_batches(p, wd, first=0, last=3, runtime=rt)  # 30 rows = 7 batches of 4 + 1 of 2
    # an interrupted shard (cancelled after 2 batches of 4 rows), then resumed
    from shared.ml.progress import Cancelled

    def cancel_after_two(stage, done, total, message=""):
        if done == 2:
            raise Cancelled()

    p_small = _params(project_rows=4)
    with pytest.raises(Cancelled):
        run_gradient_batches(p_small, wd, cancel_after_two, first=3, last=8, runtime=rt)
    info = run_gradient_batches(p, wd, first=3, last=8, runtime=rt)
    assert info["computed"] == 18 - 8
    again = run_gradient_batches(p, wd, first=3, last=8, runtime=rt)
    assert again["computed"] == 0
    run_base_eval(p, wd, runtime=rt)
    run_estimate_shard(p, wd, start=2, end=3, runtime=rt)
    run_estimate_shard(p, wd, start=0, end=2, runtime=rt)
    finalize_affinity(p, wd)
    a = np.load(run_dir / "grads_train.npy")
    b = np.load(wd / "grads_train.npy")
    assert np.allclose(a, b, rtol=1e-4, atol=1e-6 * np.abs(a).max())
    ta = np.array(json.loads((run_dir / "affinity.json").read_text())["matrices"]["neg_loss"], dtype=float)
    tb = np.array(json.loads((wd / "affinity.json").read_text())["matrices"]["neg_loss"], dtype=float)
    assert np.allclose(ta, tb, rtol=1e-4)


@pytest.fixture(scope="module")
def linear_dir(tmp_path_factory) -> Path:
    """A linear-mode run (the default mode): estimates from the validation rows' own gradients."""
    wd = tmp_path_factory.mktemp("aff") / "linear"
    run_affinity(_params(mode="linear", metric="neg_loss"), wd)
    return wd


def test_linear_mode(linear_dir):
    doc = json.loads((linear_dir / "affinity.json").read_text())
    assert doc["mode"] == "linear" and doc["metric"] == "neg_loss"
    assert np.isfinite(np.array(doc["matrix"], dtype=float)).all()
    assert np.load(linear_dir / "grads_val.npy").shape == (18, 16)
    assert all(r["macro_f1"] is None for r in doc["per_subset"])


def test_linear_estimates_recompute_from_the_saved_gradients(linear_dir):
    """The linear proxy from the saved files alone: lambda from grads_train.npy, each subset's w is the optimum of
    its tasks' logistic regression on (grads_train, f0_train), each per-subset loss / accuracy is
    mean softplus(-(f0_val + G_val w)) / mean(f0_val + G_val w > 0) over the task's validation rows, and T
    averages the recomputed -loss over the subsets holding both tasks."""
    doc = json.loads((linear_dir / "affinity.json").read_text())
    load = lambda name: np.load(linear_dir / name, allow_pickle=False)  # noqa: E731
    G, f0, Gv, fv, W = (
        load("grads_train.npy"),
        load("f0_train.npy"),
        load("grads_val.npy"),
        load("f0_val.npy"),
        load("weights.npy"),
    )
    train_task = np.array([r["task"] for r in read_rows(linear_dir / "rows_train.csv")])
    val_task = np.array([r["task"] for r in read_rows(linear_dir / "rows_val.csv")])
    assert G.shape == (30, 16) and Gv.shape == (18, 16) and W.shape == (3, 16)
    assert list(np.unique(val_task, return_counts=True)[1]) == [6, 6, 6]
    lam = 0.05 * float(np.mean((G.astype(np.float64) ** 2).sum(1)))  # lam_scale "gradient": lam * mean ||g||^2
    assert doc["lam_effective"] == pytest.approx(lam, rel=1e-6)
    recomputed: dict[tuple[int, str], float] = {}
    for k, subset in enumerate(doc["subsets"]):
        rows = np.isin(train_task, subset)
        grad = logistic_stationarity(G[rows], f0[rows], W[k], lam)
        start = logistic_stationarity(G[rows], f0[rows], np.zeros_like(W[k]), lam)
        assert np.linalg.norm(grad) <= 1e-3 * np.linalg.norm(start), (k, subset)  # w is the optimum (w = 0 is not)
        assert np.allclose(W[k], solve_logistic(G[rows], f0[rows], lam), rtol=1e-3, atol=1e-3 * np.abs(W[k]).max())
        for task in subset:
            z = fv[val_task == task].astype(np.float64) + Gv[val_task == task].astype(np.float64) @ W[k].astype(
                np.float64
            )
            row = next(r for r in doc["per_subset"] if r["subset"] == k and r["task"] == task)
            assert row["n"] == 6 and row["train_rows"] == int(rows.sum())
            assert row["loss"] == pytest.approx(float(np.mean(softplus(-z))), rel=1e-5), (k, task)
            assert row["accuracy"] == pytest.approx(float(np.mean(z > 0)), abs=1e-12), (k, task)
            recomputed[k, task] = -float(np.mean(softplus(-z)))
    T = np.array(doc["matrix"], dtype=float)
    for i, a in enumerate(TASKS):
        for j, b in enumerate(TASKS):
            cells = [v for (k, t), v in recomputed.items() if t == a and b in doc["subsets"][k]]
            assert T[i, j] == pytest.approx(np.mean(cells), rel=1e-5), (a, b)


def test_meta_initialised_theta0(tmp_path):
    """init=meta: theta0 is the LoRA fine-tuned on all tasks (B != 0, recorded in theta0.json), and the batched
    estimate at theta0 + P w equals a plain forward with the adapter set to theta0 + P w (B0 kept, not replaced)."""
    from safetensors.torch import load_file

    wd = tmp_path / "meta"
    p = _params(init="meta", meta_epochs=1, meta_lr=1e-3, meta_batch_size=5)
    run_affinity(p, wd)
    info = json.loads((wd / "theta0.json").read_text())
    assert info["init"] == "meta" and info["rows"] == 30 and info["steps"] == 6
    theta0 = load_file(str(wd / "theta0.safetensors"))
    assert max(float(v.abs().max()) for k, v in theta0.items() if "lora_B" in k) > 0
    doc = json.loads((wd / "affinity.json").read_text())
    assert doc["init"] == "meta" and doc["theta0"]["steps"] == 6

    _assert_estimate_equals_plain_forward(p, wd)
    # a resumed run reuses theta0 instead of training it again
    before = (wd / "theta0.safetensors").stat().st_mtime_ns
    run_affinity(p, wd)
    assert (wd / "theta0.safetensors").stat().st_mtime_ns == before


def test_grouping_stage_reads_the_workdir_affinity(run_dir, tmp_path):
    shutil.copy(run_dir / "affinity.json", tmp_path / "affinity.json")
    out = run_grouping(GroupingParams(groups=2), tmp_path)
    doc = json.loads((tmp_path / "groups.json").read_text())
    assert doc["groups"] == out["groups"] and len(doc["groups"]) == 2
    assert sorted(t for g in doc["groups"] for t in g) == sorted(TASKS)
    assert doc["method"] in ("sdp", "spectral") and out["artifacts"]["groups"] == "groups.json"


def test_representer_backmap_sketches_back_to_w(run_dir, tmp_path):
    """Delta = sum_i c_i g_i (full space) satisfies P^T Delta = w at the solver's optimum."""
    from shared.ml.affinity.estimate import representer_deltas, subset_rows
    from shared.ml.affinity.runtime import Runtime
    from shared.ml.affinity.solver import solve_subsets

    p = _params()
    rt = Runtime.load(p, run_dir / "theta0.safetensors")
    G = torch.from_numpy(np.load(run_dir / "grads_train.npy"))
    f0 = torch.from_numpy(np.load(run_dir / "f0_train.npy"))
    rows = rt.rows("train", p.max_train)
    subsets = [[0, 1], [1, 2]]
    sol = solve_subsets(G, f0, [subset_rows(rows, s) for s in subsets], p.lam)
    stacks = representer_deltas(rt, rows, subsets, sol.w, G, f0, p.lam)
    flat = torch.cat([stacks[q.name].reshape(2, -1) for q in rt.spec.params], dim=1)
    sketched = rt.projector.project_flat(flat)
    assert torch.allclose(sketched, sol.w, rtol=1e-3, atol=1e-4 * float(sol.w.abs().max()))
    # far smaller than P w, which carries the sketch's noise
    pw = rt.projector.backmap(sol.w)
    assert float(flat.norm(dim=1).max()) < float(
        torch.cat([pw[q.name].reshape(2, -1) for q in rt.spec.params], 1).norm(dim=1).min()
    )
    summary = run_affinity(_params(backmap="representer"), tmp_path / "rep")
    doc = json.loads((tmp_path / "rep" / "affinity.json").read_text())
    assert doc["backmap"] == "representer" and np.isfinite(np.array(doc["matrix"], dtype=float)).all()
    assert summary["subsets"] == 3


def test_fanned_out_run_is_bitwise_the_single_run(run_dir, tmp_path):
    """With a sharder installed (as the job runner does with fan-out on), the gradient passes and the subset
    estimation run as independent pieces, here out of order and one of them twice: the merged gradients,
    the weights and every per-subset result are bitwise those of the one-piece run."""
    from shared.jobs.registry import load_ref
    from shared.ml.sharding import use_sharder

    phases = []

    class Reversed:
        shards = 3

        def run(self, phase, workdir, progress, cache):
            fn = load_ref(phase.fn)
            ranges = phase.ranges(self.shards)
            phases.append((phase.name, phase.size, ranges))
            for start, end in [*reversed(ranges), ranges[0]]:  # a piece redone (its worker died) is a no-op
                fn(phase.args, workdir, progress, start, end, {})

    p = _params(project_rows=4, subsets_per_forward=1)
    wd = tmp_path / "fanned"
    with use_sharder(Reversed()):
        run_affinity(p, wd)
    assert phases == [("gradients:train", 8, [(0, 2), (2, 5), (5, 8)]), ("estimate", 3, [(0, 1), (1, 2), (2, 3)])]
    one = tmp_path / "one"
    run_affinity(p, one)
    for name in ("grads_train.npy", "f0_train.npy", "weights.npy"):
        assert np.array_equal(np.load(one / name), np.load(wd / name)), name
    a, b = (json.loads((d / "affinity.json").read_text()) for d in (one, wd))
    assert a["per_subset"] == b["per_subset"] and a["matrices"] == b["matrices"]


def test_token_capped_fan_out_cuts_at_projection_groups_and_matches_the_single_run(tmp_path):
    """With a token cap the batches are unequal (4 short rows, down to 1 long one); the gradient phase may then
    only be cut where a projection group starts, and the pieces still give the one-piece run bitwise."""
    from shared.jobs.registry import load_ref
    from shared.ml.sharding import use_sharder

    phases = []

    class Reversed:
        shards = 3

        def run(self, phase, workdir, progress, cache):
            ranges = phase.ranges(self.shards)
            phases.append((phase.name, phase.size, ranges))
            for start, end in reversed(ranges):
                load_ref(phase.fn)(phase.args, workdir, progress, start, end, {})

    p = _params(project_rows=6, subsets_per_forward=1, batch_tokens=400)
    wd = tmp_path / "fanned"
    with use_sharder(Reversed()):
        run_affinity(p, wd)
    # 30 rows in 15 batches of 4, 4, 3, 3, 2 x 5, 1 x 6 rows; projection groups start at batches 0, 2, 4, 7, 11
    assert phases[0] == ("gradients:train", 15, [(0, 2), (2, 7), (7, 15)])
    one = tmp_path / "one"
    run_affinity(p, one)
    for name in ("grads_train.npy", "f0_train.npy", "weights.npy"):
        assert np.array_equal(np.load(one / name), np.load(wd / name)), name
    doc = json.loads((one / "affinity.json").read_text())
    assert doc["params"]["batch_tokens"] == 400 and doc["params"]["batch_size"] == 4
    # the token cap changes the batches, not the gradients beyond float noise
    capped = np.load(one / "grads_train.npy")
    plain = tmp_path / "plain"
    run_affinity(_params(project_rows=6, subsets_per_forward=1), plain)
    ref = np.load(plain / "grads_train.npy")
    assert np.allclose(capped, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_defaults_are_the_measured_stage1(linear_dir):
    """The default Stage 1 is the one the H200 studies measured: meta-initialised, first-order (linear) estimates of
    the answer-choice loss, on at most STAGE1_TRAIN_ROWS training rows per task, also inside a pipeline."""
    from shared.ml.defaults import STAGE1_TRAIN_ROWS
    from shared.ml.training.pipeline_params import PipelineParams

    p = AffinityParams(tasks=TASKS)
    assert (p.mode, p.metric, p.init, p.max_train, p.meta_batch_size, p.meta_lr) == (
        "linear",
        "neg_loss",
        "meta",
        STAGE1_TRAIN_ROWS,
        32,
        1e-3,
    )
    assert PipelineParams(tasks=TASKS, max_train=1000).affinity_params().max_train == STAGE1_TRAIN_ROWS
    assert PipelineParams(tasks=TASKS, max_train=40).affinity_params().max_train == 40
    assert PipelineParams(tasks=TASKS, max_train=1000, affinity={"max_train": 600}).affinity_params().max_train == 600
    # a linear run writes the validation gradients its estimates come from, and its estimates are finite
    doc = json.loads((linear_dir / "affinity.json").read_text())
    assert doc["mode"] == "linear" and (linear_dir / "grads_val.npy").exists()
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["accuracy"] <= 1.0 for r in doc["per_subset"])


def test_a_and_b_gradients_from_a_meta_theta0(tmp_path):
    """gradients='AB' (linear mode only): the sketch covers every lora_A and lora_B matrix, f0 is the B-only run's,
    and the A directions change the projected gradients (from a meta theta0, B0 != 0)."""
    with pytest.raises(ValueError, match="gradients='AB' needs mode 'linear'"):
        _params(gradients="AB", mode="forward")
    common = dict(init="meta", meta_epochs=1, meta_lr=1e-3, meta_batch_size=5, mode="linear", metric="neg_loss")
    run_affinity(_params(**common), tmp_path / "b")
    run_affinity(_params(gradients="AB", **common), tmp_path / "ab")
    spec_b = json.loads((tmp_path / "b" / "projection_spec.json").read_text())
    spec_ab = json.loads((tmp_path / "ab" / "projection_spec.json").read_text())
    names_ab = [p["name"] for p in spec_ab["params"]]
    assert any(".lora_A." in n for n in names_ab) and not any(".lora_A." in p["name"] for p in spec_b["params"])
    assert {p["name"] for p in spec_b["params"]} < set(names_ab)
    assert spec_ab["total"] > spec_b["total"]
    for split in ("train", "val"):
        f_b, f_ab = (np.load(tmp_path / d / f"f0_{split}.npy") for d in ("b", "ab"))
        np.testing.assert_allclose(f_ab, f_b, rtol=1e-5, atol=1e-6)
        g_b, g_ab = (np.load(tmp_path / d / f"grads_{split}.npy") for d in ("b", "ab"))
        assert g_ab.shape == g_b.shape and np.isfinite(g_ab).all()
        assert not np.allclose(g_ab, g_b)
    doc = json.loads((tmp_path / "ab" / "affinity.json").read_text())
    assert np.isfinite(np.asarray(doc["matrix"], dtype=float)).all()
