"""Stage 1a: f0 and per-example gradients w.r.t. the LoRA matrices (B, or A and B), all rows of a batch in ONE backward.

f(x, y) = z_y - logsumexp_{v != y} z_v, the log-odds of the gold answer token under the full-vocabulary
softmax at the answer position (exact and stable: no clipping). sigmoid(f) = p(y), so softplus(-f) is
the answer-token cross-entropy, which is what the Stage-1b logistic regression linearises.

output="choice" differentiates the same log-odds restricted to the task's answer choices instead,
f = z_y - logsumexp_{c in choices, c != y} z_c, so that softplus(-f) is exactly the cross-entropy over
the choices and f > 0 iff the gold choice wins. The full-vocabulary f also rewards moving probability
from the rest of the vocabulary onto all the answer words alike, a direction a linear model can follow
without bound but that leaves the choice accuracy unchanged (see the closing note of issue 3).

At a fresh theta0 (B = 0) the gradient w.r.t. every A is exactly zero, so by default only the B matrices are
differentiated (factors="B"). From a meta-initialised theta0 (B0 != 0) the A directions carry part of the
first-order change; factors="AB" differentiates both.
For a LoRA layer out = base(x) + s * B (A x): a hook on each differentiated module (lora_B, and lora_A for
"AB") captures its input u (h = A x for B, x for A) [b, T, in] and the gradient delta at its output
[b, T, out] (for B this already contains the scaling s; for A it is B^T s delta_B), and the per-example
gradient of its weight is sum_t delta_{i,t} u_{i,t}^T (one batched matmul; padded positions are masked out,
and with right padding they carry no gradient anyway). The per-example gradients are projected to d
dimensions layer by layer with the block-generated sketch (projection.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from shared.ml.affinity.projection import ProjectionSpec, Projector
from shared.ml.encoding import Batch


@dataclass
class LoraSite:
    """One LoRA-wrapped linear layer: its lora_B module and the name of the B parameter."""

    module_name: str
    lora_b: torch.nn.Module
    lora_a: torch.nn.Module
    param_name: str  # named_parameters name of lora_B weight
    shape: tuple[int, ...]  # (out_features, r)


def lora_sites(model: Any, adapter: str = "default") -> list[LoraSite]:
    """The LoRA layers of `adapter` in named_parameters order of their B weights."""
    by_param: dict[str, LoraSite] = {}
    for name, module in model.named_modules():
        lora_b = getattr(module, "lora_B", None)
        if isinstance(lora_b, torch.nn.ModuleDict) and adapter in lora_b:
            b = lora_b[adapter]
            pname = f"{name}.lora_B.{adapter}.weight"
            by_param[pname] = LoraSite(name, b, module.lora_A[adapter], pname, tuple(b.get_parameter("weight").shape))
    order = [n for n, _ in model.named_parameters() if n in by_param]
    if not order:
        raise ValueError(f"model has no LoRA adapter {adapter!r} (attach_lora first)")
    return [by_param[n] for n in order]


FACTORS = ("B", "AB")


@dataclass
class GradParam:
    """One differentiated LoRA matrix: the module (lora_A or lora_B of one layer) whose weight it is."""

    module: torch.nn.Module
    param_name: str  # named_parameters name of the module's weight
    shape: tuple[int, ...]  # the weight's (out_features, in_features)


def grad_params(model: Any, adapter: str = "default", factors: str = "B") -> list[GradParam]:
    """The LoRA matrices of `adapter` that Stage 1 differentiates (B, or A and B), in named_parameters order."""
    if factors not in FACTORS:
        raise ValueError(f"unknown factors {factors!r}; expected one of {FACTORS}")
    kinds = ("lora_A", "lora_B") if factors == "AB" else ("lora_B",)
    by_param: dict[str, GradParam] = {}
    for name, module in model.named_modules():
        for kind in kinds:
            holder = getattr(module, kind, None)
            if isinstance(holder, torch.nn.ModuleDict) and adapter in holder:
                pname = f"{name}.{kind}.{adapter}.weight"
                by_param[pname] = GradParam(
                    holder[adapter], pname, tuple(holder[adapter].get_parameter("weight").shape)
                )
    order = [n for n, _ in model.named_parameters() if n in by_param]
    if not order:
        raise ValueError(f"model has no LoRA adapter {adapter!r} (attach_lora first)")
    return [by_param[n] for n in order]


def spec_for(model: Any, seed: int, dim: int, adapter: str = "default", factors: str = "B") -> ProjectionSpec:
    """The projection spec over the differentiated matrices of `adapter` (B, or A and B), in parameter order."""
    return ProjectionSpec.from_shapes(
        seed, dim, [(p.param_name, p.shape) for p in grad_params(model, adapter, factors)]
    )


def log_odds(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """f = z_y - logsumexp_{v != y} z_v per row, in float32 (no clipping)."""
    z = logits.float()
    zy = z.gather(1, target[:, None])[:, 0]
    others = z.scatter(1, target[:, None], float("-inf"))
    return zy - torch.logsumexp(others, dim=-1)


def choice_log_odds(logits: torch.Tensor, target: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
    """f = z_y - logsumexp_{c in choices, c != y} z_c per row (choices [b, C] token ids, -1 = padding)."""
    z = logits.float()
    zy = z.gather(1, target[:, None])[:, 0]
    zc = z.gather(1, choices.clamp(min=0))
    zc = zc.masked_fill((choices < 0) | (choices == target[:, None]), float("-inf"))
    return zy - torch.logsumexp(zc, dim=-1)


OUTPUTS = ("vocab", "choice")


def output_f(logits: torch.Tensor, batch: Any, output: str = "vocab") -> torch.Tensor:
    """The differentiated output f of each row of `batch` (see the module docstring)."""
    if output == "vocab":
        return log_odds(logits, batch.answer_tokens)
    if output == "choice":
        if batch.choice_tokens is None or bool(((batch.choice_tokens >= 0).sum(1) < 2).any()):
            raise ValueError("output='choice' needs every row's answer choices (encode with encode_prompt)")
        return choice_log_odds(logits, batch.answer_tokens, batch.choice_tokens)
    raise ValueError(f"unknown output {output!r}; expected one of {OUTPUTS}")


class LoraGradCapture:
    """Forward/backward hooks on the differentiated LoRA matrices of one adapter; per-example gradients."""

    def __init__(self, model: Any, adapter: str = "default", output: str = "vocab", factors: str = "B") -> None:
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; expected one of {OUTPUTS}")
        self.output = output
        self.params = grad_params(model, adapter, factors)
        self._u: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._mask: torch.Tensor | None = None
        self._handles: list[Any] = []
        self.active = False

    def _forward_hook(self, param: GradParam):
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not self.active or not output.requires_grad:
                return
            self._u[param.param_name] = inputs[0].detach()

            def grad_hook(delta: torch.Tensor) -> None:
                u = self._u.pop(param.param_name).float()
                if self._mask is not None:  # padded positions contribute nothing (mask the input side)
                    u = u * self._mask[:, :, None]
                # [b, out, T] @ [b, T, in] -> [b, out, in] = sum over tokens of delta_t u_t^T (float32)
                self.grads[param.param_name] = torch.bmm(delta.float().transpose(1, 2), u)

            output.register_hook(grad_hook)

        return hook

    def __enter__(self) -> LoraGradCapture:
        for param in self.params:
            self._handles.append(param.module.register_forward_hook(self._forward_hook(param)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._u.clear()
        self.grads = {}

    def clear_grads(self) -> None:
        """Drop the summed .grad that autograd also left on the differentiated weights."""
        for param in self.params:
            param.module.weight.grad = None

    def run(self, model: Any, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(f0 [b], {param name: [b, out, in]}) for one batch: one forward, one backward of sum_i f_i."""
        from shared.ml.models import answer_logits

        self.grads = {}
        self._u.clear()
        self._mask = batch.attention_mask.to(torch.float32)
        self.active = True
        try:
            with torch.enable_grad():
                logits = answer_logits(model, batch)
                f = output_f(logits, batch, self.output)
                f.sum().backward()
        finally:
            self.active = False
            self._mask = None
        missing = [p.param_name for p in self.params if p.param_name not in self.grads]
        if missing:
            raise RuntimeError(f"no gradient captured for {len(missing)} LoRA matrices (e.g. {missing[0]})")
        grads, self.grads = self.grads, {}
        return f.detach(), grads


