"""Train on a 4-bit base without dequantising it on every call.

A bitsandbytes `Linear4bit` dequantises its NF4 weight inside every forward and again in every backward
(the frozen base's input gradient), a few kernels per layer per call. For training that is pure overhead
when the dequantised weights fit in memory next to the 4-bit ones: `dequantized_base` dequantises each
4-bit layer once, in its compute dtype, and routes the layer's forward through `F.linear` on that copy
while the block is active. The numbers are the 4-bit weights' own values (the same `dequantize_4bit`
bitsandbytes applies), so training sees the same model; the 4-bit weights stay in place, and the layers
are restored on exit. The saving is launches and memory traffic, the cost is the dequantised copy's
memory (2 bytes a weight in bf16), which `policy="auto"` allows only when it is small against the
device's free memory.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F

Policy = Literal["auto", "cached", "per_call"]
POLICIES: tuple[str, ...] = ("auto", "cached", "per_call")
# "auto" caches when the dequantised copies take at most this share of the device's free memory
AUTO_SHARE = 0.25


def _layers(model: Any) -> list[Any]:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _dtype(layer: Any) -> torch.dtype:
    return layer.compute_dtype if getattr(layer, "compute_dtype", None) is not None else torch.float32


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 0


def resolve(policy: str, model: Any) -> str:
    """The policy a run uses: "cached" or "per_call" ("auto": cached when the copies fit in AUTO_SHARE of free
    memory; a model without 4-bit layers is always "per_call", there is nothing to cache)."""
    if policy not in POLICIES:
        raise ValueError(f"dequantize must be one of {POLICIES}, got {policy!r}")
    layers = _layers(model)
    if not layers or policy == "per_call":
        return "per_call"
    if policy == "cached":
        return "cached"
    need = sum(m.out_features * m.in_features * torch.empty((), dtype=_dtype(m)).element_size() for m in layers)
    return "cached" if need <= AUTO_SHARE * _free_bytes(layers[0].weight.device) else "per_call"


def _cached_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    w = self._chorus_dequantized
    return F.linear(x.to(w.dtype), w, self._chorus_bias).to(x.dtype)


@contextmanager
def dequantized_base(model: Any, policy: str = "auto") -> Iterator[str]:
    """While active, every 4-bit layer of `model` computes with its weight dequantised once (see the module
    docstring); yields the resolved policy ("cached" or "per_call")."""
    use = resolve(policy, model)
    if use == "per_call":
        yield use
        return
    from bitsandbytes.functional import dequantize_4bit

    patched = []
    try:
        for layer in _layers(model):
            with torch.no_grad():
                w = dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(_dtype(layer))
            layer._chorus_dequantized = w.reshape(layer.out_features, layer.in_features)
            layer._chorus_bias = None if layer.bias is None else layer.bias.detach().to(w.dtype)
            layer.forward = types.MethodType(_cached_forward, layer)
            patched.append(layer)
        yield use
    finally:
        for layer in patched:
            del layer.forward  # the class's forward again
            del layer._chorus_dequantized, layer._chorus_bias
