"""Running weighted adapter ensembles on the multi-LoRA engine: one forward for every (row, member) pair.

An ensemble (manifest `chorus.ensemble/v1`, see shared/ml/training/ensemble.py) gives, per task t, a
weight w_t[k] for each member k. For a row of task t the runner expands the row into one pair per
member with w_t[k] != 0 (a member with path null is the base model: adapter slot -1), runs ALL pairs
of all rows (of all requests of a batch) in one engine forward with per-row adapter selection, and
combines per row:  logits = sum_k w_t[k] * z_k,  probabilities = softmax(logits)  where z_k are member
k's logits of the task's choices' first tokens at the answer position. This is exactly
`shared.ml.training.ensemble.ensemble_choice_logits`, the offline reference.

`LoadedEnsemble` is reference-counted so a hot swap never pulls adapters from under a request in
flight: the registry holds one reference, each request one more; the adapters are unpinned in the
engine only when the last reference goes.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from shared.errors import BadInput
from shared.ml.encoding import BoundTask, bind, encode_prompt
from shared.ml.serving.multi_lora import MultiLoRAEngine, prepare_adapter

DEFAULT_MAX_ROW_CHARS = 16_384


class RowError(BadInput):
    """A request row that cannot be classified; `index` and `param` say which row and field."""

    def __init__(self, index: int, param: str, message: str) -> None:
        super().__init__(message)
        self.index = index
        self.param = param
        self.message = message


class EnsembleLoadError(BadInput):
    """An ensemble that cannot be loaded; `kind` is base_mismatch | adapter_integrity | invalid_ensemble."""

    def __init__(self, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param


@dataclass(frozen=True)
class MemberPlan:
    name: str
    key: str | None  # engine adapter key; None = the base model without adapter
    weight: float


@dataclass(frozen=True)
class TaskPlan:
    """How one task of an ensemble is served: its prompt binding and its non-zero-weight members."""

    name: str
    bound: BoundTask
    labels: tuple[str, ...]
    fields: tuple[str, ...]  # the template's variables (all required)
    members: tuple[MemberPlan, ...]

    @property
    def choice_ids(self) -> list[int]:
        return self.bound.choice_token_ids


@dataclass
class EncodedRow:
    plan: TaskPlan
    input_ids: list[int]


@dataclass
class RowResult:
    task: str
    label: str
    probabilities: dict[str, float]
    logits: dict[str, float]
    members: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "label": self.label,
            "probabilities": self.probabilities,
            "logits": self.logits,
            "members": self.members,
        }


@dataclass
class LoadedEnsemble:
    """An ensemble ready to serve (its adapters registered in the engine). Reference-counted."""

    id: str
    manifest: Any  # EnsembleManifest
    fingerprint: str
    max_length: int
    tasks: dict[str, TaskPlan]
    member_keys: dict[str, str | None]
    load_seconds: float = 0.0
    loaded_at: float = field(default_factory=time.time)
    on_last_release: Callable[[LoadedEnsemble], None] | None = None
    prepared: dict[str, Any] = field(default_factory=dict, repr=False)  # until activated (host cache may trim)
    _refs: int = 1  # the registry's reference + one per request in flight
    _registered: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def adapter_keys(self) -> list[str]:
        return sorted({k for k in self.member_keys.values() if k is not None})

    @property
    def in_flight(self) -> int:
        return max(self._refs - (1 if self._registered else 0), 0)

    @property
    def retired(self) -> bool:
        return not self._registered

    def acquire(self) -> bool:
        """Take a reference for a request; False once the ensemble has been fully released."""
        with self._lock:
            if self._refs <= 0:
                return False
            self._refs += 1
            return True

    def retire(self) -> None:
        """Drop the registry's reference (unload / replaced by a hot swap); requests in flight keep theirs."""
        with self._lock:
            if not self._registered:
                return
            self._registered = False
        self.release()

    def release(self) -> None:
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last and self.on_last_release is not None:
            self.on_last_release(self)

    def describe(self, engine: MultiLoRAEngine | None = None) -> dict[str, Any]:
        m = self.manifest
        members = []
        for member in m.members:
            key = self.member_keys.get(member.name)
            slot = engine.slot_of(key) if (engine is not None and key is not None) else None
            members.append(
                {
                    "name": member.name,
                    "role": member.role,
                    "sha256": member.sha256,
                    "tasks": list(member.tasks),
                    "resident": key is None or slot is not None,
                }
            )
        return {
            "id": self.id,
            "name": m.name,
            "version": m.version,
            "fingerprint": self.fingerprint,
            "base": m.base.model_dump(),
            "max_length": self.max_length,
            "members": members,
            "tasks": {t: {"weights": dict(tw.weights)} for t, tw in m.tasks.items()},
            "loaded_at": self.loaded_at,
            "load_seconds": round(self.load_seconds, 4),
            "in_flight": self.in_flight,
        }


