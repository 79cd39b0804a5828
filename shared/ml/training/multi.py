"""K LoRA adapters trained in one pass over a frozen base: each exactly its own `fit_lora` run, fused.

Every targeted Linear / bitsandbytes Linear4bit of the base is wrapped by `StackedLoRALinear`, which holds
the K adapters' LoRA tensors stacked (A: [K, r, in], and B stored transposed, Bt: [K, r, out]) and adds

    out[b] = base(x[b]) + scaling * (x[b] A_k^T) B_k^T          k = the adapter of row b

for a per-row adapter index set before each forward, in a few large kernels and no loop over adapters:

* "stacked": h = x [A_1; ..; A_K]^T for all rows at once, masked so each row keeps its own adapter's rank
  block (the mask carries the scaling), then h [Bt_1; ..; Bt_K]. Extra work over one adapter: K*r columns
  of two skinny matmuls (a few percent of a layer for r = 4, K = 16).
* "bmm": per-row gathered A / Bt and two batched matmuls (for large K * r).

Every module's A and Bt are views into a few flat "family" tensors [members, K, r, d] (modules grouped by
d), their gradients views into matching gradient tensors, so gradient clipping (per adapter norm) and AdamW
(elementwise, per-adapter learning rate and weight decay, bias corrections shared because every active
adapter steps on every fused step) are a handful of kernels over the families.

The trainer (`train_stacked`): each adapter walks its own batch sequence, exactly `fit_lora`'s
(`epoch_plan(its tasks, batch_size, its seed, epoch)`). A step concatenates the next batch of every active
adapter into one forward/backward (loss = sum over adapters of their batch-mean losses, so each adapter's
gradient is its own run's); rows are right-padded and the answer is read at each row's last prompt token,
so mixing rows of different lengths changes nothing beyond float noise. A step over more than `step_rows`
rows / `step_tokens` padded tokens is split into micro-steps whose gradients accumulate before the update.
An adapter is evaluated when it completes an epoch (the adapters completing together are scored in one
batched pass), keeps its best epoch by (mean val accuracy, -mean val loss) and stops after `patience`
epochs without improvement. Losses and hit counts accumulate on the device and are read once per epoch;
batches go to the device through pinned memory without a host sync.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shared.ml.encoding import Encoded
from shared.ml.evaluate import TaskMetrics, TaskScores, metrics_from_scores
from shared.ml.models import Base, answer_logits
from shared.ml.progress import Progress, silent
from shared.ml.training.costs import Cost, Meter, ModelShape
from shared.ml.training.dequant import dequantized_base
from shared.ml.training.trainer import (
    LoopKnobs,
    TaskData,
    TrainedAdapter,
    add_eval_cost,
    batching_of,
    cfg,
    epoch_plan,
    extract_state,
    hyperparameters,
    loop_knobs,
    mean,
    peft_config_dict,
    temporary_adapter,
    trainable_4bit,
)

MODES = ("auto", "stacked", "bmm")
STACK_LIMIT = 256  # auto mode: the stacked path up to this many rank columns (adapters x rank)
PROGRESS_EVERY_S = 0.5
BETAS = (0.9, 0.999)  # torch.optim.AdamW's defaults, as fit_lora uses them
EPS = 1e-8
PEFT_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------ routing


@dataclass
class Router:
    """Per-forward routing shared by every wrapped module (set by the trainer before each forward)."""

    mode: str = "stacked"
    rows: int = 0
    scaling: float = 1.0
    mask: torch.Tensor | None = None  # stacked: [rows, 1, U*r], scaling where the column is the row's adapter
    sel: torch.Tensor | None = None  # stacked: [U] adapters in use (None = all K)
    row: torch.Tensor | None = None  # bmm: [rows] adapter per row
    on: bool = False

    def route(
        self,
        adapter_ids: torch.Tensor,
        mode: str,
        cols: torch.Tensor,
        posmap: torch.Tensor | None = None,
        sel: torch.Tensor | None = None,
    ) -> None:
        """Route the next forwards: row b through adapter adapter_ids[b]. `cols` [U*r]: the position (in `sel`,
        or among all K when sel is None) of the adapter each stacked rank column belongs to; `posmap` [K]: an
        adapter's position in `sel`."""
        self.rows = int(adapter_ids.shape[0])
        self.mode = mode
        self.on = True
        if mode == "stacked":
            pos = adapter_ids if posmap is None else posmap.index_select(0, adapter_ids)
            self.mask = torch.where(pos[:, None] == cols[None, :], self.scaling, 0.0).unsqueeze(1)
            self.sel = sel
        else:
            self.row = adapter_ids


