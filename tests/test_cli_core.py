"""The core CLI commands: tasks, eval (tiny model), import errors."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from services.cli.main import app

runner = CliRunner()

CORE_TASKS = {"cb", "copa", "rte", "wic", "wsc", "boolq", "multirc", "sst2", "mr", "subj", "cr", "mpqa"}


def test_tasks_json_lists_the_builtin_tasks_with_sizes():
    result = runner.invoke(app, ["tasks", "--json"])
    assert result.exit_code == 0, result.output
    listed = {t["name"]: t for t in json.loads(result.output)}
    assert CORE_TASKS <= set(listed)
    assert listed["cb"]["sizes"]["test"] == 56
    assert listed["cb"]["sizes"]["train"] + listed["cb"]["sizes"]["val"] == 250
    assert listed["cb"]["choices"] == ["Yes", "No", "Maybe"]
    for t in listed.values():
        assert set(t["sizes"]) == {"train", "val", "test"}
        assert len(t["choices"]) >= 2


def test_eval_on_tiny_model_prints_json_report():
    result = runner.invoke(app, ["eval", "--model", "tiny-llama", "--tasks", "cb,rte", "--max-examples", "6", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert set(report["tasks"]) == {"cb", "rte"}
    for m in report["tasks"].values():
        assert m["n"] == 6 and 0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0


def test_eval_rejects_unknown_task_with_exit_2():
    result = runner.invoke(app, ["eval", "--model", "tiny-llama", "--tasks", "cb,nope"])
    assert result.exit_code == 2
    assert "nope" in result.output


def test_import_reports_bad_rows(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "a"}\n{"text": "", "label": "b"}\n{"label": "a"}\n')
    result = runner.invoke(
        app, ["import", str(bad), "--name", "badset", "--text-field", "text", "--label-field", "label"]
    )
    assert result.exit_code == 2
    assert "line 2" in result.output and "line 3" in result.output
    listed = json.loads(runner.invoke(app, ["tasks", "--json"]).output)
    assert "badset" not in {t["name"] for t in listed}
