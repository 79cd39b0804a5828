"""The ensemble manifest (`ensemble.json`, format chorus.ensemble/v1) and the reference ensemble scorer.

Semantics (the inference service implements exactly this): for an example of task t, the ensemble's
choice logits are  sum_k w_t[k] * z_k  where z_k are member k's choice logits (logits of the choices'
first tokens at the answer position, `score_task`); probabilities = softmax over the choices of that
sum. A member with weight 0 for t is never run for t. The member with role "base" and path null is
the base model without adapter: a booster b enters as eta * (z_b - z_base), i.e. weight eta on b and
-eta on "base".

fingerprint = sha256 of the canonical JSON (sort_keys, separators (",", ":")) of the manifest without
its fingerprint key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.files import atomic_write_text
from shared.ml.encoding import DEFAULT_MAX_LENGTH, bind
from shared.ml.evaluate import score_task
from shared.ml.models import Base, ModelInfo
from shared.ml.progress import Progress, silent
from shared.ml.tasks.base import Example
from shared.ml.training.adapters import (
    AdapterMismatchError,
    add_adapter_to_base,
    load_adapter_state,
    remove_adapter_from_base,
)

FORMAT: Final = "chorus.ensemble/v1"
MEMBER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
ZERO = 0.0


class BaseIdentity(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str
    base_revision: str
    quantization: str


class Member(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=MEMBER_NAME)
    path: str | None
    sha256: str | None
    role: Literal["group", "booster", "base"]
    tasks: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Member:
        if self.role == "base":
            if self.path is not None or self.sha256 is not None:
                raise ValueError(f"member {self.name!r}: the base member has path null and sha256 null")
            return self
        if not self.path or not self.sha256:
            raise ValueError(f"member {self.name!r}: an adapter member needs a path and a sha256")
        p = PurePosixPath(self.path)
        if p.is_absolute() or ".." in p.parts or "\\" in self.path:
            raise ValueError(f"member {self.name!r}: path {self.path!r} must be relative to the manifest's folder")
        return self


class TaskWeights(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: dict[str, float]


class EnsembleManifest(BaseModel):
    """ensemble.json."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["chorus.ensemble/v1"] = FORMAT
    name: str
    version: int = Field(default=1, ge=1)
    base: BaseIdentity
    max_length: int = DEFAULT_MAX_LENGTH
    members: list[Member]
    tasks: dict[str, TaskWeights]
    fingerprint: str | None = None

    @model_validator(mode="after")
    def _check(self) -> EnsembleManifest:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        known = set(names)
        for task, tw in self.tasks.items():
            unknown = sorted(set(tw.weights) - known)
            if unknown:
                raise ValueError(f"task {task!r}: weights name unknown member(s) {unknown}")
            if not any(w != 0 for w in tw.weights.values()):
                raise ValueError(f"task {task!r}: every weight is 0")
            for w in tw.weights.values():
                if not np.isfinite(w):
                    raise ValueError(f"task {task!r}: non-finite weight {w}")
        return self

    @field_validator("members")
    @classmethod
    def _nonempty(cls, v: list[Member]) -> list[Member]:
        if not v:
            raise ValueError("an ensemble needs at least one member")
        return v

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    def task_weights(self, task: str) -> dict[str, float]:
        if task not in self.tasks:
            raise KeyError(f"task {task!r} is not served by ensemble {self.name!r} (tasks: {sorted(self.tasks)})")
        return dict(self.tasks[task].weights)

    def active_members(self, task: str) -> list[str]:
        """Members with non-zero weight for `task`, in manifest order (the only ones that run)."""
        weights = self.task_weights(task)
        return [m.name for m in self.members if weights.get(m.name, ZERO) != ZERO]

    def content(self) -> dict[str, Any]:
        """The manifest as JSON data without the fingerprint key."""
        data = self.model_dump(mode="json")
        data.pop("fingerprint", None)
        return data


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def compute_fingerprint(manifest: EnsembleManifest | dict[str, Any]) -> str:
    """sha256 hex of the canonical JSON of the manifest without its fingerprint key."""
    if isinstance(manifest, EnsembleManifest):
        data = manifest.content()
    else:
        data = {k: v for k, v in manifest.items() if k != "fingerprint"}
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def with_fingerprint(manifest: EnsembleManifest) -> EnsembleManifest:
    return manifest.model_copy(update={"fingerprint": compute_fingerprint(manifest)})


