"""Seeded random LoRA adapters and ensembles on a real base (for tests, benchmarks and smoke checks).

The adapters are PEFT-format folders written by `save_adapter_state` (safetensors + sha256), with a
non-zero B so every adapter really changes the model; the ensemble is a `chorus.ensemble/v1` manifest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."


def target_shapes(model: nn.Module, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{module path: (in, out)} of the Linear-like modules whose last name is in `targets`."""
    from shared.ml.serving.multi_lora import MultiLoRALinear, _linear_shape

    out: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if not name or name.split(".")[-1] not in targets or ".base_layer" in name:
            continue
        if isinstance(module, MultiLoRALinear):
            out[name] = (module.in_features, module.out_features)
            continue
        shape = _linear_shape(module)
        if shape is not None:
            out[name] = shape
    if not out:
        raise ValueError(f"no Linear modules named {list(targets)} in the model")
    return out


def random_lora_state(
    model: nn.Module,
    rank: int = 4,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    b_scale: float = 0.05,
    alpha: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict in PEFT's saved-key form, adapter_config dict) with A and B drawn from a seeded generator."""
    from shared.ml.models import lora_config
    from shared.ml.training.trainer import peft_config_dict

    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for path, (fan_in, fan_out) in sorted(target_shapes(model, targets).items()):
        a = torch.randn((rank, fan_in), generator=gen) / fan_in**0.5
        b = torch.randn((fan_out, rank), generator=gen) * b_scale
        state[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a
        state[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b
    config = peft_config_dict(lora_config(rank, alpha, tuple(targets)))
    return state, config


def write_random_adapter(
    folder: Path | str,
    model: nn.Module,
    info: Any,
    *,
    name: str,
    tasks: Sequence[str] = (),
    rank: int = 4,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
    b_scale: float = 0.05,
    alpha: float | None = None,
    role: str = "group",
) -> Any:
    """A random adapter folder for the base `info` (ModelInfo); returns its AdapterMeta (sha256 filled in)."""
    from shared.ml.training.adapters import save_adapter_state

    state, config = random_lora_state(model, rank, targets, seed, b_scale, alpha)
    meta = {
        "name": name,
        **info.identity(),
        "tasks": list(tasks),
        "seed": seed,
        "rank": rank,
        "alpha": float(config["lora_alpha"]),
        "targets": list(targets),
        "role": role,
    }
    return save_adapter_state(state, config, Path(folder), meta)


def write_ensemble(
    folder: Path | str,
    info: Any,
    members: Mapping[str, Any],
    weights: Mapping[str, Mapping[str, float]],
    *,
    name: str = "ensemble",
    version: int = 1,
    max_length: int = 256,
    base_member: str | None = None,
) -> Any:
    """ensemble.json in `folder` for adapter members {name: AdapterMeta} stored in `folder/adapters/<name>`,
    plus an optional base member (path null). Returns the fingerprinted EnsembleManifest."""
    from shared.ml.training.ensemble import BaseIdentity, EnsembleManifest, Member, TaskWeights, write_manifest

    entries = [
        Member(
            name=m,
            path=f"adapters/{m}",
            sha256=meta.sha256,
            role=getattr(meta, "role", "group") or "group",
            tasks=list(getattr(meta, "tasks", []) or []),
        )
        for m, meta in members.items()
    ]
    if base_member is not None:
        entries.append(Member(name=base_member, path=None, sha256=None, role="base", tasks=[]))
    manifest = EnsembleManifest(
        name=name,
        version=version,
        base=BaseIdentity(**info.identity()),
        max_length=max_length,
        members=entries,
        tasks={t: TaskWeights(weights=dict(w)) for t, w in weights.items()},
    )
    return write_manifest(manifest, Path(folder) / "ensemble.json")
