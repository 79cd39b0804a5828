"""Inference benchmark: multi-LoRA engine vs base vs plain PEFT, and adapter load / switch latency.

Measures prefill throughput (rows/s; a forward over --batch rows of --seq tokens with the logits of the
last position, i.e. what classification needs) for
  (a) the base alone,
  (b) one adapter,
  (c) a 3-adapter ensemble under mixed-task traffic (one member per row, rows cycle over 3 adapters),
  (d) 2 members per row (every row runs twice, with two different adapters; rows/s counts rows),
with the chorus engine (gathered per-row LoRA weights) and with plain PEFT (set_adapter for (b),
`adapter_names` mixed batches for (c) and (d)); then adapter cold-load latency (safetensors folder ->
verified -> in a device slot) and warm-switch latency (host cache -> device slot), p50/p99, plus PEFT's
load_adapter / set_adapter for comparison.

    python bench/inference.py --model smollm2-135m --quantization nf4 --batch 8 --seq 64          # CPU
    python bench/inference.py --shape llama1b --quantization nf4 --batch 64 --seq 128             # GPU
    python bench/inference.py --shape llama1b --quantization none --dtype bf16 --json out.json

--model loads a real model (smollm2-135m, tiny-llama, or a local folder); --shape builds a random-weight
Llama of a known shape (llama1b = Llama-3.2-1B, smollm2 = SmolLM2-135M) instead. Runs on CUDA when available.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.ml.training.costs import synchronize  # noqa: E402

SHAPES = {
    "llama1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "smollm2": dict(
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        intermediate_size=1536,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_TEMP_DIRS: list[Path] = []
TARGET_NAMES = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    """(model, ModelInfo) for --model or --shape."""
    from shared.ml.models import Base, ModelInfo, quiet_libraries

    if args.shape is None:
        base = Base.load(args.model, args.quantization, device)
        if base.model.dtype != dtype and args.quantization == "none":
            base.model.to(dtype)
        return base.model, base.info
    quiet_libraries()
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[args.shape], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    info = ModelInfo(f"random-{args.shape}", f"seed{args.seed}", args.quantization, str(dtype).removeprefix("torch."))
    torch.manual_seed(args.seed)
    if args.quantization == "none":
        with torch.device(device):
            model = LlamaForCausalLM(config).to(dtype)
        return model.eval().requires_grad_(False), info
    # NF4: write the random weights once and load them the way the service does (bitsandbytes quantizes on load)
    folder = Path(tempfile.mkdtemp(prefix=f"chorus-bench-{args.shape}-"))
    _TEMP_DIRS.append(folder)
    with torch.device(device if device.type == "cuda" else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        dtype=dtype,
        quantization_config=quant,
        device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"},
    )
    return model.eval().requires_grad_(False), info


def forward(model: Any, ids: torch.Tensor, mask: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False, **kwargs).logits


def timed(fn: Any, device: torch.device, warmup: int, iters: int) -> list[float]:
    return interleaved({"x": fn}, device, warmup, iters)["x"]


def interleaved(fns: dict[str, Any], device: torch.device, warmup: int, iters: int) -> dict[str, list[float]]:
    """Time several forwards round-robin (one of each per round), so drifting machine load (other jobs,
    clocks) hits every case alike and their ratios stay meaningful."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        synchronize(device)
        for _ in range(iters):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                synchronize(device)
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, tiny-llama or a local HF folder")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="random-weight model of this shape")
    parser.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="compute dtype (default bf16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch", type=int, default=64, help="rows (or (row, member) pairs) per forward")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q,k,v,o", help="comma-separated: q,k,v,o,gate,up,down")
    parser.add_argument("--adapters", type=int, default=3, help="adapters in the mixed ensemble")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--loads", type=int, default=20, help="cold loads / warm switches to time")
    parser.add_argument("--mode", choices=["auto", "stacked", "bmm"], default="auto", help="engine gather mode")
    parser.add_argument("--no-peft", action="store_true", help="skip the plain-PEFT comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    from shared.ml.serving.multi_lora import MultiLoRAEngine
    from shared.ml.serving.synthetic import write_random_adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    targets = tuple(TARGET_NAMES.get(t.strip(), t.strip()) for t in args.targets.split(",") if t.strip())
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, info = build_model(args, device, dtype)
    print(
        f"model {info.name} ({args.quantization}, {dtype}) on {device}, loaded in {time.perf_counter() - t0:.1f} s; "
        f"batch {args.batch} x {args.seq} tokens, LoRA rank {args.rank} on {','.join(targets)}",
        flush=True,
    )
    if device.type == "cuda":
        print(f"gpu: {torch.cuda.get_device_name(device)}", flush=True)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, vocab, (args.batch, args.seq), generator=gen).to(device)
    mask = torch.ones_like(ids)
    B = args.batch
    results: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(device),
        "dtype": str(dtype),
        "model": info.name,
    }
    rows: list[tuple[str, str, float, float]] = []  # (impl, case, rows/s, ms per forward)

    def record(impl: str, case: str, times: list[float], rows_per_forward: float) -> float:
        med = statistics.median(times)
        rate = rows_per_forward / med
        rows.append((impl, case, rate, med * 1000))
        results.setdefault(impl, {})[case] = {
            "rows_per_s": rate,
            "ms_per_forward": med * 1000,
            "rows_per_forward": rows_per_forward,
        }
        print(f"  {impl:6s} {case:28s} {rate:10.1f} rows/s   {med * 1000:9.2f} ms/forward", flush=True)
        return rate

    # ---- (a) base, plain HF forward
    record(
        "base", "(a) base alone", timed(lambda: forward(model, ids, mask), device, max(2, args.warmup), args.iters), B
    )

    # ---- adapters on disk
    workdir = Path(tempfile.mkdtemp(prefix="chorus-bench-adapters-"))
    _TEMP_DIRS.append(workdir)
    n_ad = max(args.adapters, 3)
    folders = []
    for i in range(n_ad + args.loads):
        folder = workdir / f"ad{i}"
        write_random_adapter(
            folder, model, info, name=f"ad{i}", rank=args.rank, targets=targets, seed=1000 + i, b_scale=0.02
        )
        folders.append(folder)

    # ---- the engine
    engine = MultiLoRAEngine(
        model, max_slots=max(8, n_ad + 2), max_rank=args.rank, targets=targets, dtype=dtype, mode=args.mode
    )
    slots = []
    for i in range(n_ad):
        engine.load_folder(f"ad{i}", folders[i], info)
        slots.append(engine.activate(f"ad{i}"))

    def eng(row_slots: list[int]) -> Any:
        def run() -> Any:
            with engine.route(row_slots):
                return forward(model, ids, mask)

        return run

    k = args.adapters
    mixed = [slots[r % k] for r in range(B)]
    two = [slots[(r // 2 + (r % 2)) % k] for r in range(B)]  # row r//2 through adapters j and j+1
    cases = {
        "(a) base (no adapter rows)": (eng([-1] * B), B),
        "(b) one adapter": (eng([slots[0]] * B), B),
        f"(c) {k} adapters mixed": (eng(mixed), B),
        "(d) 2 members per row": (eng(two), B / 2),
    }
    times = interleaved({name: fn for name, (fn, _) in cases.items()}, device, args.warmup, args.iters)
    rates = {name: record("engine", name, times[name], cases[name][1]) for name in cases}
    b_rate, c_rate, d_rate = rates["(b) one adapter"], rates[f"(c) {k} adapters mixed"], rates["(d) 2 members per row"]
    results["engine"]["c_over_b"] = c_rate / b_rate
    results["engine"]["d_pairs_over_b"] = 2 * d_rate / b_rate

    # ---- cold load (disk -> verified -> slot) and warm switch (host cache -> slot)
    cold, cold_read, warm, hit = [], [], [], []
    for i in range(args.loads):
        key = f"cold{i}"
        synchronize(device)
        start = time.perf_counter()
        engine.load_folder(key, folders[n_ad + i], info)
        mid = time.perf_counter()
        engine.activate(key)
        synchronize(device)
        end = time.perf_counter()
        cold.append(end - start)
        cold_read.append(mid - start)
        engine.forget(key)
    engine.load_folder("warm", folders[n_ad], info)
    for _ in range(max(args.loads, 20)):
        engine.evict("warm") if engine.slot_of("warm") is not None else None
        synchronize(device)
        start = time.perf_counter()
        engine.activate("warm")
        synchronize(device)
        warm.append(time.perf_counter() - start)
        start = time.perf_counter()
        engine.activate("warm")
        hit.append(time.perf_counter() - start)
    lat = {
        "cold_load_ms": {"p50": percentile(cold, 0.5) * 1e3, "p99": percentile(cold, 0.99) * 1e3},
        "cold_read_verify_ms": {"p50": percentile(cold_read, 0.5) * 1e3, "p99": percentile(cold_read, 0.99) * 1e3},
        "warm_switch_ms": {"p50": percentile(warm, 0.5) * 1e3, "p99": percentile(warm, 0.99) * 1e3},
        "resident_hit_ms": {"p50": percentile(hit, 0.5) * 1e3, "p99": percentile(hit, 0.99) * 1e3},
        "adapter_mb": sum(f.stat().st_size for f in folders[0].iterdir()) / 1e6,
    }
    results["engine"]["latency"] = lat
    print(
        f"  engine cold load     p50 {lat['cold_load_ms']['p50']:.2f} ms  p99 {lat['cold_load_ms']['p99']:.2f} ms "
        f"(read+verify p50 {lat['cold_read_verify_ms']['p50']:.2f} ms; adapter {lat['adapter_mb']:.2f} MB)"
    )
    print(
        f"  engine warm switch   p50 {lat['warm_switch_ms']['p50']:.3f} ms  p99 {lat['warm_switch_ms']['p99']:.3f} ms "
        f"(resident hit p50 {lat['resident_hit_ms']['p50'] * 1000:.1f} us)",
        flush=True,
    )
    engine.unwrap()

    # ---- plain PEFT for comparison
    if not args.no_peft:
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(folders[0]), adapter_name="ad0")
        for i in range(1, n_ad):
            peft_model.load_adapter(str(folders[i]), adapter_name=f"ad{i}")
        peft_model.eval()
        names = [f"ad{i}" for i in range(n_ad)]
        peft_model.set_adapter("ad0")
        mixed_names = [names[r % k] for r in range(B)]
        two_names = [names[(r // 2 + (r % 2)) % k] for r in range(B)]

        def peft_base() -> Any:
            with peft_model.disable_adapter():
                return forward(peft_model, ids, mask)

        cases = {
            "(a) base (disable_adapter)": (peft_base, B),
            "(b) one adapter (set_adapter)": (lambda: forward(peft_model, ids, mask), B),
            f"(c) {k} adapters adapter_names": (lambda: forward(peft_model, ids, mask, adapter_names=mixed_names), B),
            "(d) 2 members adapter_names": (lambda: forward(peft_model, ids, mask, adapter_names=two_names), B / 2),
        }
        times = interleaved({name: fn for name, (fn, _) in cases.items()}, device, args.warmup, args.iters)
        prates = {name: record("peft", name, times[name], cases[name][1]) for name in cases}
        pb, pc = prates["(b) one adapter (set_adapter)"], prates[f"(c) {k} adapters adapter_names"]
        results["peft"]["c_over_b"] = pc / pb
        loads, switches = [], []
        for i in range(min(args.loads, 10)):
            synchronize(device)
            start = time.perf_counter()
            peft_model.load_adapter(str(folders[n_ad + i]), adapter_name=f"p{i}")
            synchronize(device)
            loads.append(time.perf_counter() - start)
            start = time.perf_counter()
            peft_model.set_adapter(f"p{i}" if i % 2 else "ad0")
            synchronize(device)
            switches.append(time.perf_counter() - start)
        results["peft"]["latency"] = {
            "load_adapter_ms": {"p50": percentile(loads, 0.5) * 1e3, "p99": percentile(loads, 0.99) * 1e3},
            "set_adapter_ms": {"p50": percentile(switches, 0.5) * 1e3, "p99": percentile(switches, 0.99) * 1e3},
        }
        print(
            f"  peft   load_adapter  p50 {percentile(loads, 0.5) * 1e3:.2f} ms; set_adapter p50 "
            f"{percentile(switches, 0.5) * 1e3:.2f} ms",
            flush=True,
        )

    base_rate = results["engine"]["(a) base (no adapter rows)"]["rows_per_s"]
    print(
        "\nsummary (rows/s; relative to the engine's one-adapter figure (b), and to the base measured in the same "
        "interleaved rounds)"
    )
    for impl, case, rate, _ms in rows:
        print(f"  {impl:6s} {case:32s} {rate:10.1f}  {rate / b_rate:5.2f}x (b)  {rate / base_rate:4.2f}x base")
    if not args.no_peft:
        print(f"  peft (c)/(b): {results['peft']['c_over_b']:.2f}x")
    print(
        f"  goal (c) >= 0.8 x (b): {results['engine']['c_over_b']:.2f}x "
        f"{'MET' if results['engine']['c_over_b'] >= 0.8 else 'NOT MET'}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    try:
        main()
    finally:  # the random weights / adapters written to temp folders
        import shutil

        for folder in _TEMP_DIRS:
            shutil.rmtree(folder, ignore_errors=True)
