"""Persisted gradient passes: shards of whole batches, resumable, merged into one float32 [N, d] matrix.

Layout under a run directory:
    gradients/<split>/batches-<bs>[x<tokens>]-<first>-<last>/rows.npy  int64 [n]  (row ids of the shard)
                                                  g.npy     float32 [n, d]  (memory-mapped while written)
                                                  f0.npy    float32 [n]
                                                  done.npy  bool    [n]     (set after the rows are flushed)
    grads_<split>.npy, f0_<split>.npy                                       (merged, written atomically)
A shard re-run skips rows already marked done, so a killed pass resumes where it stopped; several
workers can run disjoint shards of the same split and `merge_gradients` assembles them. A shard takes
whole batches of the split's canonical plan (`batch_plan`: all rows sorted by length, cut every
batch_size rows or at the token cap), so the gradients are bitwise the same whether the pass runs in one piece
or in many.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.errors import StageFailed
from shared.files import atomic_save_npy
from shared.ml.affinity.batching import cut_sorted
from shared.ml.affinity.gradients import BufferedProjection, LoraGradCapture, lora_grad_only
from shared.ml.affinity.runtime import Runtime, SplitRows, load_npy
from shared.ml.encoding import collate
from shared.ml.progress import Progress, silent


def _open(path: Path, shape: tuple[int, ...], dtype: str) -> np.memmap:
    if path.exists():
        arr = np.lib.format.open_memmap(path, mode="r+")
        if arr.shape != shape or arr.dtype != np.dtype(dtype):
            raise ValueError(
                f"{path} has shape {arr.shape}/{arr.dtype}, expected {shape}/{dtype}; remove it to restart"
            )
        return arr
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    arr[...] = 0
    arr.flush()
    return arr


def batch_plan(rows: SplitRows, batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """The canonical batches of a split's gradient pass: all rows sorted by length (stable), cut every
    batch_size rows or before a batch would pad past max_tokens tokens (batching.cut_sorted)."""
    lengths = [len(it.input_ids) for it in rows.items]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    return cut_sorted(order, lengths, batch_size, max_tokens)


def plan_for(rt: Runtime, rows: SplitRows) -> list[list[int]]:
    """The split's plan at the runtime's batching."""
    return batch_plan(rows, rt.batching.rows, rt.batching.tokens)


def projection_starts(plan: list[list[int]], project_rows: int) -> list[int]:
    """The batches that start a projection group: groups are consecutive batches closed as soon as they hold
    >= project_rows rows, as BufferedProjection forms them. A shard [first, last) whose ends are group starts (or
    the plan's end) projects exactly the groups of the one-piece pass."""
    starts, rows = [0] if plan else [], 0
    for j, batch in enumerate(plan):
        rows += len(batch)
        if rows >= project_rows and j + 1 < len(plan):
            starts.append(j + 1)
            rows = 0
    return starts


def batches_dir(
    run_dir: Path, split: str, batch_size: int, first: int, last: int, max_tokens: int | None = None
) -> Path:
    size = f"{batch_size:06d}" if max_tokens is None else f"{batch_size:06d}x{max_tokens:09d}"
    return run_dir / "gradients" / split / f"batches-{size}-{first:09d}-{last:09d}"


def gradient_batches(
    rt: Runtime,
    rows: SplitRows,
    run_dir: Path,
    first: int,
    last: int,
    progress: Progress = silent,
    stage: str | None = None,
    project_rows: int = 64,
) -> dict:
    """Compute batches [first, last) of the split's plan at rt.batching (skipping batches already done).

    Every batch is the same as in the one-piece pass, and so is every sketch projection (groups of whole
    batches of >= project_rows rows) when `first` and `last` are group starts (`projection_starts`) or the
    plan's end: then the gradients do not depend on how the plan is cut into shards, nor on a resume
    (a projection group is marked done as a whole, never partly).
    """
    plan = plan_for(rt, rows)
    if not 0 <= first < last <= len(plan):
        raise ValueError(
            f"gradient batches [{first}, {last}) are outside the {len(plan)} batches of split {rows.split!r}"
        )
    folder = batches_dir(run_dir, rows.split, rt.batching.rows, first, last, rt.batching.tokens)
    batches = plan[first:last]
    ids = np.asarray([i for b in batches for i in b], dtype=np.int64)
    if (folder / "rows.npy").exists():
        if not np.array_equal(load_npy(folder / "rows.npy"), ids):
            raise ValueError(f"{folder} was written for other rows; remove it to restart")
    else:
        atomic_save_npy(folder / "rows.npy", ids)
    n, d = len(ids), rt.spec.dim
    g = _open(folder / "g.npy", (n, d), "float32")
    f0 = _open(folder / "f0.npy", (n,), "float32")
    done = _open(folder / "done.npy", (n,), "bool")
    offsets = np.cumsum([0] + [len(b) for b in batches])
    todo = [j for j in range(len(batches)) if not done[offsets[j] : offsets[j + 1]].all()]
    stage = stage or f"gradients {rows.split}"
    pad = rt.tokenizer.pad_token_id or 0

    def write(keys: list[int], f: torch.Tensor, proj: torch.Tensor) -> None:
        if not keys:
            return
        idx = np.asarray(keys)
        g[idx] = proj.cpu().numpy()
        f0[idx] = f.cpu().numpy()
        g.flush()
        f0.flush()
        done[idx] = True  # only after the rows themselves are on disk
        done.flush()

    with (
        lora_grad_only(rt.model, factors=rt.factors),
        LoraGradCapture(rt.model, output=rt.output, factors=rt.factors) as capture,
    ):
        buffer = BufferedProjection(rt.model, capture, rt.projector, project_rows)
        for b, j in enumerate(todo):
            batch = collate([rows.items[i] for i in batches[j]], pad).to(rt.device)
            for keys, f, proj in buffer.add(batch, list(range(offsets[j], offsets[j + 1]))):
                write(keys, f, proj)
            if b == len(todo) - 1:
                write(*buffer.flush())
            progress(stage, b + 1, len(todo), f"batches {first}-{last}")
    if not todo:
        progress(stage, 1, 1, "already done")
    return {
        "rows": n,
        "batches": len(batches),
        "computed": int(sum(len(batches[j]) for j in todo)),
        "shard": str(folder.relative_to(run_dir)),
    }


def merge_gradients(run_dir: Path, split: str, n_total: int, d: int) -> tuple[Path, Path]:
    """Assemble complete shards of a split into grads_<split>.npy and f0_<split>.npy."""
    out_g, out_f = run_dir / f"grads_{split}.npy", run_dir / f"f0_{split}.npy"
    G = np.zeros((n_total, d), dtype=np.float32)
    F = np.zeros(n_total, dtype=np.float32)
    have = np.zeros(n_total, dtype=bool)
    root = run_dir / "gradients" / split
    for folder in sorted(root.glob("batches-*")) if root.exists() else []:
        if not ((folder / "rows.npy").exists() and (folder / "done.npy").exists()):
            continue
        ids = load_npy(folder / "rows.npy")
        done = load_npy(folder / "done.npy")
        if not done.all() or len(ids) != len(done) or (len(ids) and int(ids.max()) >= n_total):
            continue
        g = load_npy(folder / "g.npy")
        if g.shape[1] != d:
            raise ValueError(f"{folder} holds d={g.shape[1]} gradients, expected {d}")
        new = ~have[ids]
        G[ids[new]] = g[new]
        F[ids[new]] = load_npy(folder / "f0.npy")[new]
        have[ids] = True
    if not have.all():
        missing = np.flatnonzero(~have)
        raise StageFailed(
            f"gradients of split {split!r} are incomplete: {len(missing)} rows missing (first {missing[0]})"
        )
    if not np.isfinite(G).all() or not np.isfinite(F).all():
        raise StageFailed(f"non-finite gradients or f0 in split {split!r}")
    atomic_save_npy(out_g, G)
    atomic_save_npy(out_f, F)
    return out_g, out_f


def gradient_pass(
    rt: Runtime, rows: SplitRows, run_dir: Path, progress: Progress = silent
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as one shard (resumable), merged; returns (G [N, d], f0 [N]) as CPU float32 tensors."""
    out_g, out_f = run_dir / f"grads_{rows.split}.npy", run_dir / f"f0_{rows.split}.npy"
    if not (out_g.exists() and out_f.exists()):
        gradient_batches(rt, rows, run_dir, 0, len(plan_for(rt, rows)), progress)
        merge_gradients(run_dir, rows.split, len(rows), rt.spec.dim)
    G = torch.from_numpy(load_npy(out_g).copy())
    F = torch.from_numpy(load_npy(out_f).copy())
    if G.shape != (len(rows), rt.spec.dim):
        raise ValueError(
            f"{out_g} has shape {tuple(G.shape)}, expected {(len(rows), rt.spec.dim)}; use a fresh output directory"
        )
    return G, F
