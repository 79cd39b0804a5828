"""End-to-end affinity run with the real SmolLM2-135M, a lambda sweep on validation data, and optionally the
comparison with real fine-tunes (validate-estimates) for a few subsets. CPU by default sizes; GPU when present.

    python bench/affinity_smollm2.py                                   # 4 tasks x 32 train x 32 val, d=200
    python bench/affinity_smollm2.py --validate 2 --epochs 5           # + 2 real fine-tunes, errors per lambda
    python bench/affinity_smollm2.py --tasks sst2,mr,cr,subj,rte,cb --max-train 500 --max-val 200 --dim 400 --validate 8

Lambda is chosen on VALIDATION data only: the sweep solves every subset for each lambda and evaluates
theta0 + P w with the real forward on the validation split; reported per lambda are the mean estimated
validation loss / accuracy, the mean ||Delta|| / ||A0|| and the mean linearised training loss. With
--validate, the estimation error against real fine-tunes (also on validation) is reported per lambda.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.ml.affinity.estimate import evaluate_subsets_forward, representer_deltas, subset_rows  # noqa: E402
from shared.ml.affinity.params import AffinityParams, ValidateParams, effective_lambda  # noqa: E402
from shared.ml.affinity.runtime import Runtime, load_npy  # noqa: E402
from shared.ml.affinity.solver import solve_subsets  # noqa: E402
from shared.ml.affinity.stage import run_affinity  # noqa: E402
from shared.ml.affinity.validate import run_validate_estimates  # noqa: E402
from shared.ml.progress import TqdmProgress  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,cr,rte,cb")
    ap.add_argument("--max-train", type=int, default=32)
    ap.add_argument("--max-val", type=int, default=32)
    ap.add_argument("--dim", type=int, default=200)
    ap.add_argument("--lam", type=float, default=None, help="lambda of the main run (default: AffinityParams default)")
    ap.add_argument("--lams", default="1e-5,1e-4,3e-4,1e-3,3e-3,1e-2,1e-1", help="sweep grid (in --lam-scale units)")
    ap.add_argument(
        "--lam-scale",
        choices=["gradient", "absolute"],
        default="gradient",
        help="gradient: penalty = lam * mean ||g~||^2 (the stage default); absolute: penalty = lam",
    )
    ap.add_argument("--backmaps", default="sketch", help="comma-separated: sketch, representer (sweep each)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--validate", type=int, default=0, help="also fine-tune K subsets and compare (0 = skip)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--out", default=str(Path.home() / "stage1-bench" / "affinity-smollm2"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    lams = [float(x) for x in args.lams.split(",")]
    out = Path(args.out)
    common = dict(
        model=args.model,
        tasks=tasks,
        max_train=args.max_train,
        max_val=args.max_val,
        dim=args.dim,
        seed=args.seed,
        lam_scale=args.lam_scale,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        max_length=args.max_length,
    )
    if args.lam is not None:
        common["lam"] = args.lam
    params = AffinityParams(**common)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(
        f"model={args.model} tasks={tasks} train/task={args.max_train} val/task={args.max_val} d={args.dim} "
        f"lam={params.lam:g} device={device} threads={torch.get_num_threads()}",
        flush=True,
    )

    t0 = time.perf_counter()
    summary = run_affinity(params, out / "affinity", TqdmProgress())
    wall = time.perf_counter() - t0
    print(f"\naffinity run: {wall:.1f} s wall; phases: {json.dumps(summary['timing_seconds'])}")
    doc = json.loads((out / "affinity" / "affinity.json").read_text())
    print(
        "base (theta0) val metrics:",
        {t: (round(m["accuracy"], 3), round(m["loss"], 3)) for t, m in doc["base"].items()},
    )
    print("T (accuracy):")
    for name, row in zip(tasks, doc["matrix"], strict=False):
        print(f"  {name:>8s} " + " ".join(f"{v:6.3f}" for v in row))

    # ---- lambda sweep on validation data (reuses the run's gradients)
    rt = Runtime.load(params, out / "affinity" / "theta0.safetensors")
    G = torch.from_numpy(load_npy(out / "affinity" / "grads_train.npy").copy())
    f0 = torch.from_numpy(load_npy(out / "affinity" / "f0_train.npy").copy())
    train_rows = rt.rows("train", params.max_train)
    val_rows = rt.rows("val", params.max_val)
    subsets = [list(s) for s in json.loads((out / "affinity" / "subsets.json").read_text())["indices"]]
    a_norm = rt.a_norm()
    g_norm = G.norm(dim=1)
    print(
        f"\nmean ||g~||^2 = {float((G.double() ** 2).sum(1).mean()):.4g}; ||g~|| per row: median {float(g_norm.median()):.3g}, f0: mean {float(f0.mean()):.3f} "
        f"(p(gold) mean {float(torch.sigmoid(f0).mean()):.3f}); ||A0|| = {a_norm:.3f}; D_B = {rt.spec.total:,}"
    )
    base_loss = np.mean([m["loss"] for m in doc["base"].values()])
    base_acc = np.mean([m["accuracy"] for m in doc["base"].values()])
    print(
        f"\nlambda sweep over {len(subsets)} subsets (validation split; base: loss {base_loss:.4f}, acc {base_acc:.4f})"
    )
    print(
        f"{'backmap':>11s} {'lambda':>8s} {'lam_eff':>9s} {'val loss':>9s} {'val acc':>8s} {'||D||/||A0||':>12s} {'lin. train loss':>15s} "
        f"{'newton its':>10s} {'seconds':>8s}"
    )
    rows = []
    for backmap in [b.strip() for b in args.backmaps.split(",") if b.strip()]:
        for lam in lams:
            t1 = time.perf_counter()
            lam_eff = effective_lambda(lam, args.lam_scale, G)
            sol = solve_subsets(G, f0, [subset_rows(train_rows, s) for s in subsets], lam_eff, rt.device)
            stacks = None
            if backmap == "representer":
                stacks = representer_deltas(rt, train_rows, subsets, sol.w, G, f0, lam_eff)
            res, norms = evaluate_subsets_forward(rt, subsets, sol.w, val_rows, stacks=stacks)
            loss = np.mean([m.loss for r in res for m in r.values()])
            acc = np.mean([m.accuracy for r in res for m in r.values()])
            rel = float((norms / a_norm).mean())
            rows.append((lam, loss, acc, rel, backmap))
            print(
                f"{backmap:>11s} {lam:8.0e} {lam_eff:9.3g} {loss:9.4f} {acc:8.4f} {rel:12.4f} {float(sol.train_loss.mean()):15.4f} "
                f"{float(sol.iterations.float().mean()):10.1f} {time.perf_counter() - t1:8.1f}",
                flush=True,
            )
    best = min(rows, key=lambda r: r[1])
    print(
        f"lowest mean estimated validation loss: {best[4]} lambda = {best[0]:g} (acc {best[2]:.4f}, ||D||/||A0|| {best[3]:.3f})"
    )

    if args.validate:
        vp = ValidateParams(
            **{k: v for k, v in common.items()}, subsets=args.validate, epochs=args.epochs, lr=args.lr, lams=lams
        )
        t2 = time.perf_counter()
        v = run_validate_estimates(vp, out / "validate", TqdmProgress())
        print(
            f"\nvalidate-estimates ({args.validate} subsets, {args.epochs} epochs, lr {args.lr:g}): {time.perf_counter() - t2:.1f} s"
        )
        for r in v["rows"]:
            print(
                f"  {r['tasks']:<20s} {r['task']:<6s} loss est {r['est_loss']:.4f} true {r['true_loss']:.4f} "
                f"acc est {r['est_accuracy']:.3f} true {r['true_accuracy']:.3f} (ft epoch {r['ft_epoch']})"
            )
        print("  mean relative error per lambda (loss, accuracy):")
        for lam, e in v["per_lambda"].items():
            print(f"    {lam:>8s}: {e['mean_rel_err_loss']:.4f}  {e['mean_rel_err_accuracy']:.4f}")
        print(
            f"  compute ratio {v['compute_ratio']:.1f}x (amortised {v['compute_ratio_amortised']:.1f}x); "
            f"estimation {v['estimation_seconds']:.1f} s, fine-tunes {v['finetune_seconds']:.1f} s"
        )


if __name__ == "__main__":
    main()
