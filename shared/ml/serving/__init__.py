"""Serving core: a batched multi-LoRA engine, the ensemble runner and a dynamic batcher (no web imports)."""

from shared.ml.serving.multi_lora import (
    AdapterFormatError,
    AdapterShapeError,
    MultiLoRAEngine,
    MultiLoRALinear,
    NoFreeSlotError,
    PreparedAdapter,
)

__all__ = [
    "AdapterFormatError",
    "AdapterShapeError",
    "MultiLoRAEngine",
    "MultiLoRALinear",
    "NoFreeSlotError",
    "PreparedAdapter",
]
