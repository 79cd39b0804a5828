"""A batched multi-LoRA engine: many resident adapters on one (4-bit) base, a per-row adapter choice.

The idea behind Punica / S-LoRA, in plain PyTorch. Every targeted Linear (or bitsandbytes Linear4bit)
of the base is wrapped by `MultiLoRALinear`, which keeps the LoRA weights of all resident adapters
as stacked tensors (`A[slot]`: [R, in], `B[slot]`: [R, out], rank zero-padded to the engine's R, the
scaling folded into B). A forward is given one slot index per row (-1 = the base alone) and computes

    out[b] = base(x[b]) + (x[b] A_k^T) B_k          with k = slot of row b

with the weights GATHERED per batch in two dense matmuls, never a Python loop over adapters:

* "stacked" mode (few distinct adapters in the batch, the usual case): the U adapters used by the
  batch are gathered and concatenated along the rank, h = x [A_1; ...; A_U]^T is computed for all
  rows at once, masked so that each row keeps only its own adapter's rank block, and expanded with
  [B_1; ...; B_U]. The extra cost over a single adapter is U x R columns of a skinny matmul.
* "bmm" mode (many distinct adapters): per-row gathered A/B and two `torch.bmm`.

All stacked weights live in ONE flat device buffer [slots, numel]; each module's stacks are views
into it, so writing an adapter into a slot is a single copy (warm switch), and a host-side LRU cache
of verified, prepared adapters makes re-activation cheap. Slots are managed LRU with pin counts:
pinned adapters (the members of a loaded ensemble, or of a request in flight) are never evicted.

Loading reads safetensors only, through `shared.ml.training.adapters.load_adapter_state`.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.errors import BadInput

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_PREFIX = "base_model.model."
DEFAULT_STACK_LIMIT = 8  # up to this many distinct adapters in a batch use the stacked path


class AdapterFormatError(BadInput):
    """The adapter uses a LoRA feature the engine does not serve (DoRA, LoRA bias, embeddings, ...)."""


class AdapterShapeError(BadInput):
    """The adapter's tensors do not fit the base model's modules."""


class NoFreeSlotError(RuntimeError):
    """Every adapter slot holds a pinned adapter; nothing can be evicted."""


# --------------------------------------------------------------------------------------------------
# Preparing an adapter (host side, no model needed)


@dataclass
class PreparedAdapter:
    """One adapter's LoRA weights, validated and ready to copy into a slot (host memory).

    `modules[path] = (A [r, in], Bt [r, out])` where Bt = (scaling * B)^T, `path` is the module's
    name inside the base model (e.g. "model.layers.0.self_attn.q_proj").
    """

    key: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    meta: dict[str, Any] = field(default_factory=dict)
    _flat: torch.Tensor | None = field(default=None, repr=False)
    _flat_layout: int = field(default=-1, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.modules.values())


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup (a key matches the end of the module name)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_path(state_key: str) -> tuple[str, str]:
    """("model.layers.0.self_attn.q_proj", "A") for a PEFT LoRA state-dict key; raises on other keys."""
    match = _LORA_KEY.match(state_key)
    if not match:
        raise AdapterFormatError(
            f"unsupported tensor {state_key!r}: only plain LoRA A/B matrices are served "
            "(no DoRA, LoRA bias, embedding LoRA or modules_to_save)"
        )
    path = match["module"]
    if path.startswith(_PEFT_PREFIX):
        path = path[len(_PEFT_PREFIX) :]
    return path, match["kind"]


def prepare_adapter(
    key: str, state: dict[str, torch.Tensor], config: dict[str, Any], meta: dict | None = None
) -> PreparedAdapter:
    """Validate a PEFT LoRA state dict + config and fold the scaling into B (float32, host)."""
    peft_type = config.get("peft_type", "LORA")
    peft_type = str(getattr(peft_type, "value", peft_type)).upper()
    if peft_type != "LORA":
        raise AdapterFormatError(f"adapter {key!r}: peft_type {peft_type!r} is not LoRA")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise AdapterFormatError(f"adapter {key!r}: {flag}=true is not supported by the serving engine")
    if config.get("lora_bias"):
        raise AdapterFormatError(f"adapter {key!r}: lora_bias=true is not supported by the serving engine")
    if config.get("modules_to_save"):
        raise AdapterFormatError(f"adapter {key!r}: modules_to_save is not supported by the serving engine")
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora", False))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        path, kind = module_path(name)
        pairs.setdefault(path, {})[kind] = tensor
    if not pairs:
        raise AdapterFormatError(f"adapter {key!r}: no LoRA tensors")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(f"adapter {key!r}: module {path} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterShapeError(
                f"adapter {key!r}: module {path}: A {tuple(a.shape)} and B {tuple(b.shape)} do not chain"
            )
        r = a.shape[0]
        module_alpha = float(_pattern_value(config.get("alpha_pattern"), path, alpha))
        scaling = module_alpha / math.sqrt(r) if rslora else module_alpha / r
        a32 = a.detach().to("cpu", torch.float32).contiguous()
        bt = (b.detach().to("cpu", torch.float32) * scaling).t().contiguous()
        if not (torch.isfinite(a32).all() and torch.isfinite(bt).all()):
            raise AdapterFormatError(f"adapter {key!r}: module {path} has non-finite weights")
        modules[path] = (a32, bt)
        rank = max(rank, r)
    return PreparedAdapter(key, modules, rank, dict(meta or {}))


# --------------------------------------------------------------------------------------------------
# The wrapped module


@dataclass
class _Routing:
    """Per-forward routing, computed once and shared by every wrapped module."""

    rows: int
    unique: tuple[int, ...]  # distinct slots used (>= 0), sorted
    unique_set: frozenset[int]
    mode: str  # "single" | "stacked" | "bmm"
    idx: torch.Tensor | None = None  # [U] device slot indices (stacked)
    mask: torch.Tensor | None = None  # [rows, 1, U*R] 0/1 (stacked; None when every row uses the one slot)
    row_idx: torch.Tensor | None = None  # [rows] slot per row, -1 clamped to 0 (bmm)
    row_on: torch.Tensor | None = None  # [rows, 1, 1] 0/1 (bmm)
    cache_key: tuple | None = None  # (layout, unique slots, their write versions): gathered weights reusable


class MultiLoRALinear(nn.Module):
    """A Linear / Linear4bit with K resident LoRA adapters selected per row by the engine's routing."""

    def __init__(
        self, base_layer: nn.Module, engine: MultiLoRAEngine, path: str, in_features: int, out_features: int
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.path = path
        self.in_features = in_features
        self.out_features = out_features
        self._engine_ref = [engine]  # a list, so the engine is not registered as a submodule
        self.active_slots: set[int] = set()  # slots whose adapter targets this module
        self.a_offset = 0
        self.b_offset = 0
        self.A: torch.Tensor | None = None  # view [S, R, in]
        self.B: torch.Tensor | None = None  # view [S, R, out]
        self._gathered_key: tuple | None = None  # stacked mode: the last gathered [A_1; ..; A_U], [B_1; ..; B_U]
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"path={self.path}, in={self.in_features}, out={self.out_features}, slots={sorted(self.active_slots)}"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        routing = self._engine_ref[0]._routing
        if routing is None or self.A is None or not (self.active_slots & routing.unique_set):
            return out
        if x.shape[0] != routing.rows:
            raise RuntimeError(f"{self.path}: batch has {x.shape[0]} rows but the routing has {routing.rows}")
        A, B = self.A, self.B
        assert B is not None
        xs = x if x.dtype == A.dtype else x.to(A.dtype)
        if routing.mode == "single":
            slot = routing.unique[0]
            h = torch.matmul(xs, A[slot].t())
            if routing.mask is not None:  # rows without adapter
                h = (
                    h.mul_(_rows_mask(routing.mask, h))
                    if not torch.is_grad_enabled()
                    else h * _rows_mask(routing.mask, h)
                )
            y = torch.matmul(h, B[slot])
        elif routing.mode == "stacked":
            if self._gathered_key == routing.cache_key and self._gathered is not None:
                a_cat, b_cat = self._gathered
            else:  # consecutive batches usually use the same adapters: gather once, reuse
                assert routing.idx is not None
                rank = A.shape[1]
                u = len(routing.unique)
                a_cat = A.index_select(0, routing.idx).reshape(u * rank, self.in_features)
                b_cat = B.index_select(0, routing.idx).reshape(u * rank, self.out_features)
                self._gathered_key, self._gathered = routing.cache_key, (a_cat, b_cat)
            h = torch.matmul(xs, a_cat.t())
            if routing.mask is not None:
                h = (
                    h.mul_(_rows_mask(routing.mask, h))
                    if not torch.is_grad_enabled()
                    else h * _rows_mask(routing.mask, h)
                )
            y = torch.matmul(h, b_cat)
        else:  # bmm: per-row gathered weights
            assert routing.row_idx is not None and routing.row_on is not None
            x3 = xs.reshape(routing.rows, -1, self.in_features)
            a_rows = A.index_select(0, routing.row_idx)  # [rows, R, in]
            b_rows = B.index_select(0, routing.row_idx)  # [rows, R, out]
            h = torch.bmm(x3, a_rows.transpose(1, 2)) * routing.row_on
            y = torch.bmm(h, b_rows).reshape(*x.shape[:-1], self.out_features)
        y = y.to(out.dtype)
        if torch.is_grad_enabled():
            return out + y
        return out.add_(y)


def _rows_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [rows, 1, k] mask shaped to broadcast against `like` ([rows, ..., k or n])."""
    if like.dim() == 3:
        return mask
    return mask.reshape(mask.shape[0], *([1] * (like.dim() - 2)), mask.shape[-1])


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a Linear-like module (torch Linear, bitsandbytes Linear4bit / Linear8bitLt)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    try:
        import bitsandbytes as bnb

        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            return module.in_features, module.out_features
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        pass
    return None


# --------------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Slot:
    key: str | None = None
    pins: int = 0
    last_used: float = 0.0


class MultiLoRAEngine:
    """Resident LoRA adapters in slots of one base model; forwards with a per-row adapter choice.

    Thread-safety: every method takes the engine's lock; a forward holds it for its whole duration, so
    slot writes never race a forward. In the service one worker thread does all of it.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        max_slots: int = 16,
        max_host_adapters: int = 64,
        max_rank: int = 16,
        targets: Iterable[str] = (),
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        stack_limit: int = DEFAULT_STACK_LIMIT,
        mode: str = "auto",
    ) -> None:
        if max_slots < 1:
            raise ValueError("max_slots must be >= 1")
        if mode not in ("auto", "stacked", "bmm"):
            raise ValueError(f"unknown mode {mode!r}; expected auto, stacked or bmm")
        self.model = model
        first = next(model.parameters())
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or self._compute_dtype(model, first)
        self.max_slots = max_slots
        self.max_host_adapters = max(max_host_adapters, max_slots)
        self.rank = max(1, max_rank)
        self.stack_limit = stack_limit
        self.mode = mode
        self._lock = threading.RLock()
        self._routing: _Routing | None = None
        self._wrapped: dict[str, MultiLoRALinear] = {}
        self._layout = 0
        self._buffer: torch.Tensor | None = None
        self._slots = [_Slot() for _ in range(max_slots)]
        self._versions = [0] * max_slots  # bumped on every write/eviction of a slot
        self._slot_of: dict[str, int] = {}
        self._pins: dict[str, int] = {}
        self._host: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self.stats = {"cold_loads": 0, "warm_loads": 0, "hits": 0, "evictions": 0, "relayouts": 0}
        if targets:
            self.wrap_targets(targets)

    @staticmethod
    def _compute_dtype(model: nn.Module, first: torch.Tensor) -> torch.dtype:
        dtype = getattr(getattr(model, "config", None), "dtype", None) or getattr(model, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
        return first.dtype if first.dtype.is_floating_point else torch.float32

    # ---- wrapping and layout ---------------------------------------------------------------------

    def wrap_targets(self, suffixes: Iterable[str]) -> list[str]:
        """Wrap every Linear-like module whose name ends with one of `suffixes` (e.g. q_proj)."""
        wanted = tuple(suffixes)
        paths = [
            name
            for name, module in self.model.named_modules()
            if name
            and name.split(".")[-1] in wanted
            and _linear_shape(module) is not None
            and not isinstance(module, MultiLoRALinear)
            and ".base_layer" not in name
        ]
        with self._lock:
            for path in paths:
                self._wrap(path)
            self._relayout()
        return paths

    def _wrap(self, path: str) -> MultiLoRALinear:
        existing = self._wrapped.get(path)
        if existing is not None:
            return existing
        try:
            module = self.model.get_submodule(path)
        except AttributeError as exc:
            raise AdapterShapeError(f"the base model has no module {path!r}") from exc
        if isinstance(module, MultiLoRALinear):
            return module
        shape = _linear_shape(module)
        if shape is None:
            raise AdapterFormatError(f"module {path!r} is a {type(module).__name__}, not a Linear layer")
        parent_name, _, child = path.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        wrapper = MultiLoRALinear(module, self, path, *shape)
        setattr(parent, child, wrapper)
        self._wrapped[path] = wrapper
        return wrapper

    def _relayout(self) -> None:
        """(Re)allocate the flat slot buffer for the current modules and rank; rewrite resident slots."""
        offset = 0
        for wrapper in self._wrapped.values():
            wrapper.a_offset = offset
            offset += self.rank * wrapper.in_features
            wrapper.b_offset = offset
            offset += self.rank * wrapper.out_features
        self._layout += 1
        self.stats["relayouts"] += 1
        self._buffer = torch.zeros((self.max_slots, max(offset, 1)), dtype=self.dtype, device=self.device)
        for wrapper in self._wrapped.values():
            a = self._buffer[:, wrapper.a_offset : wrapper.a_offset + self.rank * wrapper.in_features]
            b = self._buffer[:, wrapper.b_offset : wrapper.b_offset + self.rank * wrapper.out_features]
            wrapper.A = a.view(self.max_slots, self.rank, wrapper.in_features)
            wrapper.B = b.view(self.max_slots, self.rank, wrapper.out_features)
            wrapper.active_slots = set()
        for slot, entry in enumerate(self._slots):
            if entry.key is not None:
                self._write_slot(slot, self._host[entry.key])

    def _flat(self, prepared: PreparedAdapter) -> torch.Tensor:
        """The adapter laid out like one row of the slot buffer (cached per layout, pinned on CUDA)."""
        if prepared._flat is not None and prepared._flat_layout == self._layout:
            return prepared._flat
        assert self._buffer is not None
        flat = torch.zeros(self._buffer.shape[1], dtype=self.dtype)
        for path, (a, bt) in prepared.modules.items():
            wrapper = self._wrapped[path]
            r = a.shape[0]
            flat[wrapper.a_offset : wrapper.a_offset + self.rank * wrapper.in_features].view(self.rank, -1)[:r] = a
            flat[wrapper.b_offset : wrapper.b_offset + self.rank * wrapper.out_features].view(self.rank, -1)[:r] = bt
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        prepared._flat, prepared._flat_layout = flat, self._layout
        return flat

    def _write_slot(self, slot: int, prepared: PreparedAdapter) -> None:
        assert self._buffer is not None
        self._versions[slot] += 1
        self._buffer[slot].copy_(self._flat(prepared), non_blocking=True)
        for wrapper in self._wrapped.values():
            if wrapper.path in prepared.modules:
                wrapper.active_slots.add(slot)
            else:
                wrapper.active_slots.discard(slot)

    # ---- adapters: host cache, slots, pins -------------------------------------------------------

    def check(self, prepared: PreparedAdapter) -> None:
        """Raise AdapterShapeError unless every module of the adapter exists in the base with matching shapes."""
        for path, (a, bt) in prepared.modules.items():
            try:
                module = self._wrapped.get(path) or self.model.get_submodule(path)
            except AttributeError as exc:
                raise AdapterShapeError(f"adapter {prepared.key!r}: the base model has no module {path!r}") from exc
            shape = (
                (module.in_features, module.out_features)
                if isinstance(module, MultiLoRALinear)
                else _linear_shape(module)
            )
            if shape is None:
                raise AdapterFormatError(
                    f"adapter {prepared.key!r}: {path!r} is a {type(module).__name__}, not a Linear layer"
                )
            if (a.shape[1], bt.shape[1]) != shape:
                raise AdapterShapeError(
                    f"adapter {prepared.key!r}: module {path} expects in/out {shape}, adapter has {(a.shape[1], bt.shape[1])}"
                )

    def register(self, prepared: PreparedAdapter) -> None:
        """Add a prepared adapter to the host cache (validated against the base; no slot yet)."""
        self.check(prepared)
        with self._lock:
            self._host[prepared.key] = prepared
            self._host.move_to_end(prepared.key)
            self._trim_host()

    def _trim_host(self) -> None:
        for key in list(self._host):
            if len(self._host) <= self.max_host_adapters:
                break
            if key not in self._slot_of and self._pins.get(key, 0) == 0:
                del self._host[key]

    def load_state(
        self, key: str, state: dict[str, torch.Tensor], config: dict[str, Any], meta: dict | None = None
    ) -> PreparedAdapter:
        """Prepare + register an adapter from an in-memory PEFT state dict and config."""
        prepared = prepare_adapter(key, state, config, meta)
        self.register(prepared)
        return prepared

    def load_folder(self, key: str, folder: str | Path, expected: Any = None) -> PreparedAdapter:
        """Read a PEFT adapter folder (safetensors only, base identity checked) into the host cache."""
        from shared.ml.training.adapters import load_adapter_state

        state, config, meta = load_adapter_state(Path(folder), expected)
        return self.load_state(key, state, config, meta.model_dump() if hasattr(meta, "model_dump") else dict(meta))

    def is_registered(self, key: str) -> bool:
        return key in self._host

    def slot_of(self, key: str) -> int | None:
        return self._slot_of.get(key)

    def resident(self) -> dict[str, int]:
        """{adapter key: slot} of the adapters in device slots."""
        return dict(self._slot_of)

    def pinned(self) -> dict[str, int]:
        return {k: v for k, v in self._pins.items() if v > 0}

    def activate(self, key: str) -> int:
        """Make a registered adapter resident (evicting the least recently used unpinned one); its slot."""
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is not None:
                self.stats["hits"] += 1
                self._slots[slot].last_used = time.monotonic()
                return slot
            prepared = self._host.get(key)
            if prepared is None:
                raise KeyError(f"adapter {key!r} is not registered")
            self._host.move_to_end(key)
            self._ensure_capacity(prepared)
            slot = self._free_slot()
            self._write_slot(slot, prepared)
            self._slots[slot] = _Slot(key, 0, time.monotonic())
            self._slot_of[key] = slot
            self.stats["warm_loads"] += 1
            return slot

    def _ensure_capacity(self, prepared: PreparedAdapter) -> None:
        """Wrap missing modules and grow the rank if this adapter needs it (a relayout, rare)."""
        missing = [p for p in prepared.modules if p not in self._wrapped]
        grow = prepared.rank > self.rank
        if missing or grow or self._buffer is None:
            for path in missing:
                self._wrap(path)
            self.rank = max(self.rank, prepared.rank)
            self._relayout()

    def _free_slot(self) -> int:
        for slot, entry in enumerate(self._slots):
            if entry.key is None:
                return slot
        candidates = [(e.last_used, s) for s, e in enumerate(self._slots) if self._pins.get(e.key or "", 0) == 0]
        if not candidates:
            raise NoFreeSlotError(
                f"all {self.max_slots} adapter slots hold pinned adapters; unload an ensemble or raise the slot count"
            )
        _, slot = min(candidates)
        self._evict_slot(slot)
        return slot

    def _evict_slot(self, slot: int) -> None:
        entry = self._slots[slot]
        if entry.key is not None:
            del self._slot_of[entry.key]
            self.stats["evictions"] += 1
        for wrapper in self._wrapped.values():
            wrapper.active_slots.discard(slot)
        self._slots[slot] = _Slot()
        self._versions[slot] += 1

    def evict(self, key: str) -> bool:
        """Drop an unpinned adapter from its slot (it stays in the host cache)."""
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is None:
                return False
            if self._pins.get(key, 0):
                raise RuntimeError(f"adapter {key!r} is pinned")
            self._evict_slot(slot)
            return True

    def forget(self, key: str) -> None:
        """Evict and drop from the host cache (an unpinned adapter)."""
        with self._lock:
            self.evict(key)
            self._host.pop(key, None)

    def acquire(self, keys: Iterable[str]) -> dict[str, int]:
        """Pin and activate adapters (all or none); {key: slot}."""
        keys = list(dict.fromkeys(keys))
        with self._lock:
            for key in keys:
                if key not in self._host:
                    raise KeyError(f"adapter {key!r} is not registered")
            for key in keys:  # pin first so activating one member never evicts another
                self._pins[key] = self._pins.get(key, 0) + 1
            try:
                return {key: self.activate(key) for key in keys}
            except Exception:
                self.release(keys)
                raise

    def release(self, keys: Iterable[str]) -> None:
        """Undo one `acquire` of each key (the adapters stay resident until evicted)."""
        with self._lock:
            for key in dict.fromkeys(keys):
                count = self._pins.get(key, 0) - 1
                if count > 0:
                    self._pins[key] = count
                else:
                    self._pins.pop(key, None)
            self._trim_host()

    # ---- forward ---------------------------------------------------------------------------------

    def _routing_for(self, slots: Sequence[int]) -> _Routing | None:
        rows = len(slots)
        unique = tuple(sorted({s for s in slots if s >= 0}))
        if not unique:
            return None
        for s in unique:
            if s >= self.max_slots or self._slots[s].key is None:
                raise ValueError(f"slot {s} holds no adapter")
            self._slots[s].last_used = time.monotonic()
        dev = self.device
        every_row = len(unique) == 1 and all(s == unique[0] for s in slots)
        mode = self.mode
        if mode == "auto":
            mode = "stacked" if len(unique) <= self.stack_limit else "bmm"
        if len(unique) == 1:
            mask = (
                None
                if every_row
                else torch.tensor([1.0 if s >= 0 else 0.0 for s in slots], dtype=self.dtype)[:, None, None]
            )
            return _Routing(rows, unique, frozenset(unique), "single", mask=None if mask is None else mask.to(dev))
        if mode == "stacked":
            pos = {s: i for i, s in enumerate(unique)}
            u, r = len(unique), self.rank
            mask = torch.zeros((rows, u, r), dtype=self.dtype)
            for row, s in enumerate(slots):
                if s >= 0:
                    mask[row, pos[s]] = 1.0
            return _Routing(
                rows,
                unique,
                frozenset(unique),
                "stacked",
                idx=torch.tensor(unique, device=dev),
                mask=mask.reshape(rows, 1, u * r).to(dev),
                cache_key=(self._layout, unique, tuple(self._versions[s] for s in unique)),
            )
        row_idx = torch.tensor([max(s, 0) for s in slots], device=dev)
        row_on = torch.tensor([1.0 if s >= 0 else 0.0 for s in slots], dtype=self.dtype)[:, None, None].to(dev)
        return _Routing(rows, unique, frozenset(unique), "bmm", row_idx=row_idx, row_on=row_on)

    @contextmanager
    def route(self, slots: Sequence[int]) -> Iterator[None]:
        """Within this block, forwards of the base model apply adapter `slots[b]` to row b (-1: none)."""
        with self._lock:
            self._routing = self._routing_for(list(slots))
            try:
                yield
            finally:
                self._routing = None

    @torch.no_grad()
    def answer_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, last_index: torch.Tensor, slots: Sequence[int]
    ) -> torch.Tensor:
        """[B, V] next-token logits at each row's answer position, row b through adapter slots[b]."""
        from types import SimpleNamespace

        from shared.ml.models import answer_logits

        batch = SimpleNamespace(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            last_index=last_index.to(self.device),
        )
        with self.route(slots):
            return answer_logits(self.model, batch)

    def unwrap(self) -> None:
        """Restore the base model's original modules (drops every slot; the host cache is kept)."""
        with self._lock:
            for path, wrapper in self._wrapped.items():
                parent_name, _, child = path.rpartition(".")
                parent = self.model.get_submodule(parent_name) if parent_name else self.model
                setattr(parent, child, wrapper.base_layer)
            self._wrapped.clear()
            self._slot_of.clear()
            self._slots = [_Slot() for _ in range(self.max_slots)]
            self._buffer = None

    def describe(self) -> dict[str, Any]:
        return {
            "slots": self.max_slots,
            "rank": self.rank,
            "modules": len(self._wrapped),
            "resident": len(self._slot_of),
            "host_cached": len(self._host),
            "pinned": len(self.pinned()),
            "dtype": str(self.dtype).removeprefix("torch."),
            "buffer_bytes": 0 if self._buffer is None else self._buffer.numel() * self._buffer.element_size(),
            **self.stats,
        }
