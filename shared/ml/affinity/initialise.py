"""theta0 of a Stage-1 run: a fresh LoRA, or a meta-initialisation trained on all the run's tasks.

init="base": A random (seeded), B = 0, so theta0 computes the base model's outputs and the first-order model
must carry the whole effect of fine-tuning. init="meta" (the paper's setting): the same LoRA is first
fine-tuned on the union of all the run's training rows for `meta_epochs`; gradients, subset solutions and
the validation fine-tunes then all start from that point, which every subset's fine-tune stays close to.
The all-task fine-tune runs once, before anything else, and its cost is recorded in `theta0.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.files import atomic_write_json
from shared.ml.affinity.finetune import finetune
from shared.ml.affinity.runtime import Runtime, save_theta0
from shared.ml.progress import Progress, silent


def meta_initialise(rt: Runtime, params: Any, progress: Progress = silent) -> dict[str, Any]:
    """Fine-tune rt's adapter in place on all tasks' training rows; returns what it cost."""
    rows = rt.rows("train", params.max_train)
    res = finetune(
        rt,
        rows.items,
        {},
        params.meta_epochs,
        params.meta_lr,
        params.meta_batch_size,
        params.seed,
        select="last",
        progress=progress,
        stage="meta-initialisation",
    )
    return {
        "init": "meta",
        "epochs": params.meta_epochs,
        "lr": params.meta_lr,
        "batch_size": params.meta_batch_size,
        "rows": len(rows),
        "steps": res.steps,
        "train_loss": res.train_loss,
        "seconds": round(res.seconds, 3),
    }


def load_runtime(params: Any, theta0_path: Path, progress: Progress = silent) -> Runtime:
    """The run's model with theta0 loaded from `theta0_path`, or created (and saved) when it is missing.

    The metadata file beside it (`theta0.json`) says how theta0 was made; it is written before theta0 itself,
    so a theta0 file on disk always has its record."""
    theta0_path = Path(theta0_path)
    rt = Runtime.load(params, theta0_path)  # loads theta0 when the file exists
    if theta0_path.exists():
        return rt
    info: dict[str, Any] = {"init": "base", "seconds": 0.0}
    if params.init == "meta":
        info = meta_initialise(rt, params, progress)
    atomic_write_json(theta0_path.with_suffix(".json"), info)
    save_theta0(rt, theta0_path)
    return rt


def theta0_info(theta0_path: Path) -> dict[str, Any]:
    """The record written by load_runtime ({} for a run made before it existed)."""
    path = Path(theta0_path).with_suffix(".json")
    return json.loads(path.read_text()) if path.exists() else {}