def template_fields(task: Any) -> tuple[str, ...]:
    """The variables a task's Jinja template needs, sorted (parsed and checked in the template sandbox)."""
    from shared.ml.tasks.templates import template_variables

    return template_variables(task.template)


def adapter_key(sha256: str, config: Mapping[str, Any]) -> str:
    """Engine key of an adapter: its weights' sha256 plus a digest of the config that scales them."""
    relevant = {k: config.get(k) for k in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern")}
    digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{sha256}:{digest}"


class EnsembleRunner:
    """Loads ensembles onto a `MultiLoRAEngine` and classifies rows with one forward per batch."""

    def __init__(
        self,
        engine: MultiLoRAEngine,
        tokenizer: Any,
        info: Any,
        *,
        max_forward_rows: int = 64,
        max_row_chars: int = DEFAULT_MAX_ROW_CHARS,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.info = info  # ModelInfo of the base
        self.max_forward_rows = max(1, max_forward_rows)
        self.max_row_chars = max_row_chars
        self.pad_id = tokenizer.pad_token_id or 0
        self._encode_lock = threading.Lock()

    # ---- loading ---------------------------------------------------------------------------------

    def prepare(self, ensemble_id: str, manifest: Any, member_folders: Mapping[str, Path]) -> LoadedEnsemble:
        """Check the base, read + verify every adapter (safetensors, sha256 against the manifest), bind the
        tasks and register the adapters in the engine's host cache. No slot is taken yet (see `activate`)."""
        from shared.ml.tasks.registry import get_task
        from shared.ml.training.adapters import AdapterIntegrityError, AdapterMismatchError, load_adapter_state
        from shared.ml.training.ensemble import compute_fingerprint

        start = time.perf_counter()
        want, have = self.info.identity(), manifest.base.model_dump()
        diffs = [
            f"{k}: ensemble has {have[k]!r}, the served base has {want[k]!r}" for k in want if have.get(k) != want[k]
        ]
        if diffs:
            raise EnsembleLoadError(
                "base_mismatch", f"ensemble {manifest.name!r} does not fit the loaded base ({'; '.join(diffs)})", "base"
            )
        member_keys: dict[str, str | None] = {}
        prepared_adapters: dict[str, Any] = {}
        for index, member in enumerate(manifest.members):
            if member.role == "base" or member.path is None:
                member_keys[member.name] = None
                continue
            folder = member_folders.get(member.name)
            if folder is None:
                raise EnsembleLoadError(
                    "invalid_ensemble", f"member {member.name!r}: adapter folder not found", f"members[{index}]"
                )
            try:
                state, config, meta = load_adapter_state(folder, self.info, member.sha256)
            except AdapterMismatchError as exc:
                raise EnsembleLoadError("base_mismatch", f"member {member.name!r}: {exc}", f"members[{index}]") from exc
            except AdapterIntegrityError as exc:
                raise EnsembleLoadError(
                    "adapter_integrity", f"member {member.name!r}: {exc}", f"members[{index}]"
                ) from exc
            key = adapter_key(meta.sha256, config)
            if key not in prepared_adapters:
                try:
                    prepared = prepare_adapter(key, state, config, {"name": meta.name, "sha256": meta.sha256})
                    self.engine.check(prepared)
                except ValueError as exc:
                    raise EnsembleLoadError(
                        "invalid_ensemble", f"member {member.name!r}: {exc}", f"members[{index}]"
                    ) from exc
                prepared_adapters[key] = prepared
            member_keys[member.name] = key
        tasks: dict[str, TaskPlan] = {}
        for task_name, tw in manifest.tasks.items():
            try:
                task = get_task(task_name)
                bound = bind(task, self.tokenizer)
            except (ValueError, FileNotFoundError) as exc:
                raise EnsembleLoadError("invalid_ensemble", f"task {task_name!r}: {exc}", f"tasks.{task_name}") from exc
            members = tuple(
                MemberPlan(m.name, member_keys[m.name], float(tw.weights[m.name]))
                for m in manifest.members
                if float(tw.weights.get(m.name, 0.0)) != 0.0
            )
            tasks[task_name] = TaskPlan(
                task_name, bound, tuple(task.label_names or task.choices), template_fields(task), members
            )
        fingerprint = manifest.fingerprint or compute_fingerprint(manifest)
        return LoadedEnsemble(
            ensemble_id,
            manifest,
            fingerprint,
            int(manifest.max_length),
            tasks,
            member_keys,
            load_seconds=time.perf_counter() - start,
            prepared=prepared_adapters,
        )

    def activate(self, ensemble: LoadedEnsemble) -> dict[str, int]:
        """Register + pin the ensemble's adapters into engine slots (model thread). Raises NoFreeSlotError."""
        for key, prepared in ensemble.prepared.items():
            if not self.engine.is_registered(key):
                self.engine.register(prepared)
        slots = self.engine.acquire(ensemble.adapter_keys)
        ensemble.prepared = {}
        return slots

    def deactivate(self, ensemble: LoadedEnsemble) -> None:
        """Unpin (the adapters stay resident, evictable, until their slots are needed)."""
        self.engine.release(ensemble.adapter_keys)

    # ---- rows ------------------------------------------------------------------------------------

    def encode_rows(self, ensemble: LoadedEnsemble, rows: Sequence[Mapping[str, Any]]) -> list[EncodedRow]:
        """Validate and tokenize request rows ({"task", "fields"} or {"task", "text"}); RowError on a bad row."""
        from shared.ml.tasks.base import Example

        out: list[EncodedRow] = []
        for i, row in enumerate(rows):
            task_name = row.get("task")
            if not isinstance(task_name, str) or not task_name:
                raise RowError(i, f"rows[{i}].task", f"rows[{i}].task: a task name is required")
            plan = ensemble.tasks.get(task_name)
            if plan is None:
                raise RowError(
                    i,
                    f"rows[{i}].task",
                    f"rows[{i}].task: task {task_name!r} is not served by ensemble "
                    f"{ensemble.id!r} (tasks: {', '.join(sorted(ensemble.tasks))})",
                )
            fields = self._row_fields(i, plan, row)
            with self._encode_lock:  # one tokenizer, used from several threads
                try:
                    encoded = encode_prompt(
                        plan.bound, Example(f"row/{i}", fields, 0), self.tokenizer, ensemble.max_length
                    )
                except Exception as exc:  # template errors on odd values
                    raise RowError(
                        i, f"rows[{i}].fields", f"rows[{i}].fields: cannot render the prompt: {exc}"
                    ) from exc
            out.append(EncodedRow(plan, encoded.input_ids))
        return out

    def _row_fields(self, i: int, plan: TaskPlan, row: Mapping[str, Any]) -> dict[str, Any]:
        fields = row.get("fields")
        text = row.get("text")
        if fields is not None and text is not None:
            raise RowError(i, f"rows[{i}]", f"rows[{i}]: give either 'fields' or 'text', not both")
        if fields is None:
            if text is None:
                raise RowError(
                    i,
                    f"rows[{i}].fields",
                    f"rows[{i}]: 'fields' (or 'text') is required; task {plan.name!r} takes {', '.join(plan.fields)}",
                )
            if len(plan.fields) != 1:
                raise RowError(
                    i,
                    f"rows[{i}].text",
                    f"rows[{i}].text: task {plan.name!r} takes several fields "
                    f"({', '.join(plan.fields)}); send them in 'fields'",
                )
            fields = {plan.fields[0]: text}
        if not isinstance(fields, Mapping):
            raise RowError(i, f"rows[{i}].fields", f"rows[{i}].fields: must be an object")
        total = 0
        for name in plan.fields:
            if name not in fields or fields[name] is None:
                raise RowError(
                    i,
                    f"rows[{i}].fields.{name}",
                    f"rows[{i}].fields.{name}: missing; task {plan.name!r} takes {', '.join(plan.fields)}",
                )
        clean: dict[str, Any] = {}
        for name, value in fields.items():
            if not isinstance(value, (str, int, float, bool)):
                raise RowError(i, f"rows[{i}].fields.{name}", f"rows[{i}].fields.{name}: must be a string or a number")
            if isinstance(value, str):
                total += len(value)
                if total > self.max_row_chars:
                    raise RowError(
                        i,
                        f"rows[{i}].fields.{name}",
                        f"rows[{i}].fields.{name}: the row's text exceeds the limit of {self.max_row_chars} characters",
                    )
            clean[name] = value
        return clean

    # ---- the forward -----------------------------------------------------------------------------

    def pair_count(self, rows: Sequence[EncodedRow]) -> int:
        return sum(len(r.plan.members) for r in rows)

    @torch.no_grad()
    def run(self, jobs: Sequence[tuple[LoadedEnsemble, Sequence[EncodedRow]]]) -> list[list[RowResult]]:
        """Classify the rows of several requests together: every (row, member) pair in one forward
        (split in chunks of `max_forward_rows` pairs, sorted by length, when there are more)."""
        pairs: list[tuple[int, int, int, int, list[int]]] = []  # (job, row, member index, slot, ids)
        for j, (ensemble, rows) in enumerate(jobs):
            for r, row in enumerate(rows):
                for m, member in enumerate(row.plan.members):
                    slot = -1
                    if member.key is not None:
                        found = self.engine.slot_of(member.key)
                        if found is None:  # a loaded ensemble pins its adapters: this is a bug, not bad input
                            raise RuntimeError(
                                f"adapter of member {member.name!r} of ensemble {ensemble.id!r} is not resident"
                            )
                        slot = found
                    pairs.append((j, r, m, slot, row.input_ids))
        z: dict[tuple[int, int, int], torch.Tensor] = {}
        order = sorted(range(len(pairs)), key=lambda p: (len(pairs[p][4]), pairs[p][3]))
        for start in range(0, len(order), self.max_forward_rows):
            chunk = [pairs[p] for p in order[start : start + self.max_forward_rows]]
            width = max(len(p[4]) for p in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, p in enumerate(chunk):
                ids[i, : len(p[4])] = torch.tensor(p[4])
                mask[i, : len(p[4])] = 1
            last = mask.sum(1) - 1
            logits = self.engine.answer_logits(ids, mask, last, [p[3] for p in chunk]).float().cpu()
            for i, (j, r, m, _, _) in enumerate(chunk):
                plan = jobs[j][1][r].plan
                z[(j, r, m)] = logits[i, plan.choice_ids]
        results: list[list[RowResult]] = []
        for j, (_, rows) in enumerate(jobs):
            out = []
            for r, row in enumerate(rows):
                plan = row.plan
                total: torch.Tensor | None = None
                members: dict[str, dict[str, Any]] = {}
                for m, member in enumerate(plan.members):
                    zk = z[(j, r, m)]
                    term = member.weight * zk
                    total = term if total is None else total + term
                    members[member.name] = {
                        "weight": member.weight,
                        "logits": dict(zip(plan.labels, zk.tolist(), strict=True)),
                    }
                assert total is not None
                probs = torch.softmax(total, dim=-1)
                out.append(
                    RowResult(
                        task=plan.name,
                        label=plan.labels[int(total.argmax())],
                        probabilities=dict(zip(plan.labels, probs.tolist(), strict=True)),
                        logits=dict(zip(plan.labels, total.tolist(), strict=True)),
                        members=members,
                    )
                )
            results.append(out)
        return results
