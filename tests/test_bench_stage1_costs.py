"""bench/stage1_costs.py runs on tiny-llama and prints one well-formed row per batch size (guards against rot)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from shared.config import REPO_ROOT as REPO


def test_stage1_costs_prints_rates_per_batch_size() -> None:
    cmd = [
        sys.executable,
        str(REPO / "bench" / "stage1_costs.py"),
        "--model",
        "tiny-llama",
        "--tasks",
        "sst2,cb",
        "--max-train",
        "12",
        "--batch-sizes",
        "4,16",
        "--ft-steps",
        "2",
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    head, per_batch, ft = rows[0], rows[1:-1], rows[-1]
    assert head["rows"] == 24 and head["tokens"] > 24
    assert [r["batch_size"] for r in per_batch] == [4, 16]
    assert [r["batches"] for r in per_batch] == [6, 2]
    for r in per_batch:  # the rates are the printed seconds over the 24 rows and the batches
        for k in ("grad", "plain", "forward"):
            assert r[f"{k}_s"] > 0 and r[f"{k}_rows_per_s"] == round(24 / r[f"{k}_s"], 1), (k, r)
            assert r[f"{k}_s_per_batch"] == round(r[f"{k}_s"] / r["batches"], 4), (k, r)
    # the fine-tune row: 2 steps of 8 rows; seconds printed rounded to 3 decimals, the rates from the exact time
    assert ft["finetune_batch_size"] == 8 and ft["steps"] == 2
    lo, hi = ft["seconds"] - 5e-4, ft["seconds"] + 5e-4
    assert 16 / hi - 0.05 <= ft["rows_per_s"] <= 16 / lo + 0.05, ft
    assert lo / 2 - 5e-5 <= ft["s_per_step"] <= hi / 2 + 5e-5, ft
