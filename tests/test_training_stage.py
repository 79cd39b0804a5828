"""Pipeline orchestration: stage order, resume (skip finished stages), params checks, groups input."""

from __future__ import annotations

import json

import pytest

from shared.ml.training import stage as st
from shared.ml.training.params import TrainingParams
from shared.ml.training.pipeline_params import PipelineParams


def _fake_stages(calls):
    def make(name):
        def fn(workdir, inputs, progress):
            calls.append((name, sorted(inputs)))
            (workdir / f"{name}.out").write_text(name)
            return st._measured(name, lambda: {"artifacts": {name: f"{name}.out"}}, workdir)

        return fn

    return lambda params: [(n, make(n)) for n in ("affinity", "grouping", "training")]


def test_run_pipeline_skips_finished_stages_and_reruns_later_ones(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(st, "pipeline_stages", _fake_stages(calls))
    params = PipelineParams(model="tiny-llama", tasks=["cb", "rte"], groups=2)
    out = st.run_pipeline(params, tmp_path)
    assert [c[0] for c in calls] == ["affinity", "grouping", "training"]
    assert calls[1][1] == ["affinity"] and calls[2][1] == ["affinity", "grouping"]
    assert out["artifacts"] == {"affinity": "affinity.out", "grouping": "grouping.out", "training": "training.out"}
    assert json.loads((tmp_path / "stages" / "affinity.json").read_text())["stage_cost"]["wall_seconds"] >= 0
    calls.clear()
    st.run_pipeline(params, tmp_path)
    assert calls == []  # everything finished: nothing runs again
    (tmp_path / "grouping.out").unlink()
    st.run_pipeline(params, tmp_path)
    assert [c[0] for c in calls] == ["grouping", "training"]


def test_a_workdir_is_only_resumed_with_the_same_params(tmp_path, monkeypatch):
    monkeypatch.setattr(st, "pipeline_stages", _fake_stages([]))
    st.run_pipeline(PipelineParams(model="tiny-llama", tasks=["cb", "rte"], groups=2), tmp_path)
    with pytest.raises(ValueError, match="different parameters.*groups"):
        st.run_pipeline(PipelineParams(model="tiny-llama", tasks=["cb", "rte"], groups=1), tmp_path)


def test_pipeline_params_feed_every_stage():
    p = PipelineParams(
        model="tiny-llama",
        tasks=["cb", "rte", "sst2"],
        groups="auto",
        max_train=40,
        max_val=10,
        seed=3,
        affinity={"dim": 16},
        grouping={"method": "spectral"},
        training={"epochs": 2, "rank": 8, "boosting": {"max_rounds": 1}},
    )
    a = p.affinity_params()
    assert (a.model, a.tasks, a.max_train, a.max_val, a.seed, a.dim, a.rank) == (
        "tiny-llama",
        ["cb", "rte", "sst2"],
        40,
        10,
        3,
        16,
        8,
    )
    g = p.grouping_params()
    assert g.groups == "auto" and g.method == "spectral" and g.seed == 3
    t = p.training_params([["cb", "rte"], ["sst2"]])
    assert (t.epochs, t.rank, t.max_train, t.seed, t.boosting.max_rounds) == (2, 8, 40, 3, 1)
    with pytest.raises(ValueError, match="dimm"):
        PipelineParams(model="tiny-llama", tasks=["cb", "rte"], affinity={"dimm": 3})
    with pytest.raises(ValueError, match="set by the grouping stage"):
        PipelineParams(model="tiny-llama", tasks=["cb", "rte"], training={"groups": [["cb"]]})


def test_training_params_groups(tmp_path):
    path = tmp_path / "groups.json"
    path.write_text(json.dumps({"groups": [["cb", "rte"], ["sst2"]], "method": "sdp"}))
    p = TrainingParams(model="tiny-llama", groups=str(path))
    assert p.groups == [["cb", "rte"], ["sst2"]] and p.groups_source == str(path)
    assert p.all_tasks() == ["cb", "rte", "sst2"] and p.lora_alpha == 32.0
    assert TrainingParams(groups="art-123").groups == "art-123"  # resolved by the job worker later
    for bad, match in [
        ([["cb"], ["cb", "rte"]], "group 0 and group 1"),
        ([["cb"], []], "empty"),
        ([["zzz"]], "unknown task"),
    ]:
        with pytest.raises(ValueError, match=match):
            TrainingParams(groups=bad)
