"""`chorus demo` end to end, small: the real stack (API, worker, inference service on the embedded SQLite and
broker) in subprocesses, a pipeline job on SmolLM2 over HTTP, its report, and the served ensemble classifying."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from shared.config import REPO_ROOT

pytestmark = [pytest.mark.slow, pytest.mark.needs_data]


def test_demo_runs_the_stack_end_to_end(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL", "CHORUS_ADMIN_KEY")}
    env["CHORUS_HOME"] = str(tmp_path / "home")
    env["CHORUS_MODEL_CACHE_DIR"] = str(REPO_ROOT / ".chorus" / "models")  # the converted SmolLM2, shared
    env["COLUMNS"] = "200"
    cmd = [sys.executable, "-m", "services.cli.main", "demo", "--tasks", "sst2,cr", "--max-train", "4"]
    cmd += ["--epochs", "1", "--examples", "2"]
    done = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1500)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert re.search(r"submitted pipeline job job-\w+ on sst2, cr", out)
    assert re.search(r"^groups: \{", out, re.M)
    assert "inference service, ensemble" in out  # the served ensemble's table, under its fingerprint
    assert len(re.findall(r"^│ (sst2|cr) ", out, re.M)) >= 4  # 2 examples of each task classified
    seconds = int(re.search(r"demo took (\d+) s", out).group(1))
    assert seconds > 0 and (tmp_path / "home" / "demo").is_dir()
