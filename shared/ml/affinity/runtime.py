"""What the Stage-1 steps share: the loaded base with its theta0 adapter, and the encoded rows per split.

Rows of a split are ordered task by task (in the run's task order), each task's examples in split order
after the seeded stratified subsample; `rows_<split>.csv` records (row, task, example id, label) so every
gradient row and every estimate can be traced back to its example.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

# re-exported for the modules under refactor that still import them from here
from shared.files import atomic_path, atomic_write_json, atomic_write_text  # noqa: F401
from shared.ml.affinity.batching import Batching, resolve_batching
from shared.ml.affinity.gradients import LoraSite, lora_sites, spec_for
from shared.ml.affinity.projection import ProjectionSpec, Projector
from shared.ml.data import subsample
from shared.ml.encoding import BoundTask, Encoded, bind, encode_examples
from shared.ml.models import attach_lora, default_device, load_model

# ------------------------------------------------------------------------------------------ file helpers


def load_npy(path: Path, mmap: bool = False) -> np.ndarray:
    return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)


# ------------------------------------------------------------------------------------------ data


@dataclass
class SplitRows:
    """The encoded rows of one split (all tasks), with each row's task index."""

    split: str
    items: list[Encoded]
    task_index: np.ndarray  # [N] int
    tasks: list[str]

    def __len__(self) -> int:
        return len(self.items)

    def task_rows(self, t: int) -> np.ndarray:
        return np.flatnonzero(self.task_index == t)

    def write_csv(self, path: Path) -> None:
        lines: list[list[str | int]] = [["row", "task", "task_index", "example_id", "label", "answer_token", "length"]]
        for r, it in enumerate(self.items):
            lines.append(
                [r, it.task, int(self.task_index[r]), it.example_id, it.label, it.answer_token, len(it.input_ids)]
            )
        with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
            csv.writer(fh).writerows(lines)


def build_rows(
    tasks: list[str],
    bound: dict[str, BoundTask],
    tokenizer: Any,
    split: str,
    max_n: int | None,
    seed: int,
    max_length: int,
) -> SplitRows:
    from shared.ml.tasks.registry import get_task

    items: list[Encoded] = []
    index: list[int] = []
    for t, name in enumerate(tasks):
        examples = subsample(get_task(name).split(split), max_n, seed)
        if not examples:
            raise ValueError(f"task {name!r} has no {split} examples")
        enc = encode_examples(bound[name], examples, tokenizer, max_length)
        items.extend(enc)
        index.extend([t] * len(enc))
    return SplitRows(split, items, np.asarray(index, dtype=np.int64), list(tasks))


# ------------------------------------------------------------------------------------------ model


@dataclass
class Runtime:
    """A loaded base with the theta0 LoRA adapter ("default") and lazily encoded rows."""

    model: Any
    tokenizer: Any
    info: Any
    device: torch.device
    sites: list[LoraSite]
    spec: ProjectionSpec
    projector: Projector
    bound: dict[str, BoundTask]
    tasks: list[str]
    seed: int
    max_length: int
    batching: Batching  # rows / tokens per gradient batch and per forward (params, or the device's defaults)
    output: str = "vocab"  # the differentiated f (gradients.output_f)
    factors: str = "B"  # the differentiated LoRA matrices (gradients.grad_params)
    _rows: dict[tuple[str, int | None], SplitRows] = field(default_factory=dict)

    @classmethod
    def load(cls, params: Any, theta0_path: Path | None = None) -> Runtime:
        from shared.ml.tasks.registry import get_task

        device = torch.device(default_device() if params.device == "auto" else params.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available")
        model, tokenizer, info = load_model(params.model, params.quantization, device)
        precision = params.precision
        if precision != "auto":
            want = torch.float32 if precision == "fp32" else torch.bfloat16
            if params.quantization != "none":
                raise ValueError(f"precision={precision!r} needs quantization 'none' (a 4-bit base computes in bf16)")
            if next(model.parameters()).dtype != want:
                model.to(want)
                from dataclasses import replace

                info = replace(info, compute_dtype=str(want).removeprefix("torch."))
        peft_model = attach_lora(model, params.rank, params.lora_alpha, tuple(params.targets), seed=params.seed)
        peft_model.eval()
        if theta0_path is not None and theta0_path.exists():
            load_theta0(peft_model, theta0_path)
        factors = getattr(params, "gradients", "B")  # only AffinityParams offers "AB" (linear mode)
        spec = spec_for(peft_model, params.seed, params.dim, factors=factors)
        bound = {name: bind(get_task(name), tokenizer) for name in params.tasks}
        return cls(
            peft_model,
            tokenizer,
            info,
            device,
            lora_sites(peft_model),
            spec,
            Projector(spec, device),
            bound,
            list(params.tasks),
            params.seed,
            params.max_length,
            resolve_batching(params, peft_model, device),
            params.output,
            factors,
        )

    def rows(self, split: str, max_n: int | None, tasks: list[str] | None = None) -> SplitRows:
        key = (split, max_n)
        if key not in self._rows:
            self._rows[key] = build_rows(
                self.tasks, self.bound, self.tokenizer, split, max_n, self.seed, self.max_length
            )
        rows = self._rows[key]
        if tasks is None or list(tasks) == rows.tasks:
            return rows
        keep = [self.tasks.index(t) for t in tasks]
        mask = np.isin(rows.task_index, keep)
        sel = np.flatnonzero(mask)
        remap = {old: new for new, old in enumerate(keep)}
        return SplitRows(
            split,
            [rows.items[i] for i in sel],
            np.array([remap[int(rows.task_index[i])] for i in sel], dtype=np.int64),
            list(tasks),
        )

    def theta0(self) -> dict[str, torch.Tensor]:
        from shared.ml.models import lora_state

        return {k: v.detach().cpu().contiguous() for k, v in lora_state(self.model).items()}

    def a_norm(self) -> float:
        """||theta0|| over all adapter tensors (= ||A0|| for a fresh adapter, B0 = 0): the reference norm for `scale`."""
        total = sum(((v.float() ** 2).sum() for v in self.theta0().values()), torch.tensor(0.0))
        return float(torch.sqrt(total))

    def reset_adapter(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))


def save_theta0(rt: Runtime, path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(
            rt.theta0(),
            str(tmp),
            metadata={"format": "pt", "base_model": rt.info.name, "base_revision": rt.info.revision},
        )


def load_theta0(model: Any, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    params = dict(model.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise ValueError(f"theta0 {path} does not match the model's LoRA layout (e.g. {missing[0]})")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise ValueError(
                    f"theta0 {path}: {name} has shape {tuple(value.shape)}, model has {tuple(params[name].shape)}"
                )
            params[name].copy_(value.to(params[name].device, params[name].dtype))