class StackedLoRALinear(nn.Module):
    """A Linear / Linear4bit plus K stacked LoRA adapters selected per row through the shared Router."""

    def __init__(
        self, base_layer: nn.Module, A: nn.Parameter, Bt: nn.Parameter, router: Router, dropout: float, quantized: bool
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.A = A  # [K, r, in]
        self.Bt = Bt  # [K, r, out]
        self._router = [router]  # a list: not a submodule
        self.dropout = dropout
        self.quantized = quantized

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        rt = self._router[0]
        if not rt.on:
            return out
        if x.shape[0] != rt.rows:
            raise RuntimeError(f"batch has {x.shape[0]} rows but the routing has {rt.rows}")
        A, Bt = self.A, self.Bt
        xs = x.to(A.dtype)
        if self.dropout:
            xs = F.dropout(xs, self.dropout, self.training)
        if rt.mode == "stacked":
            if rt.sel is None:
                a, b = A.reshape(-1, A.shape[-1]), Bt.reshape(-1, Bt.shape[-1])
            else:
                a = A.index_select(0, rt.sel).reshape(-1, A.shape[-1])
                b = Bt.index_select(0, rt.sel).reshape(-1, Bt.shape[-1])
            assert rt.mask is not None
            mask = rt.mask if xs.dim() == 3 else rt.mask.reshape(rt.rows, *([1] * (xs.dim() - 2)), -1)
            y = torch.matmul(torch.matmul(xs, a.t()) * mask, b)
        else:
            assert rt.row is not None
            x3 = xs.reshape(rt.rows, -1, xs.shape[-1])
            h = torch.bmm(x3, A.index_select(0, rt.row).transpose(1, 2))
            y = (torch.bmm(h, Bt.index_select(0, rt.row)) * rt.scaling).reshape(*x.shape[:-1], Bt.shape[-1])
        if self.quantized:  # as PEFT's bitsandbytes layers: the delta in the base's dtype, then added
            return out + y.to(out.dtype)
        return (out + y).to(out.dtype)  # as PEFT's Linear: added in float32, then cast


# ------------------------------------------------------------------------------------ the stacks


@dataclass
class _Module:
    path: str  # the PEFT state-dict prefix (".lora_A.weight" follows)
    parent: nn.Module
    attr: str
    layer: nn.Module
    in_features: int
    out_features: int
    a: tuple[int, int] = (0, 0)  # (family, member) of A
    b: tuple[int, int] = (0, 0)  # (family, member) of Bt


class LoRAStack:
    """The LoRA tensors of K adapters for every targeted module, in flat families [members, K, r, d]."""

    def __init__(self, modules: list[_Module], k: int, rank: int, device: torch.device) -> None:
        self.modules = modules
        self.k, self.rank, self.device = k, rank, device
        dims: dict[int, int] = {}
        for m in modules:
            m.a = (self._family(dims, m.in_features), 0)
            m.b = (self._family(dims, m.out_features), 0)
        counts: dict[int, int] = dict.fromkeys(dims.values(), 0)
        for m in modules:  # members in module order
            for which in ("a", "b"):
                fam = getattr(m, which)[0]
                setattr(m, which, (fam, counts[fam]))
                counts[fam] += 1
        self.dims = [d for d, _ in sorted(dims.items(), key=lambda kv: kv[1])]

        def alloc() -> list[torch.Tensor]:
            return [
                torch.zeros((counts[f], k, rank, d), dtype=torch.float32, device=device)
                for f, d in enumerate(self.dims)
            ]

        self.W, self.G, self.m, self.v, self.best = alloc(), alloc(), alloc(), alloc(), alloc()
        self.params: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
        for m in modules:
            a, b = self._param(m.a), self._param(m.b)
            self.params[m.path] = (a, b)

    @staticmethod
    def _family(dims: dict[int, int], d: int) -> int:
        return dims.setdefault(d, len(dims))

    def _param(self, where: tuple[int, int]) -> nn.Parameter:
        f, j = where
        p = nn.Parameter(self.W[f][j], requires_grad=True)  # shares W's storage
        p.grad = self.G[f][j]  # gradients accumulate in place into G
        return p

    def load(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Adapter k's tensors from a PEFT saved-form state (A [r, in], B [out, r])."""
        with torch.no_grad():
            for m in self.modules:
                a, b = self.params[m.path]
                a[k].copy_(state[f"{m.path}.lora_A.weight"].to(self.device))
                b[k].copy_(state[f"{m.path}.lora_B.weight"].t().to(self.device))

    def snapshot(self, ks: Sequence[int]) -> None:
        """Keep the current tensors of adapters `ks` as their best."""
        with torch.no_grad():
            for W, best in zip(self.W, self.best, strict=True):
                for k in ks:
                    best[:, k].copy_(W[:, k])

    def export(self, k: int, source: str = "best") -> dict[str, torch.Tensor]:
        """Adapter k in PEFT's saved form, CPU float32 copies."""
        fams = self.best if source == "best" else self.W
        out: dict[str, torch.Tensor] = {}
        for m in self.modules:
            (fa, ja), (fb, jb) = m.a, m.b
            out[f"{m.path}.lora_A.weight"] = fams[fa][ja, k].detach().to("cpu", torch.float32).clone()
            out[f"{m.path}.lora_B.weight"] = fams[fb][jb, k].detach().t().to("cpu", torch.float32).contiguous()
        return out

    # ---- optimizer ------------------------------------------------------------------------------

    def zero_grad(self) -> None:
        for g in self.G:
            g.zero_()

    @torch.no_grad()
    def clip(self, max_norm: float) -> None:
        """torch.nn.utils.clip_grad_norm_ per adapter (the norm over all of an adapter's tensors)."""
        sq = sum(((g * g).sum(dim=(0, 2, 3)) for g in self.G), torch.tensor(0.0, device=self.G[0].device))
        coef = (max_norm / (torch.sqrt(sq) + 1e-6)).clamp(max=1.0).view(1, -1, 1, 1)
        for g in self.G:
            g.mul_(coef)

    @torch.no_grad()
    def adamw(self, step: int, lr_on: torch.Tensor, decay: torch.Tensor | None) -> None:
        """One AdamW step (torch's algorithm) for every adapter; lr_on [1, K, 1, 1] is 0 for frozen adapters,
        decay [1, K, 1, 1] = 1 - lr * weight_decay (None: no weight decay)."""
        beta1, beta2 = BETAS
        bc1 = 1.0 - beta1**step
        bc2_sqrt = math.sqrt(1.0 - beta2**step)
        for W, G, m, v in zip(self.W, self.G, self.m, self.v, strict=True):
            if decay is not None:
                W.mul_(decay)
            m.lerp_(G, 1.0 - beta1)
            v.mul_(beta2).addcmul_(G, G, value=1.0 - beta2)
            upd = m / (v.sqrt() / bc2_sqrt).add_(EPS)
            W.add_(upd.mul_(lr_on), alpha=-1.0 / bc1)


def _is_4bit(layer: nn.Module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return False
    return isinstance(layer, bnb.nn.Linear4bit)


def _modules(model: nn.Module, keys: Sequence[str]) -> tuple[list[_Module], bool]:
    """The base layers behind the adapter's state keys (PEFT saved form), and whether the model is a PeftModel
    (then its own LoRA layers wrap them and are switched off while training)."""
    from peft import PeftModel

    is_peft = isinstance(model, PeftModel)
    paths = list(dict.fromkeys(k.rsplit(".lora_", 1)[0] for k in keys))
    out = []
    for path in paths:
        if is_peft:
            holder = model.get_submodule(path)
            parent, attr = (holder, "base_layer") if hasattr(holder, "base_layer") else _parent(model, path)
        else:
            parent, attr = _parent(model, path.removeprefix(PEFT_PREFIX))
        layer = getattr(parent, attr)
        in_f, out_f = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if in_f is None or out_f is None:
            raise ValueError(f"module {path!r} is a {type(layer).__name__}, not a Linear layer")
        out.append(_Module(path, parent, attr, layer, int(in_f), int(out_f)))
    return out, is_peft


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_name, _, child = path.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


@contextmanager
def stacked_lora(
    base: Base,
    states: Sequence[dict[str, torch.Tensor]],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
) -> Iterator[tuple[LoRAStack, Router]]:
    """The base with K = len(states) stacked adapters wrapped into its targeted layers (PEFT saved-form states,
    all with the same keys); the original layers are put back afterwards."""
    keys = list(states[0])
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(keys):
            raise ValueError(f"adapter {i} has other LoRA tensors than adapter 0")
    modules, is_peft = _modules(base.model, keys)
    stack = LoRAStack(modules, len(states), rank, base.device)
    for k, s in enumerate(states):
        stack.load(k, s)
    router = Router(scaling=alpha / rank)
    wrapped = []
    with ExitStack() as ctx:
        if is_peft:
            ctx.enter_context(base.model.disable_adapter())
        try:
            for m in modules:
                a, b = stack.params[m.path]
                setattr(m.parent, m.attr, StackedLoRALinear(m.layer, a, b, router, dropout, _is_4bit(m.layer)))
                wrapped.append(m)
            yield stack, router
        finally:
            for m in wrapped:
                setattr(m.parent, m.attr, m.layer)


# ----------------------------------------------------------------------------------------- tables


class RowTable:
    """Encoded rows of several tasks on the device: padded ids, lengths, answers, labels, choices, task index."""

    def __init__(self, encoded: dict[str, list[Encoded]], tasks: list[str], pad_id: int, device: torch.device) -> None:
        self.offset: dict[str, int] = {}
        rows: list[Encoded] = []
        for t in tasks:
            self.offset[t] = len(rows)
            rows.extend(encoded[t])
        self.lengths = [len(e.input_ids) for e in rows]
        width = max(self.lengths)
        width_c = max(len(e.choice_tokens) for e in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        choices = torch.full((len(rows), max(width_c, 1)), -1, dtype=torch.long)
        for i, e in enumerate(rows):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            choices[i, : len(e.choice_tokens)] = torch.tensor(e.choice_tokens, dtype=torch.long)
        task_index = {t: j for j, t in enumerate(tasks)}
        self.ids = ids.to(device)
        self.length = torch.tensor(self.lengths, device=device)
        self.answer = torch.tensor([e.answer_token for e in rows], device=device)
        self.label = torch.tensor([e.label for e in rows], device=device)
        self.choices = choices.to(device)
        self.task = torch.tensor([task_index[e.task] for e in rows], device=device)

    def batch(self, rows: torch.Tensor, width: int) -> SimpleNamespace:
        length = self.length.index_select(0, rows)
        ids = self.ids[:, :width].index_select(0, rows)
        mask = (torch.arange(width, device=ids.device)[None, :] < length[:, None]).long()
        return SimpleNamespace(input_ids=ids, attention_mask=mask, last_index=length - 1)


def _upload(values: list[list[int]], device: torch.device) -> torch.Tensor:
    """A small int64 table to the device without a host sync (through pinned memory on CUDA)."""
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _chunks(
    rows: Sequence[tuple[int, ...]], lengths: list[int], max_rows: int | None, max_tokens: int | None
) -> list[list[tuple[int, ...]]]:
    """Split rows (first field: table row) into pieces of at most max_rows rows and max_tokens padded tokens,
    length-sorted when a split is needed."""
    width = max(lengths[r[0]] for r in rows)
    if (max_rows is None or len(rows) <= max_rows) and (max_tokens is None or len(rows) * width <= max_tokens):
        return [list(rows)]
    out: list[list[tuple[int, ...]]] = []
    cur: list[tuple[int, ...]] = []
    for r in sorted(rows, key=lambda r: lengths[r[0]]):
        n = lengths[r[0]]
        if cur and (
            (max_rows is not None and len(cur) >= max_rows)
            or (max_tokens is not None and (len(cur) + 1) * n > max_tokens)
        ):
            out.append(cur)
            cur = []
        cur.append(r)
    out.append(cur)
    return out


# ---------------------------------------------------------------------------------------- the trainer


@dataclass
class Job:
    """One adapter to train in the fused run (what `train_stacked` needs of an AdapterSpec)."""

    name: str
    tasks: list[str]
    seed: int
    lr: float
    epochs: int
    init_state: dict[str, torch.Tensor] | None = field(default=None, repr=False)


@dataclass
class _Adapter:
    k: int
    job: Job
    plan: list[list[int]] = field(default_factory=list)  # this epoch's batches (train table rows)
    pos: int = 0
    epoch: int = 0
    active: bool = True
    cost: Cost = field(default_factory=Cost)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: tuple[tuple[float, ...], int, dict[str, TaskMetrics]] | None = None
    since_best: int = 0
    seen: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    epoch_start: float = 0.0
    batches_done: int = 0
    peft_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class _ActiveSet:
    """Device-side vectors of one set of active adapters."""

    active: tuple[int, ...]
    lr_on: torch.Tensor  # [1, K, 1, 1] learning rate, 0 for finished adapters
    decay: torch.Tensor | None  # [1, K, 1, 1] 1 - lr * weight_decay (None: no weight decay)
    sel: torch.Tensor | None  # [U] active adapters (None: all K)
    posmap: torch.Tensor | None  # [K] position of an adapter in sel
    cols: torch.Tensor  # [U * r] the adapter position each stacked rank column belongs to


def _add_train_cost(cost: Cost, shape: ModelShape, lengths: Sequence[int]) -> None:
    """Cost.add_train from row lengths (no mask tensor needed)."""
    tokens, rows, sq = sum(lengths), len(lengths), sum(n * n for n in lengths)
    cost.train_tokens += tokens
    cost.train_rows += rows
    cost.train_flops += shape.forward_flops(tokens, rows, sq) + shape.backward_flops(tokens, rows, sq)
    cost.steps += 1


@dataclass(frozen=True)
class _Knobs(LoopKnobs):
    """The loop knobs of a fused run (the same for every adapter; each job brings its lr, epochs and seed)."""

    eval_batch_size: int
    step_rows: int | None
    step_tokens: int | None
    batching: str
    batch_tokens: int | None


def _knobs(config: Any) -> _Knobs:
    """The config's knobs with the trainer's defaults (as fit_lora reads them)."""
    knobs = loop_knobs(config)
    eval_batch_size = int(cfg(config, "eval_batch_size", 32))
    step_rows = cfg(config, "step_rows")
    step_tokens = cfg(config, "step_tokens")
    batching, batch_tokens = batching_of(config)
    return _Knobs(
        **vars(knobs),
        eval_batch_size=eval_batch_size,
        step_rows=step_rows,
        step_tokens=step_tokens,
        batching=batching,
        batch_tokens=batch_tokens,
    )


def _check_jobs(jobs: Sequence[Job], data: dict[str, TaskData]) -> None:
    """Every job has tasks, all of them prepared."""
    for job in jobs:
        missing = [t for t in job.tasks if t not in data]
        if missing:
            raise ValueError(f"adapter {job.name!r}: no prepared data for task(s) {missing}")
        if not job.tasks:
            raise ValueError(f"adapter {job.name!r} has no tasks")


def _initial_states(base: Base, adapters: list[_Adapter], knobs: _Knobs) -> list[dict[str, torch.Tensor]]:
    """Fresh seeded initialisations (or the given init states), exactly as fit_lora attaches them; records each
    adapter's PEFT config."""
    states = []
    for ad in adapters:
        job = ad.job
        with temporary_adapter(
            base, job.name, knobs.rank, knobs.alpha, knobs.targets, knobs.dropout, job.seed, job.init_state
        ) as pm:
            states.append(extract_state(pm, job.name))
            ad.peft_config = peft_config_dict(pm.peft_config[job.name])
    return states


@dataclass(frozen=True)
class _Rows:
    """The encoded training and validation rows of every job's tasks, as device tables and per-task lookups."""

    tasks: list[str]
    val_enc: dict[str, list[Encoded]]
    train: RowTable
    val: RowTable
    task_lengths: dict[str, list[int]]  # training row lengths
    task_pos: dict[str, int]
    row_task: list[str]  # the task of each training table row

    def job_batches(self, job: Job, knobs: _Knobs, epoch: int) -> list[list[tuple[str, int]]]:
        """The job's batches of one epoch, exactly `fit_lora`'s (task, row) batches."""
        lengths = {t: self.task_lengths[t] for t in job.tasks}
        return epoch_plan(lengths, knobs.batch_size, job.seed, epoch, knobs.batching, knobs.batch_tokens)

    def plan(self, ad: _Adapter, knobs: _Knobs) -> list[list[int]]:
        """Adapter `ad`'s batches of its current epoch, as training table rows."""
        return [[self.train.offset[t] + i for t, i in b] for b in self.job_batches(ad.job, knobs, ad.epoch)]


def _rows(base: Base, jobs: Sequence[Job], data: dict[str, TaskData], knobs: _Knobs) -> _Rows:
    """Encode the jobs' tasks (training and validation splits) into device tables."""
    tokenizer = base.tokenizer
    pad_id = tokenizer.pad_token_id or 0
    tasks = list(dict.fromkeys(t for job in jobs for t in job.tasks))
    train_enc = {t: data[t].encodings("train", tokenizer, knobs.max_length) for t in tasks}
    val_enc = {t: data[t].encodings("val", tokenizer, knobs.max_length) for t in tasks}
    return _Rows(
        tasks=tasks,
        val_enc=val_enc,
        train=RowTable(train_enc, tasks, pad_id, base.device),
        val=RowTable(val_enc, tasks, pad_id, base.device),
        task_lengths={t: [len(e.input_ids) for e in train_enc[t]] for t in tasks},
        task_pos={t: j for j, t in enumerate(tasks)},
        row_task=[t for t in tasks for _ in train_enc[t]],
    )


class _FusedLoop:
    """The training loop of one fused run: every active adapter steps together, each on its own batches."""

    def __init__(
        self,
        adapters: list[_Adapter],
        data: dict[str, TaskData],
        rows: _Rows,
        knobs: _Knobs,
        shape: ModelShape,
        stack: LoRAStack,
        router: Router,
        model: nn.Module,
        device: torch.device,
        mode: str,
    ) -> None:
        self.adapters, self.data, self.rows, self.knobs, self.shape = adapters, data, rows, knobs, shape
        self.stack, self.router, self.model, self.device, self.mode = stack, router, model, device, mode
        self.K = K = len(adapters)
        self.n_tasks = len(rows.tasks)
        self.loss_acc = torch.zeros(K, dtype=torch.float64, device=device)
        self.hit_acc = torch.zeros(K * self.n_tasks, dtype=torch.long, device=device)
        self.lr_host = [ad.job.lr for ad in adapters]
        self.active_cache: dict[tuple[int, ...], _ActiveSet] = {}
        self.training = False
        self.eval_seconds = 0.0

    def active_set(self, active: tuple[int, ...]) -> _ActiveSet:
        """Device vectors for the set of active adapters (rebuilt only when it changes, at epoch ends)."""
        K, rank, device, weight_decay = self.K, self.knobs.rank, self.device, self.knobs.weight_decay
        if active not in self.active_cache:
            on = [self.lr_host[k] if k in active else 0.0 for k in range(K)]
            lr_on = torch.tensor(on, dtype=torch.float32).view(1, K, 1, 1).to(device)
            decay = None
            if weight_decay:
                decay = (
                    torch.tensor([1.0 - x * weight_decay for x in on], dtype=torch.float32).view(1, K, 1, 1).to(device)
                )
            sel = posmap = None
            if len(active) < K:
                sel = torch.tensor(active, dtype=torch.long).to(device)
                posmap = torch.tensor([active.index(k) if k in active else 0 for k in range(K)]).to(device)
            cols = (torch.arange(len(active) * rank) // rank).to(device)
            self.active_cache.clear()
            self.active_cache[active] = _ActiveSet(active, lr_on, decay, sel, posmap, cols)
        return self.active_cache[active]

    def current_set(self) -> _ActiveSet:
        """The active set of the adapters still training."""
        return self.active_set(tuple(ad.k for ad in self.adapters if ad.active))

    def route(self, adapter_ids: torch.Tensor, act: _ActiveSet) -> None:
        """Route the next forwards' rows to their adapters (auto mode: stacked up to STACK_LIMIT rank columns)."""
        mode = self.mode
        use = mode if mode != "auto" else ("stacked" if len(act.active) * self.knobs.rank <= STACK_LIMIT else "bmm")
        self.router.route(adapter_ids, use, act.cols, act.posmap, act.sel)

    def set_training(self, on: bool) -> None:
        """Switch the model's train/eval mode only when it changes."""
        if self.training != on:
            self.model.train(on)
            self.training = on

    def train_step(self, parts: list[tuple[_Adapter, list[int]]], step: int) -> None:
        """One fused optimizer step over the next batch of every active adapter (micro-steps as needed)."""
        train, knobs = self.rows.train, self.knobs
        act = self.current_set()
        rows = [(r, ad.k, len(b)) for ad, b in parts for r in b]
        self.stack.zero_grad()
        self.set_training(True)
        for chunk in _chunks(rows, train.lengths, knobs.step_rows, knobs.step_tokens):
            width = max(train.lengths[r[0]] for r in chunk)
            table = _upload([list(col) for col in zip(*chunk, strict=True)], self.device)
            idx, ad_ids, n_rows = table[0], table[1], table[2]
            self.route(ad_ids, act)
            logits = answer_logits(self.model, train.batch(idx, width))
            ce = F.cross_entropy(logits, train.answer.index_select(0, idx), reduction="none")
            (ce / n_rows).sum().backward()
            with torch.no_grad():
                self.loss_acc.index_add_(0, ad_ids, ce.detach().double())
                choices = train.choices.index_select(0, idx)
                z = logits.detach().gather(1, choices.clamp(min=0)).masked_fill(choices < 0, float("-inf"))
                hit = (z.argmax(-1) == train.label.index_select(0, idx)).long()
                self.hit_acc.index_add_(0, ad_ids * self.n_tasks + train.task.index_select(0, idx), hit)
        self.router.on = False
        if knobs.max_grad_norm:
            self.stack.clip(float(knobs.max_grad_norm))
        self.stack.adamw(step, act.lr_on, act.decay)

    @torch.no_grad()
    def evaluate(self, done: list[_Adapter]) -> dict[int, tuple[dict[str, TaskScores], dict[str, TaskMetrics]]]:
        """Validation scores of the adapters in `done`, in one batched pass over all their rows."""
        val, val_enc = self.rows.val, self.rows.val_enc
        rows = [(val.offset[t] + i, ad.k) for ad in done for t in ad.job.tasks for i in range(len(val_enc[t]))]
        act = self.current_set()
        cap = self.knobs.eval_batch_size * len(done)
        self.set_training(False)
        outs = []
        for chunk in _chunks(rows, val.lengths, cap, self.knobs.step_tokens):
            width = max(val.lengths[r[0]] for r in chunk)
            table = _upload([list(col) for col in zip(*chunk, strict=True)], self.device)
            idx, ad_ids = table[0], table[1]
            self.route(ad_ids, act)
            full = answer_logits(self.model, val.batch(idx, width))
            choices = val.choices.index_select(0, idx)
            z = full.gather(1, choices.clamp(min=0))
            nll = torch.logsumexp(full, -1) - full.gather(1, val.answer.index_select(0, idx)[:, None])[:, 0]
            outs.append((idx, ad_ids, z, nll))
        self.router.on = False
        idx = torch.cat([o[0] for o in outs]).cpu()
        ad_ids = torch.cat([o[1] for o in outs]).cpu()
        z = torch.cat([o[2] for o in outs]).float().cpu()
        nll = torch.cat([o[3] for o in outs]).float().cpu()
        where = {(int(a), int(r)): j for j, (a, r) in enumerate(zip(ad_ids.tolist(), idx.tolist(), strict=True))}
        result = {}
        for ad in done:
            scores, metrics = {}, {}
            for t in ad.job.tasks:
                d = self.data[t]
                sel_rows = torch.tensor([where[(ad.k, val.offset[t] + i)] for i in range(len(val_enc[t]))])
                c = d.bound.num_choices
                scores[t] = TaskScores(
                    [e.id for e in d.val],
                    z[sel_rows, :c],
                    torch.tensor([e.label for e in d.val]),
                    nll[sel_rows],
                )
                metrics[t] = metrics_from_scores(scores[t], c)
                add_eval_cost(ad.cost, self.shape, [len(e.input_ids) for e in val_enc[t]])
            result[ad.k] = (scores, metrics)
        return result

    def start_epoch(self, ad: _Adapter) -> None:
        """Adapter `ad`'s next epoch: its batch plan and fresh counters."""
        ad.epoch += 1
        ad.plan, ad.pos, ad.seen, ad.rows = self.rows.plan(ad, self.knobs), 0, {}, 0
        ad.epoch_start = time.perf_counter()

    def record_epoch(self, ad: _Adapter, train_loss: float, hits: list[int], metrics: dict[str, TaskMetrics]) -> bool:
        """Adapter `ad`'s history entry of the epoch it completed; whether the epoch is its best so far. Finishes
        the adapter at its last epoch or after `patience` epochs without improvement."""
        loss = train_loss / max(ad.rows, 1)
        if not math.isfinite(loss):
            raise RuntimeError(
                f"adapter {ad.job.name!r}: training loss became {loss} at epoch {ad.epoch}; "
                f"lower the learning rate ({ad.job.lr})"
            )
        acc = mean([m.accuracy for m in metrics.values()])
        vloss = mean([m.loss for m in metrics.values()])
        score = (acc, -vloss)
        task_pos = self.rows.task_pos
        train_acc = {t: hits[task_pos[t]] / ad.seen[t] for t in ad.job.tasks if ad.seen.get(t)}
        ad.history.append(
            {
                "epoch": ad.epoch,
                "train_loss": loss,
                "val_accuracy": acc,
                "val_loss": vloss,
                "val": {t: m.to_dict() for t, m in metrics.items()},
                **({"train_accuracy": mean(list(train_acc.values())), "train": train_acc} if train_acc else {}),
                "seconds": round(time.perf_counter() - ad.epoch_start, 3),
            }
        )
        improved = ad.best is None or score > ad.best[0]
        if improved:
            ad.best = (score, ad.epoch, copy.deepcopy(metrics))
            ad.since_best = 0
        else:
            ad.since_best += 1
            if self.knobs.patience and ad.since_best >= int(self.knobs.patience):
                ad.active = False
        if ad.epoch >= ad.job.epochs:
            ad.active = False
        return improved

    def close_epochs(self, done: list[_Adapter]) -> None:
        """Read and reset the epoch's losses and hits of the adapters in `done`, evaluate them together, keep
        the improved ones' tensors and start the next epoch of those still active."""
        t0 = time.perf_counter()
        K, n_tasks = self.K, self.n_tasks
        ks = torch.tensor([ad.k for ad in done], device=self.device)
        train_loss = self.loss_acc.index_select(0, ks).cpu().tolist()
        hits = self.hit_acc.view(K, n_tasks).index_select(0, ks).cpu().tolist()
        self.loss_acc.index_fill_(0, ks, 0.0)
        self.hit_acc.view(K, n_tasks).index_fill_(0, ks, 0)
        evaluated = self.evaluate(done)
        improved = []
        for j, ad in enumerate(done):
            if self.record_epoch(ad, train_loss[j], hits[j], evaluated[ad.k][1]):
                improved.append(ad.k)
        self.stack.snapshot(improved)
        for ad in done:
            if ad.active:
                self.start_epoch(ad)
        self.eval_seconds += time.perf_counter() - t0

    def next_batches(self) -> list[tuple[_Adapter, list[int]]]:
        """The next batch of every active adapter (advancing its position, rows seen and training cost)."""
        parts = []
        for ad in self.adapters:
            if not ad.active:
                continue
            batch = ad.plan[ad.pos]
            ad.pos += 1
            ad.rows += len(batch)
            for r in batch:
                task = self.rows.row_task[r]
                ad.seen[task] = ad.seen.get(task, 0) + 1
            _add_train_cost(ad.cost, self.shape, [self.rows.train.lengths[r] for r in batch])
            parts.append((ad, batch))
        return parts

    def run(self, progress: Progress, stage: str, total: int) -> None:
        """Step until every adapter has finished (its last epoch, or early stopping)."""
        adapters = self.adapters
        for ad in adapters:
            self.start_epoch(ad)
        step = 0
        last_report = 0.0
        done_batches = 0
        while any(ad.active for ad in adapters):
            parts = self.next_batches()
            step += 1
            self.train_step(parts, step)
            done_batches += len(parts)
            finished = [ad for ad, _ in parts if ad.pos >= len(ad.plan)]
            if finished:
                self.close_epochs(finished)
            now = time.perf_counter()
            if finished or now - last_report >= PROGRESS_EVERY_S:
                last_report = now
                epochs_now = sorted({ad.epoch for ad in adapters if ad.active})
                progress(
                    stage,
                    min(done_batches, total),
                    total,
                    f"{sum(ad.active for ad in adapters)}/{self.K} active, epoch {epochs_now[0] if epochs_now else '-'}",
                )
        progress(stage, total, total, "done")


def _share_fused_cost(results: list[TrainedAdapter], meter: Meter, eval_seconds: float, mode: str) -> None:
    """One fused run: its wall time is shared out by FLOPs, its peak memory is every adapter's."""
    total_flops = sum(r.cost.total_flops for r in results) or 1.0
    for r in results:
        r.cost.wall_seconds = meter.cost.wall_seconds * r.cost.total_flops / total_flops
        r.cost.peak_memory_bytes, r.cost.peak_memory_kind = meter.cost.peak_memory_bytes, meter.cost.peak_memory_kind
        r.extra.update(
            {
                "fused": {
                    "adapters": len(results),
                    "wall_seconds": round(meter.cost.wall_seconds, 3),
                    "eval_seconds": round(eval_seconds, 3),
                    "mode": mode,
                }
            }
        )


def train_stacked(
    base: Base,
    jobs: Sequence[Job],
    config: Any,
    data: dict[str, TaskData],
    progress: Progress = silent,
    *,
    mode: str = "auto",
    stage: str | None = None,
) -> list[TrainedAdapter]:
    """Train every job's adapter in one fused run; each result is what `train_adapter` gives for it alone."""
    if not jobs:
        return []
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    knobs = _knobs(config)
    K = len(jobs)
    stage = stage or (f"train {jobs[0].name}" if K == 1 else f"train {K} adapters")
    _check_jobs(jobs, data)
    trainable_4bit(base.model)
    shape = ModelShape.from_model(base.model, knobs.rank, knobs.targets)
    adapters = [_Adapter(k, job) for k, job in enumerate(jobs)]
    states = _initial_states(base, adapters, knobs)
    rows = _rows(base, jobs, data, knobs)
    # batches of the whole run, for progress ("length" batching: epoch 1's count per epoch)
    total = sum(len(rows.job_batches(ad.job, knobs, 1)) * ad.job.epochs for ad in adapters)

    meter = Meter(base.device)
    generator_state = torch.random.get_rng_state()
    with (
        meter,
        stacked_lora(base, states, knobs.rank, knobs.alpha, knobs.dropout) as (stack, router),
        dequantized_base(base.model, cfg(config, "dequantize", "auto")),
    ):
        model = base.model
        try:
            torch.manual_seed(jobs[0].seed)  # dropout (if any) is the only random draw
            loop = _FusedLoop(adapters, data, rows, knobs, shape, stack, router, model, base.device, mode)
            loop.run(progress, stage, total)
            results = [_result(ad, stack.export(ad.k), config, knobs) for ad in adapters]
        finally:
            router.on = False
            model.eval()
            torch.random.set_rng_state(generator_state)
    _share_fused_cost(results, meter, loop.eval_seconds, mode)
    return results


def _result(ad: _Adapter, state: dict[str, torch.Tensor], config: Any, knobs: _Knobs) -> TrainedAdapter:
    assert ad.best is not None
    _, best_epoch, metrics = ad.best
    job = ad.job
    hyper = hyperparameters(
        config,
        epochs=job.epochs,
        lr=job.lr,
        seed=job.seed,
        batch_size=knobs.batch_size,
        rank=knobs.rank,
        alpha=knobs.alpha,
        targets=knobs.targets,
        dropout=knobs.dropout,
        weight_decay=knobs.weight_decay,
        max_grad_norm=knobs.max_grad_norm,
        patience=knobs.patience,
        max_length=knobs.max_length,
        batching=knobs.batching,
        batch_tokens=knobs.batch_tokens,
    )
    return TrainedAdapter(
        name=job.name,
        tasks=list(job.tasks),
        state=state,
        val_metrics=metrics,
        history=ad.history,
        best_epoch=best_epoch,
        cost=ad.cost,
        peft_config=ad.peft_config,
        hyperparameters=hyper,
        seed=job.seed,
    )
