"""Estimated fine-tuned performance of theta0 + P w for many subsets, several adapters per forward.

Every candidate adapter shares theta0's A matrices and differs only in B (Delta_B = P w; A stays at
theta0), so a batch can mix rows of different adapters: a forward hook on each lora_B replaces its output
with bmm(h, B[adapter of row]^T), where h = A x is shared. One forward thus evaluates up to
`subsets_per_forward` adapters on the same padded rows.

Linear-proxy mode needs no forward: loss = mean softplus(-(f0 + g . w)) on the task's validation rows
(their gradients are computed once); its "accuracy" is the fraction of rows with f0 + g . w > 0, i.e.
p(gold token) > 1/2 under the full vocabulary (a proxy, not the choice-restricted accuracy); macro-F1 is
not available (NaN).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from shared.ml.affinity.batching import cut_sorted
from shared.ml.affinity.gradients import LoraSite, output_f
from shared.ml.encoding import Encoded, collate
from shared.ml.evaluate import TaskMetrics, TaskScores, metrics_from_scores
from shared.ml.models import answer_logits
from shared.ml.progress import Progress, silent


class RowLoRA:
    """Per-row B increments: while active, lora_B(h)[b] = h[b] @ (B0 + stacks[name][slot[b]])^T.

    The stacks hold Delta_B only; B0 (zero for a fresh adapter, trained for a meta-initialisation) stays in
    the module and is applied by its own forward."""

    def __init__(self, sites: Sequence[LoraSite], stacks: Mapping[str, torch.Tensor]) -> None:
        self.sites = list(sites)
        self.stacks = dict(stacks)  # name -> [C, out, r] float32
        self.slots: torch.Tensor | None = None
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            assert self.slots is not None, "RowLoRA.slots not set"
            h = inputs[0]
            B = self.stacks[name].index_select(0, self.slots)  # [b, out, r]
            return output + torch.bmm(h.float(), B.transpose(1, 2)).to(output.dtype)

        return hook

    def __enter__(self) -> RowLoRA:
        for s in self.sites:
            self._handles.append(s.lora_b.register_forward_hook(self._hook(s.param_name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass
class RowOutputs:
    """Per item (in input order): choice logits of its task, full-vocab NLL of the gold token, and f
    (gradients.output_f with the run's `output`)."""

    choice_logits: torch.Tensor  # [n, C]
    nll: torch.Tensor  # [n]
    f: torch.Tensor  # [n]


@torch.no_grad()
def multiplexed_forward(
    model: Any,
    sites: Sequence[LoraSite],
    stacks: Mapping[str, torch.Tensor],
    items: Sequence[tuple[Encoded, int]],
    choice_ids: Sequence[int],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    progress: Progress = silent,
    stage: str = "estimate",
    message: str = "",
    output: str = "vocab",
    max_tokens: int | None = None,
) -> RowOutputs:
    """Evaluate (example, adapter slot) pairs of ONE task; rows are length-sorted and padded per batch (at most
    batch_size rows and max_tokens padded tokens)."""
    lengths = [len(ex.input_ids) for ex, _ in items]
    order = sorted(range(len(items)), key=lambda i: (lengths[i], items[i][1]))
    choice = torch.tensor(list(choice_ids), device=device)
    n = len(items)
    out_choice = torch.zeros(n, len(choice_ids))
    out_nll = torch.zeros(n)
    out_f = torch.zeros(n)
    dev_stacks = {k: v.to(device, torch.float32) for k, v in stacks.items()}
    chunks = cut_sorted(order, lengths, batch_size, max_tokens)
    with RowLoRA(sites, dev_stacks) as mux:
        for b, chunk in enumerate(chunks):
            batch = collate([items[i][0] for i in chunk], pad_id).to(device)
            mux.slots = torch.tensor([items[i][1] for i in chunk], device=device)
            logits = answer_logits(model, batch)
            idx = torch.tensor(chunk)
            out_choice[idx] = logits[:, choice].cpu()
            out_nll[idx] = (torch.logsumexp(logits, -1) - logits.gather(1, batch.answer_tokens[:, None])[:, 0]).cpu()
            out_f[idx] = output_f(logits, batch, output).cpu()
            progress(stage, b + 1, len(chunks), message)
    return RowOutputs(out_choice, out_nll, out_f)


def task_metrics(outputs: RowOutputs, items: Sequence[Encoded], num_classes: int) -> TaskMetrics:
    scores = TaskScores(
        [it.example_id for it in items], outputs.choice_logits, torch.tensor([it.label for it in items]), outputs.nll
    )
    return metrics_from_scores(scores, num_classes)


def stack_deltas(projector: Any, W: torch.Tensor) -> dict[str, torch.Tensor]:
    """{B param name: [K, out, r]} = P w_k for the rows of W [K, d] (block-generated, on the projector's device)."""
    return projector.backmap(W)


def delta_norms(stacks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """||Delta_k|| over all B tensors for each adapter k."""
    total = None
    for v in stacks.values():
        sq = (v.float() ** 2).flatten(1).sum(1)
        total = sq if total is None else total + sq
    assert total is not None
    return total.sqrt().cpu()


def evaluate_subsets_forward(
    rt: Any,
    subsets: Sequence[Sequence[int]],
    W: torch.Tensor | None,
    val_rows: Any,
    progress: Progress = silent,
    stage: str = "estimate",
    message: str = "",
    stacks: Mapping[str, torch.Tensor] | None = None,
) -> tuple[list[dict[str, TaskMetrics]], torch.Tensor]:
    """Real forward at theta0 + Delta_k on each task of subset k (task indices into val_rows.tasks).

    Delta_k = P w_k (from W [K, d]) unless explicit B `stacks` {name: [K, out, r]} are given. All K adapters
    are evaluated together (a batch mixes the adapters of the subsets containing the task); returns
    per-subset {task name: metrics} and ||Delta_k||.
    """
    if stacks is None:
        assert W is not None
        stacks = stack_deltas(rt.projector, W)
    norms = delta_norms(stacks)
    results: list[dict[str, TaskMetrics]] = [{} for _ in subsets]
    pad = rt.tokenizer.pad_token_id or 0
    used = sorted({t for s in subsets for t in s})
    for t in used:
        name = val_rows.tasks[t]
        members = [k for k, s in enumerate(subsets) if t in s]
        rows = val_rows.task_rows(t)
        examples = [val_rows.items[i] for i in rows]
        items = [(ex, slot) for slot in range(len(members)) for ex in examples]
        sub = {k: v[members] for k, v in stacks.items()}
        out = multiplexed_forward(
            rt.model,
            rt.sites,
            sub,
            items,
            rt.bound[name].choice_token_ids,
            rt.batching.eval_rows,
            pad,
            rt.device,
            progress,
            stage,
            message or name,
            max_tokens=rt.batching.eval_tokens,
        )
        n = len(examples)
        for slot, k in enumerate(members):
            part = RowOutputs(
                out.choice_logits[slot * n : (slot + 1) * n],
                out.nll[slot * n : (slot + 1) * n],
                out.f[slot * n : (slot + 1) * n],
            )
            results[k][name] = task_metrics(part, examples, rt.bound[name].num_choices)
    return results, norms


def representer_deltas(
    rt: Any,
    train_rows: Any,
    subsets: Sequence[Sequence[int]],
    W: torch.Tensor,
    G: torch.Tensor,
    f0: torch.Tensor,
    lam: float,
    progress: Progress = silent,
    stage: str = "representer",
) -> dict[str, torch.Tensor]:
    """Delta_k = sum_{i in S_k} c_ki g_i with c_ki = sigmoid(-(f0_i + g~_i . w_k)) / (2 lam |S_k|), in full space.

    At the optimum of the sketched problem w_k = P^T Delta_k exactly (stationarity), so Delta_k is the
    un-sketched direction whose sketch is w_k; unlike P w_k = P P^T Delta_k it carries no JL noise of
    norm ~ sqrt(D / d) ||Delta_k||. Costs one more gradient pass over the subsets' training rows (per-example
    B gradients from the same hooks, contracted with the coefficients; nothing projected).
    """
    from shared.ml.affinity.gradients import LoraGradCapture, lora_grad_only

    K = len(subsets)
    N = len(train_rows)
    C = torch.zeros(K, N, dtype=torch.float64)
    for k, s in enumerate(subsets):
        rows = torch.as_tensor(subset_rows(train_rows, s))
        z = f0[rows].double() + G[rows].double() @ W[k].double()
        C[k, rows] = torch.sigmoid(-z) / (2 * lam * len(rows))
    used = torch.nonzero(C.abs().sum(0) > 0).flatten().tolist()
    lengths = [len(it.input_ids) for it in train_rows.items]
    used.sort(key=lambda i: lengths[i])
    chunks = cut_sorted(used, lengths, rt.batching.rows, rt.batching.tokens)
    stacks = {site.param_name: torch.zeros(K, *site.shape, device=rt.device) for site in rt.sites}
    pad = rt.tokenizer.pad_token_id or 0
    Cd = C.float().to(rt.device)
    with lora_grad_only(rt.model), LoraGradCapture(rt.model, output=rt.output) as cap:
        for b, chunk in enumerate(chunks):
            batch = collate([train_rows.items[i] for i in chunk], pad).to(rt.device)
            _, grads = cap.run(rt.model, batch)
            coef = Cd[:, torch.as_tensor(chunk, device=rt.device)]  # [K, b]
            for name, g in grads.items():
                stacks[name] += torch.einsum("kb,bor->kor", coef, g)
            cap.clear_grads()
            progress(stage, b + 1, len(chunks), "")
    return stacks


def evaluate_subsets_linear(
    subsets: Sequence[Sequence[int]], W: torch.Tensor, G_val: torch.Tensor, f0_val: torch.Tensor, val_rows: Any
) -> list[dict[str, TaskMetrics]]:
    """Linear proxy on validation rows: loss = mean softplus(-(f0 + g . w)); accuracy = mean(f0 + g . w > 0)."""
    results: list[dict[str, TaskMetrics]] = [{} for _ in subsets]
    for k, s in enumerate(subsets):
        for t in s:
            rows = torch.as_tensor(val_rows.task_rows(t))
            z = f0_val[rows].double() + G_val[rows].double() @ W[k].double()
            results[k][val_rows.tasks[t]] = TaskMetrics(
                loss=float(F.softplus(-z).mean()),
                accuracy=float((z > 0).double().mean()),
                macro_f1=float("nan"),
                n=len(rows),
            )
    return results


@torch.no_grad()
def evaluate_base(rt: Any, val_rows: Any, progress: Progress = silent) -> dict[str, TaskMetrics]:
    """Metrics at theta0 (the base model for init='base', B = 0) on each task's validation rows."""
    zero = {s.param_name: torch.zeros(1, *s.shape) for s in rt.sites}
    pad = rt.tokenizer.pad_token_id or 0
    out: dict[str, TaskMetrics] = {}
    for t, name in enumerate(val_rows.tasks):
        examples = [val_rows.items[i] for i in val_rows.task_rows(t)]
        res = multiplexed_forward(
            rt.model,
            rt.sites,
            zero,
            [(ex, 0) for ex in examples],
            rt.bound[name].choice_token_ids,
            rt.batching.eval_rows,
            pad,
            rt.device,
            progress,
            "base eval",
            name,
            max_tokens=rt.batching.eval_tokens,
        )
        out[name] = task_metrics(res, examples, rt.bound[name].num_choices)
    return out


@contextmanager
def no_grad_eval(model: Any) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def subset_rows(train_rows: Any, subset: Sequence[int]) -> np.ndarray:
    return np.flatnonzero(np.isin(train_rows.task_index, list(subset)))
