"""Benchmark of the Stage-1a gradient pass on random-weight Llama-architecture models.

Side by side, on the same random-token batches (sequence length --seq-len, LoRA rank 4 on q, k, v):
  (a) ours:  one forward + ONE backward of sum_i f_i per batch of --batch-size, hook-based per-example
             LoRA-B gradients, projected to d dims with the block-generated sketch on the device (in groups
             of >= --project-rows examples, as the stage does);
  (b) naive: as the reference does it: batch --naive-batch-size (8), one forward, then a Python loop of
             torch.autograd.grad(f_i, all LoRA params, retain_graph=True), each gradient flattened to a
             float32 numpy vector on the CPU and multiplied by a dense D x d float64 Rademacher matrix
             held in host RAM;
  (c) plain: a LoRA training forward + backward (answer-token cross-entropy, A and B trainable) of the
             same batches at --batch-size (no optimizer step).
Prints examples/s, the ratios ours/naive and plain/ours, and peak memory (torch.cuda.max_memory_allocated
on GPU, peak RSS on CPU, reset before each method where the OS allows it).

    python bench/gradients.py --shape smollm2 --examples 512                    # GPU: bf16 by default
    python bench/gradients.py --shape llama1b --examples 512
    python bench/gradients.py --shape tiny --examples 64 --device cpu --dtype fp32
    python bench/gradients.py --shape smollm2 --examples 16 --batch-size 8 --seq-len 128   # small CPU check
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.ml.affinity.gradients import (  # noqa: E402
    BufferedProjection,
    LoraGradCapture,
    log_odds,
    lora_grad_only,
    spec_for,
)
from shared.ml.affinity.projection import Projector  # noqa: E402
from shared.ml.encoding import Batch  # noqa: E402
from shared.ml.models import answer_logits, attach_lora, lora_state  # noqa: E402
from shared.ml.training.costs import peak_memory, reset_peak_memory, synchronize  # noqa: E402

SHAPES = {
    # SmolLM2-135M
    "smollm2": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    # Llama-3.2-1B
    "llama1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1024,
        tie_word_embeddings=False,
    ),
}


# ------------------------------------------------------------------------------------------ memory


def reset_peak(device: torch.device) -> None:
    gc.collect()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak_memory(device)


def peak_bytes(device: torch.device) -> int:
    synchronize(device)
    return peak_memory(device)[0]


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


# ------------------------------------------------------------------------------------------ setup


def build_model(shape: str, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(SHAPES[shape])
    config = LlamaConfig(max_position_embeddings=4096, rms_norm_eps=1e-5, **cfg)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.eval()
    model.requires_grad_(False)
    peft = attach_lora(model, rank=4, seed=seed)  # alpha = 32, q/k/v, B = 0, LoRA weights float32
    peft.eval()
    return peft, config


def make_batches(n: int, batch_size: int, seq_len: int, vocab: int, device: torch.device, seed: int) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.randint(3, vocab, (b, seq_len), generator=g)
        answers = torch.randint(3, vocab, (b,), generator=g)
        out.append(
            Batch(
                ids.to(device),
                torch.ones_like(ids).to(device),
                torch.full((b,), seq_len - 1, device=device),
                torch.zeros(b, dtype=torch.long, device=device),
                answers.to(device),
                [f"x{start + i}" for i in range(b)],
                ["rand"] * b,
            )
        )
    return out


# ------------------------------------------------------------------------------------------ methods


def run_ours(model, batches, dim: int, seed: int, device: torch.device, project_rows: int) -> torch.Tensor:
    spec = spec_for(model, seed, dim)
    projector = Projector(spec, device)
    outs = []
    with lora_grad_only(model), LoraGradCapture(model) as cap:
        buffer = BufferedProjection(model, cap, projector, project_rows)
        for batch in batches:
            outs.extend(proj for _, _, proj in buffer.add(batch, batch.example_ids))
        outs.append(buffer.flush()[2])
    synchronize(device)
    return torch.cat(outs)


def naive_projection(D: int, dim: int, seed: int) -> np.ndarray:
    np.random.seed(seed)  # the reference: legacy global RNG, randint(0, 2) -> 2u - 1, float64, / sqrt(d)
    P = np.random.randint(0, 2, size=(D, dim)).astype(np.float64)
    P = (2 * P - 1) / math.sqrt(dim)
    return P


def run_naive(model, batches, P: np.ndarray) -> np.ndarray:
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    rows = []
    try:
        for batch in batches:
            with torch.enable_grad():
                f = log_odds(answer_logits(model, batch), batch.answer_tokens)
                for i in range(len(batch)):
                    grads = torch.autograd.grad(f[i], params, retain_graph=i < len(batch) - 1)
                    flat = torch.cat([g.reshape(-1) for g in grads]).float().cpu().numpy()
                    rows.append(flat @ P)
    finally:
        for p, s in zip(params, saved, strict=False):
            p.requires_grad_(s)
    return np.stack(rows)


def run_plain(model, batches, device: torch.device) -> None:
    params = list(lora_state(model).values())
    for p in params:
        p.requires_grad_(True)
    try:
        for batch in batches:
            with torch.enable_grad():
                logits = answer_logits(model, batch)
                loss = torch.nn.functional.cross_entropy(logits, batch.answer_tokens)
                loss.backward()
            for p in params:
                p.grad = None
        synchronize(device)
    finally:
        for p in params:
            p.requires_grad_(False)


def timed(fn, device: torch.device, n_examples: int, label: str) -> dict:
    reset_peak(device)
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    seconds = time.perf_counter() - t0
    peak = peak_bytes(device)
    rate = n_examples / seconds
    print(f"  {label:<44s} {rate:10.2f} examples/s   {seconds:8.2f} s   peak {gib(peak)}", flush=True)
    return {"rate": rate, "seconds": seconds, "peak": peak, "result": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--naive-batch-size", type=int, default=8)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--examples", type=int, default=256, help="examples timed for ours and plain")
    ap.add_argument("--naive-examples", type=int, default=None, help="examples timed for naive (default: --examples)")
    ap.add_argument("--dim", type=int, default=400)
    ap.add_argument("--project-rows", type=int, default=64, help="examples buffered per projection (as in the stage)")
    ap.add_argument("--extra-dims", type=str, default="", help="comma-separated d values: peak memory of ours vs d")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model, config = build_model(args.shape, dtype, device, args.seed)
    spec = spec_for(model, args.seed, args.dim)
    d_all = sum(p.numel() for p in lora_state(model).values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"shape={args.shape} ({config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}) "
        f"dtype={dtype_name} device={name}"
    )
    print(
        f"seq_len={args.seq_len} batch={args.batch_size} naive batch={args.naive_batch_size} d={args.dim} "
        f"LoRA r=4 q,k,v: D_B={spec.total:,} (ours projects B only; A-grads are 0 at B=0), D_A+B={d_all:,} (naive)"
    )

    warm = make_batches(
        min(args.batch_size, args.examples), args.batch_size, args.seq_len, config.vocab_size, device, 99
    )
    batches = make_batches(args.examples, args.batch_size, args.seq_len, config.vocab_size, device, args.seed)
    run_ours(model, warm, args.dim, args.seed, device, args.project_rows)
    run_plain(model, warm, device)

    res = {}
    res["ours"] = timed(
        lambda: run_ours(model, batches, args.dim, args.seed, device, args.project_rows),
        device,
        args.examples,
        f"(a) ours, hooks + sketch, batch {args.batch_size}",
    )
    res["plain"] = timed(
        lambda: run_plain(model, batches, device), device, args.examples, f"(c) plain fwd+bwd, batch {args.batch_size}"
    )
    for extra in [int(x) for x in args.extra_dims.split(",") if x.strip()]:
        timed(
            lambda extra=extra: run_ours(model, batches[:2], extra, args.seed, device, args.project_rows),
            device,
            sum(len(b) for b in batches[:2]),
            f"    ours at d={extra} (memory check)",
        )
    if not args.skip_naive:
        n_naive = args.naive_examples or args.examples
        t0 = time.perf_counter()
        P = naive_projection(d_all, args.dim, args.seed)
        print(
            f"  (dense projection {P.shape[0]:,} x {P.shape[1]} float64 = {gib(P.nbytes)} in host RAM, built in "
            f"{time.perf_counter() - t0:.1f} s, not timed)"
        )
        nb = make_batches(n_naive, args.naive_batch_size, args.seq_len, config.vocab_size, device, args.seed)
        run_naive(model, nb[:1], P)  # warm-up
        res["naive"] = timed(
            lambda: run_naive(model, nb, P),
            device,
            n_naive,
            f"(b) naive per-example loop, batch {args.naive_batch_size}",
        )
        del P
    print()
    ours, plain = res["ours"]["rate"], res["plain"]["rate"]
    print(
        f"ours / naive        : {ours / res['naive']['rate']:.1f}x"
        if "naive" in res
        else "ours / naive        : (skipped)"
    )
    print(
        f"plain / ours        : {plain / ours:.2f}x  (ours is {'within' if plain / ours <= 1.5 else 'NOT within'} 1.5x of plain fwd+bwd)"
    )
    print(
        f"peak memory         : ours {gib(res['ours']['peak'])}, plain {gib(res['plain']['peak'])}"
        + (f", naive {gib(res['naive']['peak'])}" if "naive" in res else "")
    )
    if device.type == "cpu":
        print("(CPU peak = process peak RSS incl. the model; naive includes its dense P)")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
