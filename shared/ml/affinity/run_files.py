"""What every Stage-1 run folder shares: the params it was made with (a re-run must match them) and its CSV tables."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from shared.files import atomic_write_json

# params that may differ between the pieces of one run (they do not change the results' meaning)
RUNTIME_ONLY = {"device", "batch_size", "batch_tokens", "eval_batch_size", "subsets_per_forward", "project_rows"}


def run_fingerprint(params: Any) -> dict[str, Any]:
    """The params that define a run's results (runtime-only knobs left out)."""
    return params.model_dump(mode="json", exclude=RUNTIME_ONLY)


def check_or_write_params(
    params: Any, workdir: Path, ignore: set[str] = RUNTIME_ONLY, what: str = "run", rewrite: bool = False
) -> None:
    """Record params.json in a new run folder, or refuse a folder that holds a `what` with other params (the
    `ignore`d ones may differ; with `rewrite`, a matching folder's params.json is replaced by these params)."""
    path = workdir / "params.json"
    mine = params.model_dump(mode="json", exclude=ignore)
    if path.exists():
        theirs = {k: v for k, v in json.loads(path.read_text()).items() if k not in ignore}
        if theirs != mine:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"{workdir} holds a {what} with different parameters ({', '.join(diff)}); use another directory"
            )
        if not rewrite:
            return
    atomic_write_json(path, params.model_dump(mode="json"))


def csv_text(rows: list[dict[str, Any]], fields: list[str]) -> str:
    """`rows` as CSV with the given columns (None as an empty cell, other keys ignored)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})
    return buf.getvalue()
