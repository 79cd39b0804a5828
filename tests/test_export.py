"""`chorus export`: a trained tiny ensemble leaves chorus, and a plain transformers + peft script (the
README's code) reproduces the reference ensemble's probabilities. Also: published runs hold no paths
into the hidden partial folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from services.cli.main import app

runner = CliRunner()
TASKS = ["cb", "rte", "sst2"]
ROWS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny ensemble trained by `chorus train`: two group adapters, boosters (so the base term is used)."""
    root = tmp_path_factory.mktemp("export")
    groups = root / "groups.json"
    groups.write_text(json.dumps({"groups": [["cb", "rte"], ["sst2"]]}))
    run = root / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "--groups",
            str(groups),
            "--model",
            "tiny-llama",
            "--quantization",
            "none",
            "--max-train",
            "8",
            "--max-val",
            "4",
            "--max-test",
            "4",
            "--epochs",
            "1",
            "--max-length",
            "64",
            "--lr",
            "5e-2",
            "--no-single",
            "--boost-threshold",
            "0",
            "--boost-rounds",
            "1",
            "--boost-lr",
            "5e-2",
            "--out",
            str(run),
        ],
    )
    assert result.exit_code == 0, result.output
    return root, run


@pytest.fixture(scope="module")
def exported(trained):
    root, run = trained
    out = root / "exported"
    result = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return run, out


@pytest.mark.needs_data  # the `trained` fixture trains on cb, rte and sst2
def test_export_writes_a_self_contained_folder(exported):
    from shared.ml.serving.export import SNIPPET
    from shared.ml.training.ensemble import load_manifest
    from shared.storage import sha256_file

    run, out = exported
    manifest = load_manifest(out / "ensemble.json")
    # the run's member paths already were adapters/<name>: the fingerprint is unchanged
    assert manifest.fingerprint == load_manifest(run / "ensemble.json").fingerprint
    spec = json.loads((out / "inference.json").read_text())
    assert set(spec["tasks"]) == set(TASKS) and spec["max_length"] == 64
    assert spec["base"]["name"] == "tiny-llama" and spec["base"]["quantization"] == "none"
    assert spec["base"]["hub_id"] is None and spec["base"]["bnb_config"] is None
    for m in manifest.members:
        assert spec["members"][m.name]["path"] == m.path
        if m.path is not None:
            assert m.path == f"adapters/{m.name}"
            assert sha256_file(out / m.path / "adapter_model.safetensors") == m.sha256
            config = json.loads((out / m.path / "adapter_config.json").read_text())
            assert config["base_model_name_or_path"] == "tiny-llama"
    for task, row in spec["tasks"].items():
        assert row["weights"] == {m.name: manifest.task_weights(task).get(m.name, 0.0) for m in manifest.members}
        assert len(row["answer_token_ids"]) == len(row["choices"]) and row["template"]
    assert any(row["weights"]["base"] < 0 for row in spec["tasks"].values())  # boosters enter as b - base
    readme = (out / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    assert code == SNIPPET
    assert not re.search(r"^\s*(import|from)\s+(shared|services|chorus)\b", code, re.M)


@pytest.mark.needs_data  # the `trained` fixture trains on cb, rte and sst2
def test_plain_peft_script_reproduces_the_reference_ensemble(exported, tmp_path):
    from shared.ml.models import Base, tiny_llama_folder
    from shared.ml.tasks.registry import get_task
    from shared.ml.training.ensemble import ensemble_choice_logits, ensemble_probabilities, load_manifest

    _, out = exported
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    script = tmp_path / "reproduce.py"
    script.write_text(code)
    examples = {t: get_task(t).split("test")[:ROWS] for t in TASKS}
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps({t: [ex.fields for ex in exs] for t, exs in examples.items()}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(rows), str(tiny_llama_folder())],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    plain = json.loads(proc.stdout)

    manifest = load_manifest(out / "ensemble.json")
    base = Base.load("tiny-llama", "none", "cpu")
    for task, exs in examples.items():
        expected = ensemble_probabilities(ensemble_choice_logits(base, manifest, out, task, exs))
        got = torch.tensor(plain[task])
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-4), (task, got, expected)
    assert any(not torch.allclose(torch.tensor(plain[t]), torch.tensor(plain[t]).mean(-1, keepdim=True)) for t in TASKS)


@pytest.mark.needs_data  # the `trained` fixture trains on cb, rte and sst2
def test_export_refuses_bad_input_and_writes_nothing(trained, tmp_path):
    import shutil

    _, run = trained
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", str(tmp_path / "nothing-here"), "--out", str(out)])
    assert result.exit_code == 2 and "ensemble.json" in result.output
    assert not out.exists()

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    result = runner.invoke(app, ["export", str(run / "ensemble.json"), "--out", str(busy)])
    assert result.exit_code == 2 and "not an empty folder" in result.output
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]

    tampered = tmp_path / "tampered"
    shutil.copytree(run, tampered)
    weights = next(tampered.glob("adapters/*/adapter_model.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = runner.invoke(app, ["export", str(tampered), "--out", str(out)])
    assert result.exit_code == 2 and "sha256" in result.output
    assert not out.exists() and not list(tmp_path.glob(".out.export-*"))


@pytest.mark.needs_data  # the `trained` fixture trains on cb, rte and sst2
def test_published_run_json_has_no_partial_paths(trained):
    root, run = trained
    files = list(run.rglob("*.json"))
    assert files
    for path in files:
        assert ".partial-" not in path.read_text(), path
    assert not list(root.glob(".run.partial-*"))


def test_run_into_rewrites_paths_into_the_published_folder(tmp_path):
    from services.cli.common import run_into

    out = tmp_path / "done"

    def stage(workdir):
        (workdir / "sub").mkdir()
        (workdir / "data.json").write_text("[1]")
        doc = {"source": str(workdir / "data.json"), "nested": [{"dir": str(workdir)}], "n": 3}
        (workdir / "sub" / "index.json").write_text(json.dumps(doc))
        return {}

    run_into(out, "kind", "sub", stage)
    doc = json.loads((out / "sub" / "index.json").read_text())
    assert doc == {"source": str(out / "data.json"), "nested": [{"dir": str(out)}], "n": 3}
    assert json.loads(open(doc["source"]).read()) == [1]
    assert not list(tmp_path.glob(".done.partial-*"))


def test_grouping_run_published_by_the_cli_records_the_published_affinity_path(tmp_path):
    """run_grouping records its affinity.json's path; computed in the partial folder, it must name --out."""
    from services.cli.common import run_into
    from shared.ml.affinity.params import GroupingParams
    from shared.ml.affinity.stage import run_grouping

    out = tmp_path / "grouped"
    matrix = [[1.0, 0.8, -0.5, -0.4], [0.7, 1.0, -0.3, -0.6], [-0.4, -0.5, 1.0, 0.9], [-0.6, -0.2, 0.8, 1.0]]

    def stage(workdir):
        (workdir / "affinity.json").write_text(
            json.dumps({"tasks": ["cb", "rte", "sst2", "boolq"], "matrix": matrix, "metric": "accuracy"})
        )
        return run_grouping(GroupingParams(groups=2, permutations=99), workdir)

    run_into(out, "pipeline", "groups.json", stage)
    doc = json.loads((out / "groups.json").read_text())
    assert doc["affinity"] == str(out / "affinity.json")
    for path in out.rglob("*.json"):
        assert ".partial-" not in path.read_text(), path
