"""Training throughput: a plain PEFT + bitsandbytes QLoRA loop vs our single- and multi-adapter trainers.

All on the same rows (the seeded subsamples of --tasks), the same NF4 base, LoRA shape, batch size and
epochs, side by side in one run:

  peft_loop  what a user writes from the PEFT docs: NF4 base through BitsAndBytesConfig,
             prepare_model_for_kbit_training, get_peft_model, AdamW, a plain loop over shuffled batches of
             --batch-size rows, loss = cross-entropy of the answer token (full logits, loss.item() logged
             every step); validation accuracy measured once after the last epoch
  single     train_many with one spec (the fused trainer at K = 1: no per-step host syncs)
  multi      train_many with K specs (each on all the tasks, seeds 0..K-1): TOTAL rows/s over the K adapters

--our-batch-size lets our trainers take larger steps than the anchor (the PEFT loop keeps --batch-size and --lr),
with the learning rate scaled by the square-root rule unless --our-lr is given; the accuracy columns show whether
the larger batch reaches the anchor's accuracy in the same epochs. --profile FILE writes a torch.profiler table of
~8 steps of the single trainer and prints its host vs device self time.

rows_per_s counts training rows per second of training (our trainers' per-epoch validation excluded; with it:
rows_per_s_with_eval); val_accuracy is the mean over tasks (ours: the selected epoch; multi: mean over the K
adapters); peak_memory_bytes is torch.cuda.max_memory_allocated on a GPU (process peak RSS on a CPU).

    python bench/training.py --tasks sst2,mr,cr,subj,rte,cb --epochs 2 --batch-size 8 --json training.json
    python bench/training.py --model tiny-llama --device cpu --tasks sst2,cb --max-train 16 --ks 2   # CPU check
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.ml.encoding import collate  # noqa: E402
from shared.ml.evaluate import metrics_from_scores  # noqa: E402
from shared.ml.models import DEFAULT_TARGETS, Base, load_model  # noqa: E402
from shared.ml.training.costs import peak_memory, reset_peak_memory, synchronize  # noqa: E402
from shared.ml.training.dequant import resolve  # noqa: E402
from shared.ml.training.many import AdapterSpec, train_many  # noqa: E402
from shared.ml.training.trainer import TaskData, mean, prepare_tasks, score_split, trainable_4bit  # noqa: E402


def peft_loop(
    args: argparse.Namespace, config: dict[str, Any], data: dict[str, TaskData], device: torch.device
) -> dict:
    """The plain PEFT QLoRA loop; rows/s, peak memory, validation accuracy after the last epoch."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model, tokenizer, info = load_model(args.model, args.quantization, device)
    torch.backends.cuda.enable_cudnn_sdp(True)  # the anchor runs with PyTorch's own kernel choice
    if args.quantization == "nf4":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.peft_checkpointing)
    trainable_4bit(model)  # CPU only: keep bitsandbytes' layers differentiable (no-op on CUDA)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=8 * args.rank,
        target_modules=list(DEFAULT_TARGETS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(args.seed)
    model = get_peft_model(model, lora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rows = [e for d in data.values() for e in d.encodings("train", tokenizer, args.max_length)]
    pad = tokenizer.pad_token_id or 0
    rng = random.Random(args.seed)
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    losses = []
    for _ in range(args.epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        model.train()
        for i in range(0, len(order), args.batch_size):
            batch = collate([rows[j] for j in order[i : i + args.batch_size]], pad).to(device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            answer = logits[torch.arange(len(batch), device=device), batch.last_index].float()
            loss = torch.nn.functional.cross_entropy(answer, batch.answer_tokens)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
    synchronize(device)
    seconds = time.perf_counter() - start
    mem, kind = peak_memory(device)
    model.eval()
    base = Base(model, tokenizer, info)
    acc = mean(
        [
            metrics_from_scores(score_split(model, base, d, "val", config), d.bound.num_choices).accuracy
            for d in data.values()
        ]
    )
    n = len(rows) * args.epochs
    torch.backends.cuda.enable_cudnn_sdp(args.sdpa == "pytorch")  # back to our trainers' setting
    del model, optimizer, base
    _release(device)
    return {
        "rows_per_s": n / seconds,
        "val_accuracy": acc,
        "peak_memory_bytes": mem,
        "peak_memory_kind": kind,
        "train_rows": n,
        "seconds": round(seconds, 3),
        "final_loss": losses[-1],
    }


def ours(base: Base, specs: list[AdapterSpec], config: dict[str, Any], data: dict[str, TaskData], mode: str) -> dict:
    """train_many on `specs`: total rows/s (without and with the per-epoch validation), memory, accuracy."""
    device = base.device
    reset_peak_memory(device)
    synchronize(device)
    start = time.perf_counter()
    trained = train_many(base, specs, config, data, mode=mode)
    synchronize(device)
    seconds = time.perf_counter() - start
    mem, kind = peak_memory(device)
    fused = trained[0].extra["fused"]
    rows = sum(t.cost.train_rows for t in trained)
    train_s = max(fused["wall_seconds"] - fused["eval_seconds"], 1e-9)
    accs = [mean([m.accuracy for m in t.val_metrics.values()]) for t in trained]
    return {
        "k": len(specs),
        "rows_per_s": rows / train_s,
        "rows_per_s_with_eval": rows / seconds,
        "val_accuracy": mean(accs),
        "val_accuracy_each": accs,
        "peak_memory_bytes": mem,
        "peak_memory_kind": kind,
        "train_rows": rows,
        "seconds": round(seconds, 3),
        "eval_seconds": fused["eval_seconds"],
        "best_epochs": [t.best_epoch for t in trained],
    }


def profile_single(
    base: Base, tasks: list[str], config: dict[str, Any], data: dict[str, TaskData], mode: str, path: Path
) -> dict:
    """torch.profiler over ~8 steps of the single-adapter trainer: where the time goes (host vs device).

    Writes the operator table to `path`; returns the wall time of the profiled run and the summed self time
    of the host (CPU) and of the device kernels: a host total far above the device total means launch-bound.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = base.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    per_task = max(1, 8 * int(config["batch_size"]) // len(data))
    small = {n: TaskData(d.name, d.bound, d.train[:per_task], d.val[:2], []) for n, d in data.items()}
    synchronize(base.device)
    start = time.perf_counter()
    with profile(activities=acts) as prof:
        train_many(base, [AdapterSpec("profiled", tasks, seed=0)], {**config, "epochs": 1}, small, mode=mode)
        synchronize(base.device)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    host_us = sum(e.self_cpu_time_total for e in events)
    device_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) if cuda else 0
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(events.table(sort_by=sort, row_limit=40) + "\n")
    return {
        "rows": per_task * len(data),
        "wall_ms": round(wall * 1e3, 1),
        "host_self_ms": round(host_us / 1e3, 1),
        "device_self_ms": round(device_us / 1e3, 1),
        "table": str(path),
    }


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quantization", default="nf4", choices=["nf4", "none"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tasks", default="sst2,mr,cr,subj,rte,cb")
    ap.add_argument("--max-train", type=int, default=500)
    ap.add_argument("--max-val", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument(
        "--our-batch-size",
        type=int,
        default=None,
        help="rows per step of our trainers (default --batch-size; the PEFT loop keeps --batch-size)",
    )
    ap.add_argument(
        "--our-lr",
        type=float,
        default=None,
        help="our trainers' learning rate (default: --lr x sqrt(our batch / --batch-size), the square-root rule)",
    )
    ap.add_argument("--profile", type=Path, default=None, help="write a torch.profiler table of the single trainer")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--ks", default="4,16", help="adapter counts of the multi-adapter runs")
    ap.add_argument("--mode", default="auto", choices=["auto", "stacked", "bmm"])
    ap.add_argument("--batching", default="task", choices=["task", "mixed", "length"])
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--step-tokens", type=int, default=None, help="padded tokens per fused micro-step at most")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--peft-checkpointing",
        action="store_true",
        help="gradient checkpointing in the PEFT loop (prepare_model_for_kbit_training's default)",
    )
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument(
        "--dequantize",
        default="auto",
        choices=["auto", "cached", "per_call"],
        help="our trainers' 4-bit base: dequantised once (cached) or by bitsandbytes in every call",
    )
    ap.add_argument(
        "--sdpa",
        default="chorus",
        choices=["chorus", "pytorch"],
        help="our trainers' attention kernels: chorus (cuDNN attention off, what load_model sets on CUDA) or "
        "PyTorch's own choice (cuDNN on Hopper); the PEFT loop always runs with PyTorch's choice",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    run(args)


def run(args: argparse.Namespace) -> None:
    """Load the model and data, then time the PEFT loop, the single trainer and the multi-adapter trainer."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    tasks = [t for t in args.tasks.split(",") if t]
    ks = [int(k) for k in args.ks.split(",") if k]
    our_batch = args.our_batch_size or args.batch_size
    our_lr = args.our_lr if args.our_lr is not None else args.lr * (our_batch / args.batch_size) ** 0.5
    config = dict(
        epochs=args.epochs,
        lr=our_lr,
        batch_size=our_batch,
        eval_batch_size=args.eval_batch_size,
        rank=args.rank,
        seed=args.seed,
        patience=None,
        max_length=args.max_length,
        max_train=args.max_train,
        max_val=args.max_val,
        max_test=1,
        batching=args.batching,
        batch_tokens=args.batch_tokens,
        step_tokens=args.step_tokens,
        dequantize=args.dequantize,
    )
    base = Base.load(args.model, args.quantization, device)
    torch.backends.cuda.enable_cudnn_sdp(args.sdpa == "pytorch")
    trainable_4bit(base.model)
    data = prepare_tasks(base.tokenizer, tasks, config)
    head = {
        "model": base.info.name,
        "device": str(device),
        "tasks": tasks,
        "train_rows": sum(len(d.train) for d in data.values()),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "our_batch_size": our_batch,
        "our_lr": our_lr,
        "rank": args.rank,
        "mode": args.mode,
        "batching": args.batching,
        "dequantize": resolve(args.dequantize, base.model),
        "sdpa": args.sdpa,
    }
    print(json.dumps(head), flush=True)
    # warm-up (CUDA context, kernels, allocator) on a few rows, not timed
    first = next(iter(data.values()))
    warm = {first.name: TaskData(first.name, first.bound, first.train[:our_batch], first.val[:2], [])}
    train_many(base, [AdapterSpec("warmup", [first.name])], {**config, "epochs": 1}, warm)
    out: dict[str, Any] = {"setup": head}
    if args.profile:
        out["profile"] = profile_single(base, tasks, config, data, args.mode, args.profile)
        print(json.dumps({"profile": out["profile"]}), flush=True)
    if not args.skip_peft:
        out["peft_loop"] = peft_loop(args, config, data, device)
        print(json.dumps({"peft_loop": out["peft_loop"]}), flush=True)
    out["single"] = ours(base, [AdapterSpec("single", tasks, seed=args.seed)], config, data, args.mode)
    print(json.dumps({"single": out["single"]}), flush=True)
    out["multi"] = []
    for k in ks:
        _release(device)
        specs = [AdapterSpec(f"adapter{i}", tasks, seed=args.seed + i) for i in range(k)]
        out["multi"].append(ours(base, specs, config, data, args.mode))
        print(json.dumps({"multi": out["multi"][-1]}), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
