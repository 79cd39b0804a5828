"""Files written whole or not at all.

Every write goes to a hidden temporary file in the target's folder and `os.replace` then puts it in place, so a
reader never sees half a file and a crash leaves at most a hidden temporary file behind. One home for what
stages, reports, manifests and the CLI write.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """A JSON-safe copy: dict keys as strings, tuples and sets as lists, NaN/inf as None, paths as strings,
    numpy arrays and scalars as Python values, anything else as its string."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    if hasattr(value, "__float__"):
        return json_safe(float(value))
    return str(value)


@contextmanager
def atomic_path(path: Path | str, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside `path`: moved onto `path` when the block ends normally, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path | str, data: Any, *, newline: bool = False) -> None:
    """JSON with indent 2 and no NaN/inf (they are not JSON); `newline` ends the file with one."""
    atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + ("\n" if newline else ""))


def atomic_save_npy(path: Path | str, array: Any) -> None:
    """A numpy array as .npy (no pickles)."""
    import numpy as np

    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)
