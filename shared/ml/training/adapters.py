"""Adapter folders: PEFT format plus chorus metadata, written atomically, verified on load.

A folder holds
    adapter_config.json        PEFT LoraConfig (PEFT, vLLM and LoRAX read it)
    adapter_model.safetensors  the LoRA tensors, PEFT key names (`...q_proj.lora_A.weight`)
    chorus_adapter.json        AdapterMeta: base identity, tasks, seed, hyperparameters, val metrics, sha256

Loading checks the sha256 of the weights and that the base model, its revision and the quantization
match the base it is loaded on. Weights are only ever read from safetensors; a folder holding pickle
formats (.bin/.pt/.pth/.pkl/.ckpt) is refused. Nothing here uses pickle or torch.load.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import uuid
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from shared.errors import BadInput
from shared.files import atomic_write_text
from shared.ml.model_names import portable_name
from shared.ml.models import ModelInfo
from shared.storage import sha256_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "chorus_adapter.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class AdapterError(BadInput):
    """An adapter folder cannot be used."""


class AdapterIntegrityError(AdapterError):
    """Files missing, unreadable, or the weights do not match their recorded sha256."""


class AdapterFormatError(AdapterIntegrityError):
    """Weights in a refused format (pickle-based .bin/.pt/.pth/...)."""


class AdapterMismatchError(AdapterError):
    """The adapter was trained on another base model, revision or quantization."""


class AdapterMeta(BaseModel):
    """chorus_adapter.json."""

    model_config = ConfigDict(extra="allow")

    format: str = "chorus.adapter/v1"
    name: str
    base_model: str
    base_revision: str
    quantization: str
    tasks: list[str]
    seed: int = 0
    rank: int
    alpha: float
    targets: list[str]
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    val_metrics: dict[str, Any] = Field(default_factory=dict)
    role: str = "group"
    sha256: str = ""
    created_at: str = ""

    def identity(self) -> dict[str, str]:
        return {"base_model": self.base_model, "base_revision": self.base_revision, "quantization": self.quantization}


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def publish_dir(tmp: Path, folder: Path) -> None:
    """Move a fully written temp dir into place, replacing any previous folder of that name."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        folder.rename(old)
    tmp.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter_state(
    state: dict[str, torch.Tensor], peft_config: dict[str, Any], folder: Path | str, meta: AdapterMeta | dict[str, Any]
) -> AdapterMeta:
    """Write an adapter folder from LoRA tensors (PEFT saved-key form) and a PEFT config dict. Atomic."""
    from safetensors.torch import save_file

    folder = Path(folder)
    meta_obj = meta if isinstance(meta, AdapterMeta) else AdapterMeta.model_validate(meta)
    bad = [k for k in state if ".lora_" not in k]
    if bad:
        raise ValueError(f"not LoRA tensors: {bad[:3]}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in sorted(state.items())}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = dict(peft_config)
        config["inference_mode"] = True
        # PEFT fills in the local folder the base was loaded from; downloads carry a portable identity.
        config["base_model_name_or_path"] = portable_name(meta_obj.base_model)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        meta_obj = meta_obj.model_copy(
            update={
                "sha256": sha256_file(tmp / WEIGHTS_FILE),
                "created_at": meta_obj.created_at or datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )
        (tmp / META_FILE).write_text(meta_obj.model_dump_json(indent=2) + "\n")
        publish_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta_obj


def save_adapter(model: Any, adapter_name: str, folder: Path | str, meta: AdapterMeta | dict[str, Any]) -> AdapterMeta:
    """Save adapter `adapter_name` of a PeftModel as a PEFT folder + chorus metadata (atomic: temp dir + rename).

    `meta` supplies name, base identity, tasks, seed, rank, alpha, targets, hyperparameters, val_metrics;
    sha256 and created_at are filled in.
    """
    from shared.ml.training.trainer import extract_state, peft_config_dict

    state = extract_state(model, adapter_name)
    return save_adapter_state(state, peft_config_dict(model.peft_config[adapter_name]), folder, meta)


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise AdapterIntegrityError(f"adapter folder {str(folder)!r} does not exist")
    refused = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if refused:
        raise AdapterFormatError(
            f"adapter folder {str(folder)!r} holds pickle-format weights {refused}; only {WEIGHTS_FILE} (safetensors) is accepted"
        )
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE, META_FILE) if not (folder / f).is_file()]
    if missing:
        raise AdapterIntegrityError(f"adapter folder {str(folder)!r} is missing {missing}")