def write_manifest(manifest: EnsembleManifest, path: Path | str) -> EnsembleManifest:
    """Write ensemble.json atomically with its fingerprint; returns the fingerprinted manifest."""
    path = Path(path)
    manifest = with_fingerprint(manifest)
    atomic_write_text(path, json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return manifest


def load_manifest(path: Path | str, verify_fingerprint: bool = True) -> EnsembleManifest:
    """Read and validate ensemble.json; a recorded fingerprint must match its content."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read ensemble manifest {str(path)!r}: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a {FORMAT} manifest (format={raw.get('format') if isinstance(raw, dict) else None!r})"
        )
    manifest = EnsembleManifest.model_validate(raw)
    if verify_fingerprint and manifest.fingerprint is not None:
        actual = compute_fingerprint(raw)
        if actual != manifest.fingerprint:
            raise ValueError(
                f"ensemble manifest {str(path)!r}: fingerprint {manifest.fingerprint[:16]}... does not match its content "
                f"({actual[:16]}...); the file was modified"
            )
    return manifest


# ------------------------------------------------------------------------------------ default weights


def default_weights(
    groups: Sequence[tuple[str, Sequence[str]]],
    boosters: Mapping[str, Sequence[str]],
    eta: float,
    all_members: Sequence[str],
    base_member: str = "base",
) -> dict[str, dict[str, float]]:
    """Per task: 1 for its group adapter, eta for each of the group's boosters and -eta * (#boosters) for
    the base member (boosters are increments over the base), 0 for every other member."""
    out: dict[str, dict[str, float]] = {}
    for group_member, tasks in groups:
        for task in tasks:
            w = {m: ZERO for m in all_members}
            w[group_member] = 1.0
            bs = list(boosters.get(group_member, []))
            for b in bs:
                w[b] = float(eta)
            if bs:
                w[base_member] = -float(eta) * len(bs)
            out[task] = w
    return out


def combine(weights: dict[str, float], zs: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum_k w[k] * z_k over members with non-zero weight (float32, member order = weights order)."""
    total: torch.Tensor | None = None
    for name, w in weights.items():
        if w == ZERO:
            continue
        term = float(w) * zs[name].float()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("every weight is 0")
    return total


# --------------------------------------------------------------------------------- adapter residency


class AdapterPool:
    """Adapters loaded on one base (PEFT multi-adapter form), verified on load, switched per member."""

    def __init__(self, base: Base) -> None:
        self.base = base
        self.loaded: dict[str, str] = {}  # adapter name -> sha256

    def ensure(self, name: str, folder: Path, sha256: str | None = None) -> None:
        if name in self.loaded and (sha256 is None or self.loaded[name] == sha256):
            return
        if name in self.loaded:
            self.remove(name)
        state, config, meta = load_adapter_state(folder, self.base.info, sha256)
        add_adapter_to_base(self.base, name, state, config)
        self.loaded[name] = meta.sha256

    def remove(self, name: str) -> None:
        if name in self.loaded:
            remove_adapter_from_base(self.base, name)
            del self.loaded[name]

    def close(self) -> None:
        for name in list(self.loaded):
            self.remove(name)

    @contextmanager
    def active(self, name: str | None) -> Iterator[Any]:
        """The model with adapter `name` active, or the bare base model when name is None."""
        from peft import PeftModel

        model = self.base.model
        if name is None:
            ctx = model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
            with ctx:
                yield model
            return
        if name not in self.loaded:
            raise KeyError(f"adapter {name!r} is not loaded")
        previous = model.active_adapter
        model.set_adapter(name)
        model.requires_grad_(False)
        try:
            yield model
        finally:
            if previous in model.peft_config:
                model.set_adapter(previous)
            model.requires_grad_(False)


def check_base(manifest: EnsembleManifest, info: ModelInfo) -> None:
    want = info.identity()
    have = manifest.base.model_dump()
    diffs = [f"{k}: ensemble has {have[k]!r}, base has {want[k]!r}" for k in have if have[k] != want[k]]
    if diffs:
        raise AdapterMismatchError(
            f"ensemble {manifest.name!r} does not fit the loaded base model ({'; '.join(diffs)})"
        )


def member_choice_logits(
    base: Base,
    manifest: EnsembleManifest,
    folder: Path | str,
    task: str,
    examples: Sequence[Example],
    batch_size: int = 32,
    progress: Progress = silent,
    pool: AdapterPool | None = None,
    members: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """z_k [N, C] for the members with non-zero weight for `task` (or the named `members`), in example order."""
    from shared.ml.tasks.registry import get_task

    check_base(manifest, base.info)
    folder = Path(folder)
    bound = bind(get_task(task), base.tokenizer)
    names = list(members) if members is not None else manifest.active_members(task)
    own_pool = pool is None
    pool = pool or AdapterPool(base)
    out: dict[str, torch.Tensor] = {}
    try:
        for name in names:
            member = manifest.member(name)
            if member.role == "base":
                adapter = None
            else:
                assert member.path is not None
                pool.ensure(name, folder / member.path, member.sha256)
                adapter = name
            with pool.active(adapter) as model:
                scores = score_task(
                    model,
                    base.tokenizer,
                    bound,
                    list(examples),
                    batch_size,
                    manifest.max_length,
                    progress,
                    f"{task}: {name}",
                )
            out[name] = scores.choice_logits
    finally:
        if own_pool:
            pool.close()
    return out


def ensemble_choice_logits(
    base: Base,
    manifest: EnsembleManifest,
    folder: Path | str,
    task: str,
    examples: Sequence[Example],
    batch_size: int = 32,
    progress: Progress = silent,
    pool: AdapterPool | None = None,
) -> torch.Tensor:
    """The reference ensemble: [N, C] = sum_k w_task[k] * z_k; members with weight 0 never run."""
    zs = member_choice_logits(base, manifest, folder, task, examples, batch_size, progress, pool)
    return combine(manifest.task_weights(task), zs)


def ensemble_probabilities(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


# ------------------------------------------------------------------------------------ weight fitting


def fit_weights(
    terms: dict[str, torch.Tensor],
    labels: torch.Tensor,
    init: dict[str, float],
    l2: float = 0.01,
    max_weight: float = 10.0,
    min_weight: float = 1e-3,
) -> dict[str, float]:
    """Non-negative coefficients c (one per term: a member's logits, or a booster's increment) minimising
    mean cross-entropy of softmax(sum_j c_j * term_j) on validation rows + l2 * ||c - init||^2.
    L-BFGS-B with bounds [0, max_weight]; coefficients below `min_weight` become 0."""
    from scipy.optimize import minimize

    names = list(terms)
    stack = torch.stack([terms[n].double() for n in names])  # [J, N, C]
    y = labels.long()
    c0 = np.array([float(init.get(n, 0.0)) for n in names], dtype=np.float64)

    def objective(c: np.ndarray) -> tuple[float, np.ndarray]:
        ct = torch.tensor(c, dtype=torch.float64, requires_grad=True)
        logits = torch.einsum("j,jnc->nc", ct, stack)
        loss = torch.nn.functional.cross_entropy(logits, y) + l2 * ((ct - torch.tensor(c0)) ** 2).sum()
        loss.backward()
        assert ct.grad is not None  # set by backward()
        return float(loss.detach()), ct.grad.numpy().copy()

    result = minimize(
        objective, c0, jac=True, method="L-BFGS-B", bounds=[(0.0, max_weight)] * len(names), options={"maxiter": 500}
    )
    c = np.where(result.x < min_weight, 0.0, result.x)
    if not np.any(c > 0):  # degenerate: keep the default
        c = c0
    return {n: float(round(v, 6)) for n, v in zip(names, c, strict=True)}
