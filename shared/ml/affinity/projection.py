"""A seeded Rademacher sketch P in R^{D x d} (entries +-1/sqrt(d)) that is never materialised whole.

The entries come from a counter-based generator: the sign of P[r, c] is bit (c mod 32) of
    h(r, c // 32) = mix32(mix32(r XOR key) + (c // 32) * 0x9E3779B9  mod 2^32),
where mix32 is Chris Wellons' "lowbias32" integer hash and key = mix32(mix32(seed_lo) XOR seed_hi).
Any block of rows can be generated on any device, in any order, with identical values (the arithmetic
is exact 32-bit integer arithmetic carried in int64 without overflow), so
  * projecting gradients  g~ = P^T g  walks the rows of P block by block, and
  * mapping a solution back  Delta = P w  walks the same blocks,
and the peak memory is one block (`block_elems` entries), whatever D x d is.

Row r of P corresponds to coordinate r of the flattened LoRA-B parameters, concatenated in the order
recorded in the ProjectionSpec (named_parameters order, each tensor flattened row-major).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

GENERATOR = "rademacher-lowbias32-v1"
_MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
_GOLDEN = 0x9E3779B9
DEFAULT_BLOCK_ELEMS = 1 << 23  # 8M entries (32 MiB as float32) per generated block


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without signed overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 hash of 32-bit values held in an int64 tensor (returns values in [0, 2^32))."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, _M1)
    x = x ^ (x >> 15)
    x = _mul32(x, _M2)
    x = x ^ (x >> 16)
    return x


def mix32_int(x: int) -> int:
    """The same hash on a Python int (used for the key, and by tests as an independent reference)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * _M1) & _MASK32
    x ^= x >> 15
    x = (x * _M2) & _MASK32
    x ^= x >> 16
    return x


def seed_key(seed: int) -> int:
    if seed < 0:
        raise ValueError(f"projection seed must be >= 0, got {seed}")
    return mix32_int(mix32_int(seed & _MASK32) ^ ((seed >> 32) & _MASK32))


_TABLES: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


def _sign_table(dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[65536, 16]: row v holds (2 * bit_k(v) - 1) / sqrt(dim) for k = 0..15 (bit 0 first)."""
    key = (dim, str(device), dtype)
    table = _TABLES.get(key)
    if table is None:
        v = torch.arange(65536, dtype=torch.int64, device=device)
        bits = (v[:, None] >> torch.arange(16, dtype=torch.int64, device=device)) & 1
        table = ((bits.to(torch.float64) * 2 - 1) / math.sqrt(dim)).to(dtype)
        _TABLES[key] = table
    return table


def rademacher_block(
    seed: int,
    dim: int,
    row_start: int,
    row_end: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Rows [row_start, row_end) of P (entries +-1/sqrt(dim)) as a dense [rows, dim] tensor."""
    if not 0 <= row_start <= row_end or row_end > 1 << 32:
        raise ValueError(f"bad projection row range [{row_start}, {row_end})")
    device = torch.device(device)
    key = seed_key(seed)
    words = (dim + 31) // 32
    rows = torch.arange(row_start, row_end, dtype=torch.int64, device=device)
    row_key = mix32(rows ^ key)  # [R]
    word = (torch.arange(words, dtype=torch.int64, device=device) * _GOLDEN) & _MASK32  # [W]
    h = mix32((row_key[:, None] + word[None, :]) & _MASK32)  # [R, W], 32 signs per word
    halves = torch.stack((h & 0xFFFF, h >> 16), dim=-1).reshape(-1)  # bits 0-15, then 16-31
    block = _sign_table(dim, device, dtype).index_select(0, halves).reshape(len(rows), words * 32)
    return block if words * 32 == dim else block[:, :dim]


@dataclass
class ParamEntry:
    name: str
    shape: list[int]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ProjectionSpec:
    """What fixes P: generator, seed, d and the parameter order/shapes (stored with the gradients)."""

    seed: int
    dim: int
    params: list[ParamEntry]
    generator: str = GENERATOR
    scale: str = "1/sqrt(dim)"
    block_elems: int = field(default=DEFAULT_BLOCK_ELEMS, compare=False)

    @classmethod
    def from_shapes(cls, seed: int, dim: int, shapes: Sequence[tuple[str, Sequence[int]]]) -> ProjectionSpec:
        if dim < 1:
            raise ValueError(f"projection dim must be >= 1, got {dim}")
        entries, offset = [], 0
        for name, shape in shapes:
            entries.append(ParamEntry(name, [int(s) for s in shape], offset))
            offset += math.prod(shape)
        return cls(seed=seed, dim=dim, params=entries)

    @property
    def total(self) -> int:
        """D: the number of projected coordinates."""
        return sum(p.numel for p in self.params)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total"] = self.total
        return d

    @classmethod
    def from_dict(cls, data: Mapping) -> ProjectionSpec:
        if data.get("generator", GENERATOR) != GENERATOR:
            raise ValueError(f"unsupported projection generator {data.get('generator')!r}; expected {GENERATOR}")
        params = [ParamEntry(p["name"], list(p["shape"]), int(p["offset"])) for p in data["params"]]
        spec = cls(
            seed=int(data["seed"]),
            dim=int(data["dim"]),
            params=params,
            block_elems=int(data.get("block_elems", DEFAULT_BLOCK_ELEMS)),
        )
        if "total" in data and int(data["total"]) != spec.total:
            raise ValueError("projection spec is inconsistent: total != sum of parameter sizes")
        return spec

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> ProjectionSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))