def read_adapter_meta(folder: Path | str) -> AdapterMeta:
    folder = Path(folder)
    try:
        return AdapterMeta.model_validate_json((folder / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterIntegrityError(f"adapter folder {str(folder)!r}: unreadable {META_FILE}: {exc}") from exc


def check_identity(meta: AdapterMeta, expected: ModelInfo | dict[str, str], where: str = "") -> None:
    want = expected.identity() if isinstance(expected, ModelInfo) else dict(expected)
    have = meta.identity()
    diffs = [f"{k}: adapter has {have[k]!r}, base has {want[k]!r}" for k in have if k in want and have[k] != want[k]]
    if diffs:
        raise AdapterMismatchError(
            f"adapter {meta.name!r}{where} does not fit the loaded base model ({'; '.join(diffs)})"
        )


def load_adapter_state(
    folder: Path | str, expected: ModelInfo | dict[str, str] | None = None, sha256: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any], AdapterMeta]:
    """(LoRA tensors, PEFT config dict, metadata) of an adapter folder, after checking it.

    Raises AdapterFormatError for pickle weights, AdapterIntegrityError for missing files or a sha256
    that differs from the metadata (or from `sha256`, e.g. an ensemble manifest's), and
    AdapterMismatchError when `expected` (the loaded base) differs in base model, revision or quantization.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    _check_folder(folder)
    meta = read_adapter_meta(folder)
    actual = sha256_file(folder / WEIGHTS_FILE)
    if actual != meta.sha256:
        raise AdapterIntegrityError(
            f"adapter {meta.name!r} at {str(folder)!r}: {WEIGHTS_FILE} has sha256 {actual[:16]}..., "
            f"metadata records {meta.sha256[:16]}... (file modified or corrupted)"
        )
    if sha256 is not None and actual != sha256:
        raise AdapterIntegrityError(
            f"adapter {meta.name!r} at {str(folder)!r}: sha256 {actual[:16]}... differs from the expected {sha256[:16]}..."
        )
    if expected is not None:
        check_identity(meta, expected, f" at {str(folder)!r}")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
        state = load_file(str(folder / WEIGHTS_FILE))
    except (OSError, ValueError, SafetensorError) as exc:
        raise AdapterIntegrityError(f"adapter {meta.name!r} at {str(folder)!r} is unreadable: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterIntegrityError(
            f"adapter {meta.name!r}: only LoRA adapters are supported, got {config.get('peft_type')}"
        )
    return state, config, meta


def lora_config_from_dict(config: dict[str, Any]) -> Any:
    """A peft LoraConfig from an adapter_config.json dict (unknown keys from other PEFT versions dropped)."""
    from peft import LoraConfig

    names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    # base_model_name_or_path is the portable identity written for downloads (a hub id): PEFT would look it
    # up on the Hub when extracting state; the base actually loaded is known from the model itself.
    dropped = ("peft_type", "inference_mode", "base_model_name_or_path")
    kwargs = {k: v for k, v in config.items() if k in names and k not in dropped}
    return LoraConfig(**kwargs)


def add_adapter_to_base(base: Any, adapter_name: str, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Any:
    """Load LoRA tensors into `base.model` as adapter `adapter_name` (wrapping it in a PeftModel the first
    time; base.model is replaced by the wrapper). Returns the PeftModel."""
    from peft import PeftModel, get_peft_model

    from shared.ml.training.trainer import load_state

    lora = lora_config_from_dict(config)
    model = base.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the random init is overwritten right away; keep the global RNG untouched
        if isinstance(model, PeftModel):
            if adapter_name in model.peft_config:
                raise ValueError(f"adapter name {adapter_name!r} is already loaded")
            model.add_adapter(adapter_name, lora)
        else:
            model = get_peft_model(model, lora, adapter_name=adapter_name)
            base.model = model
    for pname, param in model.named_parameters():
        if "lora_" in pname and f".{adapter_name}." in pname:
            param.data = param.data.float()
    load_state(model, adapter_name, state)
    model.requires_grad_(False)
    model.eval()
    return model


def remove_adapter_from_base(base: Any, adapter_name: str) -> None:
    """Delete an adapter loaded with add_adapter_to_base; the last one unwraps base.model again."""
    from peft import PeftModel

    model = base.model
    if not isinstance(model, PeftModel) or adapter_name not in model.peft_config:
        return
    if len(model.peft_config) == 1:
        base.model = model.unload()
        base.model.requires_grad_(False)
        base.model.eval()
        return
    with warnings.catch_warnings():  # "adapter X was active which is now deleted": expected here
        warnings.simplefilter("ignore", UserWarning)
        model.delete_adapter(adapter_name)
