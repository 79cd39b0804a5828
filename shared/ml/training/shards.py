"""Stage 2's adapters fanned out over workers (the Stage-1 fan-out hook, shared/ml/sharding.py).

Without a sharder (the CLI, a lone process) every adapter of a run trains in one fused `train_many` call.
When a job runner installs a sharder, the adapters become a phase: its pieces are whole canonical chunks of
CHUNK consecutive adapters (the phase is aligned to CHUNK), each chunk trained fused by whichever worker
claims it and written to WORKDIR/adapter-shards/<name>/ (LoRA tensors as safetensors, the rest as JSON).
A chunk's result depends only on its adapters, never on how many shards the phase was cut into or which
worker ran them, so any cut gives bitwise the same adapters; a chunk already written is skipped (a shard
redone after its worker died finds its finished chunks). The parent then reads every adapter back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.ml.evaluate import TaskMetrics
from shared.ml.progress import Progress
from shared.ml.sharding import Phase, current_sharder
from shared.ml.training.costs import Cost
from shared.ml.training.many import AdapterSpec, train_many
from shared.ml.training.trainer import TaskData, TrainedAdapter

CHUNK = 4  # adapters trained fused in one piece of the phase
FOLDER = "adapter-shards"
_FIELDS = ("name", "tasks", "history", "best_epoch", "peft_config", "hyperparameters", "seed", "extra")


def save_trained(folder: Path, trained: TrainedAdapter) -> None:
    """Write one trained adapter (tensors, metrics, cost) so another process can read it back; atomic."""
    from safetensors.torch import save_file

    out = folder / trained.name
    tmp = folder / f".{trained.name}.partial"
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trained.state.items()}, str(tmp / "adapter.safetensors"))
    meta = {k: getattr(trained, k) for k in _FIELDS}
    meta |= {"val_metrics": {t: m.to_dict() for t, m in trained.val_metrics.items()}, "cost": trained.cost.to_dict()}
    (tmp / "trained.json").write_text(json.dumps(meta, default=str))
    tmp.rename(out)


def load_trained(folder: Path, name: str) -> TrainedAdapter:
    """The adapter `save_trained` wrote under `folder`."""
    from safetensors.torch import load_file

    path = folder / name
    if not (path / "trained.json").is_file():
        raise RuntimeError(f"adapter {name!r} of the fanned-out training is missing from {folder}")
    meta = json.loads((path / "trained.json").read_text())
    return TrainedAdapter(
        **{k: meta[k] for k in _FIELDS},
        state=load_file(str(path / "adapter.safetensors")),
        val_metrics={t: TaskMetrics(**m) for t, m in meta["val_metrics"].items()},
        cost=Cost.from_dict(meta["cost"]),
    )


def _spec_json(spec: AdapterSpec) -> dict[str, Any]:
    if spec.init_state is not None:
        raise ValueError(f"adapter {spec.name!r}: an initial state cannot be fanned out")
    return {"name": spec.name, "tasks": list(spec.tasks), "seed": spec.seed, "lr": spec.lr, "epochs": spec.epochs}


def _runtime_key(params_json: dict[str, Any]) -> str:
    return "training-runtime:" + json.dumps(params_json, sort_keys=True)


def training_prepare(
    args: dict[str, Any], workdir: Path, cache: dict[str, Any]
) -> tuple[Any, Any, dict[str, TaskData]]:
    """The params, the loaded base and the prepared data of a fanned-out training phase (cached per process)."""
    from shared.ml.models import Base
    from shared.ml.training.params import TrainingParams
    from shared.ml.training.trainer import prepare_tasks, trainable_4bit

    params = TrainingParams.model_validate(args["params"])
    key = _runtime_key(args["params"])
    if key not in cache:
        base = Base.load(params.model, params.quantization)
        trainable_4bit(base.model)
        cache[key] = (base, prepare_tasks(base.tokenizer, params.all_tasks(), params))
    base, data = cache[key]
    return params, base, data


def training_shard(
    args: dict[str, Any], workdir: Path, progress: Progress, start: int, end: int, cache: dict[str, Any]
) -> dict[str, Any]:
    """Adapters [start, end) of the phase, one canonical chunk of CHUNK at a time (finished chunks skipped)."""
    params, base, data = training_prepare(args, workdir, cache)
    specs = [AdapterSpec(**s) for s in args["specs"]]
    folder = Path(workdir) / FOLDER
    trained = 0
    for first in range(start - start % CHUNK, end, CHUNK):
        chunk = specs[first : first + CHUNK]
        if all((folder / s.name / "trained.json").is_file() for s in chunk):
            continue
        for t in train_many(base, chunk, params, data, progress):
            if not (folder / t.name).exists():
                save_trained(folder, t)
            trained += 1
    return {"adapters": end - start, "trained": trained}


_SHARD_FN = f"{__name__}:training_shard"
_PREPARE_FN = f"{__name__}:training_prepare"


def train_adapters(
    base: Any, specs: list[AdapterSpec], params: Any, data: dict[str, TaskData], workdir: Path, progress: Progress
) -> dict[str, TrainedAdapter]:
    """Every adapter of `specs` by name: one fused run here, or, under a job's sharder with more than one
    chunk of adapters, chunks fanned out over the workers (see the module docstring)."""
    sharder = current_sharder()
    if sharder is None or len(specs) <= CHUNK or any(s.init_state is not None for s in specs):
        return {t.name: t for t in train_many(base, specs, params, data, progress)}
    args = {"params": params.model_dump(mode="json"), "specs": [_spec_json(s) for s in specs]}
    phase = Phase(
        "adapters", "adapters", len(specs), _SHARD_FN, args, unit="adapters", align=CHUNK, prepare=_PREPARE_FN
    )
    cache: dict[str, Any] = {_runtime_key(args["params"]): (base, data)}  # the parent has both loaded already
    sharder.run(phase, Path(workdir), progress, cache)
    folder = Path(workdir) / FOLDER
    return {s.name: load_trained(folder, s.name) for s in specs}
