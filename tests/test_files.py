"""shared/files.py: a write lands whole or not at all, and leaves no temporary file behind either way."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.files import atomic_path, atomic_save_npy, atomic_write_json, atomic_write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_json(target, {"a": 1}, newline=True)
    assert target.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_json_refuses_nan_and_npy_round_trips(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"v": float("nan")})
    assert not (tmp_path / "x.json").exists() and list(tmp_path.iterdir()) == []
    atomic_save_npy(tmp_path / "g.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(np.load(tmp_path / "g.npy"), np.arange(6, dtype=np.float32).reshape(2, 3))
    atomic_write_text(tmp_path / "t.txt", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npy", "t.txt"]


def test_json_safe_is_what_json_can_hold():
    from pathlib import Path

    from shared.files import json_safe

    value = {
        1: (np.float32(0.5), float("inf"), np.int64(3), np.bool_(True)),
        "a": {"nan": float("nan"), "path": Path("/x/y"), "set": {2}},
        "arr": np.arange(3),
        "ok": [None, True, "s"],
    }
    assert json_safe(value) == {
        "1": [0.5, None, 3, True],
        "a": {"nan": None, "path": "/x/y", "set": [2]},
        "arr": [0, 1, 2],
        "ok": [None, True, "s"],
    }
    assert json.loads(json.dumps(json_safe(value), allow_nan=False))["1"][1] is None