@contextmanager
def lora_grad_only(model: Any, adapter: str = "default", factors: str = "B") -> Iterator[None]:
    """Only the differentiated LoRA matrices of `adapter` require grad (everything else frozen) meanwhile."""
    wanted = {p.param_name for p in grad_params(model, adapter, factors)}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in wanted)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
            p.grad = None


def project_batch(
    model: Any, capture: LoraGradCapture, projector: Projector, batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f0 [b], projected gradients [b, d]) for one batch (float32, on the projector's device)."""
    f0, grads = capture.run(model, batch)
    out = None
    for p in projector.spec.params:
        g = grads.pop(p.name)
        out = projector.project_range(g.reshape(g.shape[0], -1), p.offset, out)
        del g
    capture.clear_grads()
    assert out is not None
    return f0, out


class BufferedProjection:
    """Projects per-example gradients in groups of >= `min_rows` rows, so that each generated block of P
    serves many examples (the sketch is regenerated per projection call; with small batches on CPU that
    regeneration would otherwise dominate). Memory: min_rows x D_B float32 of buffered gradients.

    add(batch, keys) returns the finished (keys, f0 [n], projected [n, d]) groups, flush() the rest.
    """

    def __init__(self, model: Any, capture: LoraGradCapture, projector: Projector, min_rows: int = 64) -> None:
        self.model = model
        self.capture = capture
        self.projector = projector
        self.min_rows = max(1, min_rows)
        self._keys: list[Any] = []
        self._f: list[torch.Tensor] = []
        self._g: dict[str, list[torch.Tensor]] = {p.name: [] for p in projector.spec.params}
        self._rows = 0

    def add(self, batch: Batch, keys: list[Any]) -> list[tuple[list[Any], torch.Tensor, torch.Tensor]]:
        f0, grads = self.capture.run(self.model, batch)
        self.capture.clear_grads()
        self._keys.extend(keys)
        self._f.append(f0)
        for name in self._g:
            self._g[name].append(grads.pop(name))
        self._rows += len(keys)
        return [self.flush()] if self._rows >= self.min_rows else []

    def flush(self) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
        if not self._rows:
            device = self.projector.device
            return [], torch.zeros(0, device=device), torch.zeros(0, self.projector.spec.dim, device=device)
        # one flat [rows, D_B] matrix in spec order, projected in a few large blocks (few kernel launches)
        flat = torch.cat(
            [torch.cat(self._g[p.name]).reshape(self._rows, -1) for p in self.projector.spec.params], dim=1
        )
        for parts in self._g.values():
            parts.clear()
        out = self.projector.project_flat(flat)
        del flat
        keys, f = self._keys, torch.cat(self._f)
        self._keys, self._f, self._rows = [], [], 0
        return keys, f, out
