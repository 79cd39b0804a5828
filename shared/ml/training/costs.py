"""Cost accounting: tokens, analytic FLOPs, peak memory and wall time of every training/eval step.

FLOP formula (stated once, used everywhere; multiply-add = 2 FLOPs):

    N_body  = sum(in * out) over the frozen Linear layers of the decoder (attention + MLP; embeddings
              are lookups and the LM head is counted separately because it only runs at the answer position)
    N_lora  = sum(r * (in + out)) over the LoRA-adapted layers
    tokens  = non-pad tokens of a batch,  rows = batch rows,  T_i = length of row i
    attn    = 4 * n_layers * d_attn * sum_i T_i^2 / 2 (QK^T and AV, causal half)

    forward  = 2 * (N_body + N_lora) * tokens + attn + 2 * d_model * V * rows
    backward = 2 * N_body * tokens + attn            (activation gradients through the frozen base;
               + 4 * N_lora * tokens                  no weight gradients for frozen weights)
               + 2 * d_model * V * rows               (gradient through the frozen LM head)
    train step = forward + backward (~2x forward);  evaluation / scoring = forward only.

Peak memory: torch.cuda.max_memory_allocated on CUDA (reset per stage); on CPU the process peak
RSS (VmHWM, reset per stage through /proc/self/clear_refs where Linux allows it, else the lifetime peak).
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

FLOP_FORMULA = (
    "forward = 2*(N_body+N_lora)*tokens + 2*n_layers*d_attn*sum(T_i^2) + 2*d_model*V*rows; "
    "backward = 2*N_body*tokens + 2*n_layers*d_attn*sum(T_i^2) + 4*N_lora*tokens + 2*d_model*V*rows "
    "(frozen base: activation gradients only); train step = forward + backward; evaluation = forward. "
    "N_body = sum(in*out) of the decoder's frozen Linear layers, N_lora = sum(r*(in+out)) of the LoRA layers."
)


@dataclass
class ModelShape:
    """The numbers the FLOP formula needs, read from the model's modules (works for 4-bit layers too)."""

    n_body: int
    n_lora_per_adapter: int
    n_layers: int
    d_model: int
    d_attn: int
    vocab: int

    @classmethod
    def from_model(
        cls, model: Any, rank: int = 4, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    ) -> ModelShape:
        n_body = 0
        n_lora = 0
        head = model.get_output_embeddings()
        for name, module in model.named_modules():
            if "lora_" in name or module is head:
                continue
            in_f = getattr(module, "in_features", None)
            out_f = getattr(module, "out_features", None)
            if in_f is None or out_f is None or not isinstance(module, torch.nn.Linear):
                continue
            n_body += int(in_f) * int(out_f)
            leaf = name.removesuffix(".base_layer").rsplit(".", 1)[-1]  # PEFT wraps targets in .base_layer
            if leaf in targets:
                n_lora += rank * (int(in_f) + int(out_f))
        config = model.config
        n_layers = int(getattr(config, "num_hidden_layers", 0))
        d_model = int(getattr(config, "hidden_size", 0))
        heads = int(getattr(config, "num_attention_heads", 1))
        head_dim = int(getattr(config, "head_dim", None) or d_model // max(heads, 1))
        vocab = int(head.weight.shape[0]) if head is not None else int(getattr(config, "vocab_size", 0))
        return cls(n_body, n_lora, n_layers, d_model, heads * head_dim, vocab)

    def forward_flops(self, tokens: int, rows: int, sum_sq_len: int, lora: bool = True) -> float:
        n = self.n_body + (self.n_lora_per_adapter if lora else 0)
        return (
            2.0 * n * tokens + 2.0 * self.n_layers * self.d_attn * sum_sq_len + 2.0 * self.d_model * self.vocab * rows
        )

    def backward_flops(self, tokens: int, rows: int, sum_sq_len: int) -> float:
        return (
            2.0 * self.n_body * tokens
            + 2.0 * self.n_layers * self.d_attn * sum_sq_len
            + 4.0 * self.n_lora_per_adapter * tokens
            + 2.0 * self.d_model * self.vocab * rows
        )


def batch_shape(attention_mask: torch.Tensor) -> tuple[int, int, int]:
    """(non-pad tokens, rows, sum of squared row lengths) of a batch."""
    lengths = attention_mask.sum(-1).to(torch.int64)
    return int(lengths.sum()), int(lengths.numel()), int((lengths * lengths).sum())


@dataclass
class Cost:
    """Accumulated cost of one unit of work (an adapter, a scoring pass, a stage)."""

    train_tokens: int = 0
    train_rows: int = 0
    train_flops: float = 0.0
    eval_tokens: int = 0
    eval_rows: int = 0
    eval_flops: float = 0.0
    steps: int = 0
    wall_seconds: float = 0.0
    peak_memory_bytes: int = 0
    peak_memory_kind: str = ""

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.eval_flops

    def add_train(self, shape: ModelShape, attention_mask: torch.Tensor) -> None:
        tokens, rows, sq = batch_shape(attention_mask)
        self.train_tokens += tokens
        self.train_rows += rows
        self.train_flops += shape.forward_flops(tokens, rows, sq) + shape.backward_flops(tokens, rows, sq)
        self.steps += 1

    def add_eval(self, shape: ModelShape, attention_mask: torch.Tensor, lora: bool = True) -> None:
        tokens, rows, sq = batch_shape(attention_mask)
        self.eval_tokens += tokens
        self.eval_rows += rows
        self.eval_flops += shape.forward_flops(tokens, rows, sq, lora=lora)

    def merge(self, other: Cost) -> Cost:
        """Sum of work; wall time adds, peak memory takes the max."""
        return Cost(
            self.train_tokens + other.train_tokens,
            self.train_rows + other.train_rows,
            self.train_flops + other.train_flops,
            self.eval_tokens + other.eval_tokens,
            self.eval_rows + other.eval_rows,
            self.eval_flops + other.eval_flops,
            self.steps + other.steps,
            self.wall_seconds + other.wall_seconds,
            max(self.peak_memory_bytes, other.peak_memory_bytes),
            self.peak_memory_kind or other.peak_memory_kind,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_flops"] = self.total_flops
        out["wall_seconds"] = round(self.wall_seconds, 3)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cost:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in names})


