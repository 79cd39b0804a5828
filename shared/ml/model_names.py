"""Base-model names without torch (the API validates job params with this module alone).

Registered names: `smollm2-135m` and `tiny-llama` / `tiny-llama-seedN` for N in TINY_LLAMA_SEEDS (each seed
builds and caches a model of its own, so the range is small on purpose). Any other name is a local
Hugging Face folder: the library and the CLI load any folder, the job API only folders inside the
directories an operator allowed (CHORUS_ALLOWED_MODEL_DIRS).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from shared.errors import InvalidParams

# Registered name -> the identity written into files that leave the server (adapter_config.json).
PORTABLE_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct", "tiny-llama": "tiny-llama"}
TINY_LLAMA_SEEDS = range(8)
_TINY_SEED = re.compile(r"tiny-llama-seed(\d+)")


class ModelNameError(InvalidParams):
    """A model name that is not accepted here."""


def registered_names() -> list[str]:
    return [*PORTABLE_IDS, *(f"tiny-llama-seed{s}" for s in TINY_LLAMA_SEEDS)]


def tiny_llama_seed(name: str) -> int | None:
    """The seed of `tiny-llama` (0) or `tiny-llama-seedN`; None for other names; ModelNameError for a seed
    outside TINY_LLAMA_SEEDS or spelt other than plainly (`seed01`, `seed-1`)."""
    if name == "tiny-llama":
        return 0
    if not name.startswith("tiny-llama-seed"):
        return None
    match = _TINY_SEED.fullmatch(name)
    seed = int(match.group(1)) if match else -1
    if not match or str(seed) != match.group(1) or seed not in TINY_LLAMA_SEEDS:
        last = TINY_LLAMA_SEEDS.stop - 1
        raise ModelNameError(
            f"unknown model {name!r}: tiny-llama seeds are {TINY_LLAMA_SEEDS.start}..{last} "
            f"(tiny-llama-seed0 ... tiny-llama-seed{last})"
        )
    return seed


def parse_dirs(value: str | Sequence[str | Path] | None) -> list[Path]:
    """Allowed model directories from a comma-separated string (or a list), as absolute resolved paths."""
    items: Sequence[str | Path] = value.split(",") if isinstance(value, str) else value or ()
    return [Path(os.path.realpath(os.path.expanduser(str(i).strip()))) for i in items if str(i).strip()]


def inside(path: Path, roots: Sequence[Path]) -> bool:
    return any(path == root or root in path.parents for root in roots)


def check_api_model(name: str, allowed_dirs: Sequence[Path] = ()) -> str:
    """`name` if a job submitted through the API may use it: a registered name, or the absolute path of a
    folder that resolves (symlinks followed) inside one of `allowed_dirs`. ModelNameError otherwise."""
    if name in PORTABLE_IDS or tiny_llama_seed(name) is not None:
        return name
    known = f"{', '.join(PORTABLE_IDS)}, tiny-llama-seed0 ... tiny-llama-seed{TINY_LLAMA_SEEDS.stop - 1}"
    if not allowed_dirs:
        raise ModelNameError(
            f"unknown model {name!r}: expected a registered model ({known}); this deployment allows no model folders"
        )
    if not os.path.isabs(name) or "\x00" in name:
        raise ModelNameError(
            f"unknown model {name!r}: expected a registered model ({known}) or the absolute path "
            "of a model folder inside an allowed model directory"
        )
    if not inside(Path(os.path.realpath(name)), allowed_dirs):
        raise ModelNameError(f"model folder {name!r} is not inside an allowed model directory")
    return name


def portable_name(name: str) -> str:
    """An identity of base model `name` that reveals nothing of the server: the hub id of a registered model,
    `tiny-llama` for the seeded test models, the folder's own name for a local folder."""
    if name in PORTABLE_IDS:
        return PORTABLE_IDS[name]
    if name.startswith("tiny-llama"):
        return "tiny-llama"
    if os.path.isabs(name) or name.startswith(("~", "./", "../")):
        return Path(name).name or name
    return name
