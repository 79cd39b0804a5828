"""`chorus pipeline` and `chorus train` on the tiny Llama (NF4 on CPU), reduced to a handful of examples."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from services.cli.main import app

runner = CliRunner()
TASKS = ["cb", "rte", "sst2"]
SMALL = ["--model", "tiny-llama", "--max-train", "12", "--max-val", "6", "--max-test", "6", "--epochs", "1",
         "--max-length", "128", "--lr", "5e-3"]


@pytest.fixture(scope="module")
def pipeline_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    result = runner.invoke(app, ["pipeline", "--tasks", ",".join(TASKS), "--groups", "2", *SMALL, "--dim", "8",
                                 "--boost-threshold", "0", "--boost-rounds", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_pipeline_writes_the_contract_files(pipeline_out):
    from shared.ml.training.adapters import load_adapter_state
    from shared.ml.training.ensemble import load_manifest

    out, output = pipeline_out
    for name in ("ensemble.json", "report.json", "train_report.json", "groups.json", "affinity.json"):
        assert (out / name).is_file(), name
    assert not list(out.parent.glob(".run.partial-*"))  # the work folder was published and removed
    report = json.loads((out / "report.json").read_text())
    assert set(report["tasks"]) == set(TASKS)
    for row in report["tasks"].values():
        assert {"ensemble", "single", "zero_shot", "ensemble_no_boost"} <= set(row)
        assert all(0.0 <= row[k] <= 1.0 for k in ("ensemble", "single", "zero_shot", "ensemble_no_boost"))
    assert {"ensemble", "single", "zero_shot", "ensemble_no_boost"} <= set(report["average"])
    cost = report["cost"]
    assert cost["single"]["train_flops"] > 0 and cost["ensemble_training"]["train_flops"] > 0
    assert cost["ensemble_vs_single_flops"] > 0 and cost["formula"]
    assert set(cost["stages"]) >= {"affinity", "grouping", "group_adapters", "evaluation"}
    assert all(e["peak_memory_bytes"] > 0 for e in cost["stages"].values())
    assert cost["inference"]["members_per_example"].keys() == set(TASKS)
    assert sorted(t for g in report["groups"] for t in g["tasks"]) == sorted(TASKS) and len(report["groups"]) == 2
    # the printed table names every task and the average
    for t in [*TASKS, "average", "ensemble"]:
        assert t in output
    manifest = load_manifest(out / "ensemble.json")
    assert manifest.base.base_model == "tiny-llama" and manifest.base.quantization == "nf4"
    assert set(manifest.tasks) == set(TASKS)
    for m in manifest.members:
        if m.role == "base":
            continue
        folder = out / m.path
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        _, _, meta = load_adapter_state(folder, None, m.sha256)
        assert meta.base_model == "tiny-llama" and meta.quantization == "nf4"
    assert (out / "adapters" / "single" / "adapter_model.safetensors").is_file()


def test_report_matches_the_reference_ensemble_on_the_saved_files(pipeline_out):
    """Re-score the test examples from the files alone (fresh base) with the reference scorer."""
    from shared.ml.data import subsample
    from shared.ml.models import Base
    from shared.ml.tasks.registry import get_task
    from shared.ml.training.ensemble import ensemble_choice_logits, load_manifest
    from shared.ml.training.trainer import trainable_4bit

    out, _ = pipeline_out
    report = json.loads((out / "report.json").read_text())
    manifest = load_manifest(out / "ensemble.json")
    base = Base.load("tiny-llama", "nf4", "cpu")
    trainable_4bit(base.model)  # the numeric path the training run used on CPU
    for task in TASKS:
        examples = subsample(get_task(task).split("test"), 6, 0)
        logits = ensemble_choice_logits(base, manifest, out, task, examples)
        labels = [e.label for e in examples]
        acc = sum(int(p == y) for p, y in zip(logits.argmax(-1).tolist(), labels, strict=True)) / len(labels)
        assert acc == pytest.approx(report["tasks"][task]["ensemble"])


def test_train_command_from_a_groups_file(pipeline_out, tmp_path):
    out, _ = pipeline_out
    out2 = tmp_path / "train"
    result = runner.invoke(app, ["train", "--groups", str(out / "groups.json"), *SMALL, "--no-boost", "--out", str(out2)])
    assert result.exit_code == 0, result.output
    assert (out2 / "ensemble.json").is_file() and (out2 / "train_report.json").is_file()
    report = json.loads((out2 / "train_report.json").read_text())
    groups = json.loads((out / "groups.json").read_text())["groups"]
    assert [g["tasks"] for g in report["groups"]] == groups
    for i in range(len(groups)):
        assert (out2 / "adapters" / f"group_{i}" / "adapter_model.safetensors").is_file()
    assert set(report["tasks"]) == set(TASKS)


@pytest.mark.parametrize("args, message", [
    (["pipeline", "--tasks", "cb,nope", "--groups", "2"], "nope"),
    (["pipeline", "--tasks", "cb,rte", "--groups", "3"], "groups"),
    (["pipeline", "--tasks", "cb,rte", "--groups", "many"], "--groups"),
    (["pipeline", "--tasks", "cb,rte", "--groups", "2", "--epochs", "0"], "--epochs"),
    (["pipeline", "--tasks", "cb,rte", "--groups", "2", "--model", "no-such-model"], "--model"),
    (["pipeline", "--tasks", "cb,rte", "--groups", "2", "--quantization", "int3"], "--quantization"),
])
def test_bad_pipeline_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    result = runner.invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_bad_groups_file_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    cases = {
        "missing.json": None,
        "notjson.json": "{oops",
        "shape.json": json.dumps({"groups": "cb"}),
        "unknown.json": json.dumps({"groups": [["cb"], ["zzz"]]}),
        "twice.json": json.dumps({"groups": [["cb", "rte"], ["rte"]]}),
        "empty.json": json.dumps({"groups": [["cb"], []]}),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        result = runner.invoke(app, ["train", "--groups", str(path), "--model", "tiny-llama", "--out", str(out)])
        assert result.exit_code == 2, (name, result.output)
        assert "groups" in result.output or "task" in result.output, (name, result.output)
        assert not out.exists() and not list(tmp_path.glob(".out.partial-*")), name