def sum_costs(costs: list[Cost]) -> Cost:
    total = Cost()
    for c in costs:
        total = total.merge(c)
    return total


# ---------------------------------------------------------------- peak memory and wall time


def _cpu_peak_rss() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def synchronize(device: torch.device | None = None) -> None:
    """Wait for the device's queued work (a no-op on a CPU), so that a wall-clock reading covers it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device | None = None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_cpu_peak()


def peak_memory(device: torch.device | None = None) -> tuple[int, str]:
    """(bytes, kind): CUDA max allocated on a GPU device, else the process peak RSS."""
    if device is not None and device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    return _cpu_peak_rss(), "peak_rss"


@dataclass
class Meter:
    """Context manager measuring wall time and peak memory of a block; fills `cost`."""

    device: torch.device | None = None
    cost: Cost = field(default_factory=Cost)
    _start: float = 0.0

    def __enter__(self) -> Meter:
        reset_peak_memory(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cost.wall_seconds += time.perf_counter() - self._start
        mem, kind = peak_memory(self.device)
        self.cost.peak_memory_bytes = max(self.cost.peak_memory_bytes, mem)
        self.cost.peak_memory_kind = kind


@dataclass
class StageClock:
    """Wall time and peak memory per named stage of a run (recorded in every report)."""

    device: torch.device | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)

    def stage(self, name: str) -> _StageBlock:
        return _StageBlock(self, name)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dict(self.stages)


class _StageBlock:
    def __init__(self, clock: StageClock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> _StageBlock:
        reset_peak_memory(self.clock.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        mem, kind = peak_memory(self.clock.device)
        prev = self.clock.stages.get(self.name, {"wall_seconds": 0.0, "peak_memory_bytes": 0})
        self.clock.stages[self.name] = {
            "wall_seconds": round(prev["wall_seconds"] + time.perf_counter() - self.start, 3),
            "peak_memory_bytes": max(prev["peak_memory_bytes"], mem),
            "peak_memory_kind": kind,
        }


def cpu_threads() -> int:
    return torch.get_num_threads() or (os.cpu_count() or 1)
