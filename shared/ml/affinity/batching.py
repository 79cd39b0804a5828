"""How many rows (and padded tokens) a Stage-1 batch takes: given in the params, or chosen for the device.

Rows are always length-sorted and cut greedily: a batch closes when it holds `rows` rows or when one more row
would pad it past `tokens` tokens (rows x the longest row; None = no cap). On a CPU the defaults are the small
fixed row counts the stage always had (16 per gradient batch, 64 per forward) and no token cap. On a GPU the
throughput of a small model grows with the batch until the device is busy (kernel launches dominate small
batches: `bench/stage1_costs.py` measured 101 / 505 / 1505 rows/s at 32 / 128 / 512 rows on an H200), so the
rows go up to 512 and a token cap keeps the activations inside a share of the device's memory:

  forward + backward  46 * hidden * layers bytes per token: a bf16 transformer layer with fused attention keeps
                      about 34 * hidden bytes per token for the backward (Korthikanti et al., 2022), plus the
                      float32 copies of the LoRA inputs (q, k, v: 3 x 4 * hidden). SmolLM2-135M: 0.80 MB per
                      token estimated, 0.56 MB measured (32.7 GiB at 58k padded tokens).
  forward only        (24 * hidden + 6 * intermediate) bytes per token, one layer's tensors alive at a time.

The choice depends only on the device's total memory, the process's share of it (setting `gpu_memory_share`,
env CHORUS_GPU_MEMORY_SHARE: 1/N when N processes share one GPU, else each sizes its batches for the whole card and
together they run out of memory) and the model, so every process of a fanned-out run on the same kind of GPU cuts
the same batches; the coordinator passes its explicit values to the pieces anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from shared.config import get_settings

CPU_ROWS = 16
CPU_EVAL_ROWS = 64
GPU_MAX_ROWS = 512
GRAD_MEMORY_SHARE = 0.5  # of the memory the weights leave free, for one gradient batch's activations
EVAL_MEMORY_SHARE = 0.25  # for one forward's


@dataclass(frozen=True)
class Batching:
    rows: int  # gradient pass: rows per batch (at most)
    tokens: int | None  # gradient pass: padded tokens per batch (at most); None = no cap
    eval_rows: int  # estimate forwards: rows per batch (at most)
    eval_tokens: int | None  # estimate forwards: padded tokens per batch (at most)

    def params(self) -> dict[str, int | None]:
        """The explicit param values of this batching (what a coordinator hands to the pieces of its run)."""
        return {"batch_size": self.rows, "batch_tokens": self.tokens, "eval_batch_size": self.eval_rows}


def activation_bytes(config: Any) -> tuple[int, int]:
    """(forward + backward, forward only) activation bytes per token of a decoder (see the module docstring)."""
    h = int(config.hidden_size)
    layers = int(config.num_hidden_layers)
    inter = int(getattr(config, "intermediate_size", None) or 4 * h)
    return 46 * h * layers, 24 * h + 6 * inter


def weight_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def gpu_batching(config: Any, total_bytes: int, weights: int) -> Batching:
    """The defaults on a GPU of `total_bytes` memory holding `weights` bytes of model (see the module docstring)."""
    if not hasattr(config, "hidden_size") or not hasattr(config, "num_hidden_layers"):
        raise ValueError(
            "cannot size batches for a model without hidden_size / num_hidden_layers in its config; "
            "pass batch_size and batch_tokens"
        )
    free = max(total_bytes - weights, total_bytes // 8)
    train, forward = activation_bytes(config)
    # within the bounds params.batch_tokens accepts (16 .. 2**24), as the pieces of a run re-validate it
    return Batching(
        GPU_MAX_ROWS,
        min(2**24, max(16, int(free * GRAD_MEMORY_SHARE) // train)),
        GPU_MAX_ROWS,
        max(16, int(free * EVAL_MEMORY_SHARE) // forward),
    )


def auto_batching(model: Any, device: torch.device) -> Batching:
    """The defaults for `device`: fixed small batches on a CPU, gpu_batching on a GPU."""
    if device.type != "cuda":
        return Batching(CPU_ROWS, None, CPU_EVAL_ROWS, None)
    return gpu_batching(getattr(model, "config", None), device_budget(device), weight_bytes(model))


def device_budget(device: torch.device) -> int:
    """The bytes of `device` this process sizes its batches for: its total memory x `gpu_memory_share`."""
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total * get_settings().gpu_memory_share)


def resolve_batching(params: Any, model: Any, device: torch.device) -> Batching:
    """The params' batch sizes where given, the device's defaults for the rest."""
    auto = auto_batching(model, device)
    return Batching(
        params.batch_size or auto.rows,
        params.batch_tokens if params.batch_tokens is not None else auto.tokens,
        params.eval_batch_size or auto.eval_rows,
        auto.eval_tokens,
    )


def cut_sorted(order: Sequence[int], lengths: Sequence[int], rows: int, tokens: int | None = None) -> list[list[int]]:
    """Cut `order` (indices sorted by ascending length) into batches of at most `rows` rows and, when `tokens` is
    set, at most `tokens` padded tokens (rows x the longest); a row longer than the cap gets a batch of its own."""
    if rows < 1:
        raise ValueError(f"rows per batch must be >= 1, got {rows}")
    out: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) >= rows or (tokens is not None and (len(cur) + 1) * lengths[i] > tokens)):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out
