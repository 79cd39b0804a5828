"""Where the wall time of Stage 1 goes on real data, per batch size (the compute ratio's two sides).

On the real model and the real rows of --tasks (length-sorted batches, as the stage cuts them), prints
rows/s and seconds per batch of:
  grad     the stage's gradient pass (gradient_batches: hooks, one backward, sketch projection, shard writes)
  plain    a LoRA training forward + backward of the same batches (A and B trainable, no hooks, no step)
  forward  a no-grad forward of the same batches (what the estimate forwards cost per row)
and a plain fine-tune (finetune(): AdamW, shuffled batches mixing the tasks) at --ft-batch-size, the
ground truth's cost per step. --profile adds a torch.profiler table of a few gradient batches.

    python bench/stage1_costs.py --tasks sst2,mr,cr,subj,rte,cb --batch-sizes 128,512      # GPU
    python bench/stage1_costs.py --tasks sst2,mr --max-train 32 --batch-sizes 16 --ft-steps 4  # CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.ml.affinity.finetune import finetune  # noqa: E402
from shared.ml.affinity.params import AffinityParams  # noqa: E402
from shared.ml.affinity.runtime import Runtime  # noqa: E402
from shared.ml.affinity.store import gradient_batches, plan_for  # noqa: E402
from shared.ml.encoding import collate  # noqa: E402
from shared.ml.models import answer_logits, lora_state  # noqa: E402
from shared.ml.training.costs import peak_memory, reset_peak_memory, synchronize  # noqa: E402


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    t = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t


def plain_pass(rt: Runtime, rows: Any, batches: list[list[int]], train: bool) -> None:
    model, pad = rt.model, rt.tokenizer.pad_token_id or 0
    params = list(lora_state(model).values())
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(train)
    try:
        for b in batches:
            batch = collate([rows.items[i] for i in b], pad).to(rt.device)
            if train:
                logits = answer_logits(model, batch)
                torch.nn.functional.cross_entropy(logits, batch.answer_tokens).backward()
                for p in params:
                    p.grad = None
            else:
                with torch.no_grad():
                    answer_logits(model, batch)
    finally:
        for p, flag in zip(params, saved, strict=False):
            p.requires_grad_(flag)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,mr,cr,subj,rte,cb")
    ap.add_argument("--max-train", type=int, default=500)
    ap.add_argument("--batch-sizes", default="32,128,512")
    ap.add_argument("--ft-batch-size", type=int, default=8)
    ap.add_argument("--ft-steps", type=int, default=60)
    ap.add_argument("--dim", type=int, default=400)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    params = AffinityParams(
        model=args.model,
        tasks=args.tasks.split(","),
        max_train=args.max_train,
        dim=args.dim,
        init="base",
        output="choice",
        device=args.device,
    )
    rt = Runtime.load(params)
    rt_rows = rt.rows("train", args.max_train)
    dev = rt.device
    tokens = sum(len(it.input_ids) for it in rt_rows.items)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                "rows": len(rt_rows),
                "tokens": tokens,
                "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            }
        )
    )
    with tempfile.TemporaryDirectory(prefix="stage1-costs-") as tmp:  # the gradient shards written by the runs
        measure(args, rt, rt_rows, Path(tmp))


def measure(args: argparse.Namespace, rt: Runtime, rt_rows: Any, work: Path) -> None:
    """Print the per-batch-size rows, the fine-tune row and (--profile) the profiler tables."""
    dev = rt.device
    auto = rt.batching  # the device's defaults; each run below keeps its token cap and sets the rows
    rt.batching = replace(auto, rows=32)
    plain_pass(rt, rt_rows, plan_for(rt, rt_rows)[:2], True)  # warm-up
    for bs in [int(x) for x in args.batch_sizes.split(",")]:
        rt.batching = replace(auto, rows=bs)
        plan = plan_for(rt, rt_rows)
        reset_peak_memory(dev)
        row = {"batch_size": bs, "batch_tokens": rt.batching.tokens, "batches": len(plan)}
        row["grad_s"] = timed(
            lambda bs=bs, plan=plan: gradient_batches(rt, rt_rows, work / f"g{bs}", 0, len(plan)), dev
        )
        row["grad_peak_gib"] = round(peak_memory(dev)[0] / 2**30, 2)
        row["plain_s"] = timed(lambda plan=plan: plain_pass(rt, rt_rows, plan, True), dev)
        row["forward_s"] = timed(lambda plan=plan: plain_pass(rt, rt_rows, plan, False), dev)
        for k in ("grad", "plain", "forward"):
            row[f"{k}_rows_per_s"] = round(len(rt_rows) / row[f"{k}_s"], 1)
            row[f"{k}_s_per_batch"] = round(row[f"{k}_s"] / len(plan), 4)
        print(json.dumps(row))

    n_ft = min(len(rt_rows), args.ft_steps * args.ft_batch_size)
    items = rt_rows.items[:: max(1, len(rt_rows) // n_ft)][:n_ft]
    theta0 = rt.theta0()
    res = finetune(rt, items, {}, 1, 5e-4, args.ft_batch_size, 0, select="last")
    rt.reset_adapter(theta0)
    print(
        json.dumps(
            {
                "finetune_batch_size": args.ft_batch_size,
                "steps": res.steps,
                "seconds": round(res.seconds, 3),
                "s_per_step": round(res.seconds / res.steps, 4),
                "rows_per_s": round(len(items) / res.seconds, 1),
            }
        )
    )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        rt.batching = replace(auto, rows=128)
        plan = plan_for(rt, rt_rows)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=acts) as prof:
            gradient_batches(rt, rt_rows, work / "profiled", 0, min(4, len(plan)))
            synchronize(dev)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
        if dev.type == "cuda":
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=40))


if __name__ == "__main__":
    main()