class Projector:
    """Applies P^T (project) and P (back-map) block by block on `device`."""

    def __init__(self, spec: ProjectionSpec, device: torch.device | str = "cpu") -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.rows_per_block = max(1, spec.block_elems // spec.dim)
        self._by_name = {p.name: p for p in spec.params}

    def _blocks(self, start: int, end: int):
        for r0 in range(start, end, self.rows_per_block):
            r1 = min(end, r0 + self.rows_per_block)
            yield r0, r1, rademacher_block(self.spec.seed, self.spec.dim, r0, r1, self.device)

    def project_range(self, grads: torch.Tensor, row_start: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Add grads [B, n] @ P[row_start:row_start+n] into `out` [B, d] (float32 accumulation)."""
        grads = grads.to(self.device, torch.float32)
        if out is None:
            out = torch.zeros(grads.shape[0], self.spec.dim, device=self.device, dtype=torch.float32)
        for r0, r1, block in self._blocks(row_start, row_start + grads.shape[1]):
            out.addmm_(grads[:, r0 - row_start : r1 - row_start], block)
        return out

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-example gradients {param name: [B, *shape]} (every spec param) -> [B, d]."""
        out = None
        for p in self.spec.params:
            g = grads[p.name]
            out = self.project_range(g.reshape(g.shape[0], -1), p.offset, out)
        assert out is not None
        return out

    def project_flat(self, grads: torch.Tensor) -> torch.Tensor:
        """Flat gradients [B, D] (spec order) -> [B, d]."""
        if grads.shape[1] != self.spec.total:
            raise ValueError(f"expected {self.spec.total} gradient coordinates, got {grads.shape[1]}")
        return self.project_range(grads, 0)

    def backmap(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """Delta = P w for w [d] or [K, d] -> {param name: [*shape]} or {name: [K, *shape]} (float32)."""
        single = w.dim() == 1
        wk = w.to(self.device, torch.float32).reshape(-1, self.spec.dim)  # [K, d]
        out: dict[str, torch.Tensor] = {}
        for p in self.spec.params:
            flat = torch.empty(wk.shape[0], p.numel, device=self.device, dtype=torch.float32)
            for r0, r1, block in self._blocks(p.offset, p.offset + p.numel):
                flat[:, r0 - p.offset : r1 - p.offset] = wk @ block.T
            out[p.name] = flat.reshape(p.shape) if single else flat.reshape(wk.shape[0], *p.shape)
        return out
