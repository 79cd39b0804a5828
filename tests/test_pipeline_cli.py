"""`chorus pipeline` and `chorus train` on the tiny Llama (NF4 on CPU), reduced to a handful of examples."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from services.cli.main import app
from tests.recompute import (
    accuracy,
    forward_flops,
    lengths_by_task,
    llama_shape,
    read_rows,
    tiny_llama_config,
    train_flops,
)

runner = CliRunner()
TASKS = ["cb", "rte", "sst2"]
SMALL = [
    "--model",
    "tiny-llama",
    "--max-train",
    "12",
    "--max-val",
    "6",
    "--max-test",
    "6",
    "--epochs",
    "1",
    "--max-length",
    "128",
    "--lr",
    "5e-3",
]


@pytest.fixture(scope="module")
def pipeline_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe") / "run"
    result = runner.invoke(
        app,
        [
            "pipeline",
            "--tasks",
            ",".join(TASKS),
            "--groups",
            "2",
            *SMALL,
            "--dim",
            "8",
            "--boost-threshold",
            "0",
            "--boost-rounds",
            "1",
            "--out",
            str(out),
        ],
    )
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
    assert cost["formula"]  # the FLOP figures themselves: test_report_flops_follow_the_formula
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


def _printed_rows(output: str, first: str) -> dict[str, list[str]]:
    """The cells of the printed rich tables, by their first cell."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│┃").split("│" if "│" in line else "┃")]
        if len(cells) > 1 and cells[0]:
            rows.setdefault(cells[0], cells[1:])
    assert first in rows, output
    return rows


@pytest.mark.needs_data
def test_report_columns_rescore_from_the_saved_predictions(pipeline_out):
    """Every accuracy of report.json (test table, validation table, averages) and of the printed table is
    re-scored from predictions.json's per-row predictions and labels."""
    out, output = pipeline_out
    report = json.loads((out / "report.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    assert report["split"] == "test" and set(preds) == {"val", "test"}
    for split, table, average in (
        ("test", report["tasks"], report["average"]),
        ("val", report["validation"]["tasks"], report["validation"]["average"]),
    ):
        assert set(preds[split]) == set(TASKS) == set(table)
        for task in TASKS:
            entry = preds[split][task]
            assert len(entry["labels"]) == 6
            assert set(entry["columns"]) == set(table[task]) >= {"ensemble", "single", "zero_shot", "ensemble_no_boost"}
            for col, pred in entry["columns"].items():
                assert table[task][col] == pytest.approx(accuracy(pred, entry["labels"]), abs=1e-12), (split, task, col)
        for col in average:
            assert average[col] == pytest.approx(sum(table[t][col] for t in TASKS) / len(TASKS), abs=1e-12), (
                split,
                col,
            )
    # the printed table shows the same numbers (percent, one decimal) in its header's column order
    rows = _printed_rows(output, "task")
    columns = rows["task"][1:]
    assert set(columns) == set(report["average"])
    for task in [*TASKS, "average"]:
        values = report["average"] if task == "average" else report["tasks"][task]
        assert rows[task][1:] == [f"{100 * values[c]:.1f}" for c in columns], task


@pytest.mark.needs_data
def test_report_flops_follow_the_formula(pipeline_out):
    """The cost block recomputed from the model's config.json, the FLOP formula and the rows each stage used
    (rows_train.csv / rows_val.csv: Stage 1 and training draw the same seeded rows here): the single adapter,
    the group adapters, boosting, the ratios the README quotes, Stage 1, and the printed cost lines."""
    out, output = pipeline_out
    report = json.loads((out / "report.json").read_text())
    affinity = json.loads((out / "affinity.json").read_text())
    theta0 = json.loads((out / "theta0.json").read_text())
    cost, params = report["cost"], report["params"]
    shape = llama_shape(tiny_llama_config(), params["training"]["rank"])
    assert cost["model_shape"] == shape.as_dict()
    train = lengths_by_task(read_rows(out / "rows_train.csv"))
    val = lengths_by_task(read_rows(out / "rows_val.csv"))
    assert {t: len(v) for t, v in train.items()} == {t: 12 for t in TASKS}
    assert {t: len(v) for t, v in val.items()} == {t: 6 for t in TASKS}
    all_train = [n for t in TASKS for n in train[t]]
    all_val = [n for t in TASKS for n in val[t]]
    epochs = params["training"]["epochs"]

    # the single all-task adapter: `epochs` training passes over every row and a validation pass per epoch
    single = cost["single"]
    assert (single["train_rows"], single["train_tokens"]) == (epochs * 36, epochs * sum(all_train))
    assert single["train_flops"] == pytest.approx(epochs * train_flops(shape, all_train), rel=1e-12)
    assert single["eval_flops"] == pytest.approx(epochs * forward_flops(shape, all_val), rel=1e-12)
    assert single["total_flops"] == pytest.approx(single["train_flops"] + single["eval_flops"], rel=1e-12)
    # the group adapters partition the tasks: the same rows, one adapter each
    groups = [g["tasks"] for g in report["groups"]]
    assert cost["groups"]["train_flops"] == pytest.approx(
        sum(epochs * train_flops(shape, [n for t in g for n in train[t]]) for g in groups), rel=1e-12
    )
    assert cost["groups"]["eval_flops"] == pytest.approx(
        sum(epochs * forward_flops(shape, [n for t in g for n in val[t]]) for g in groups), rel=1e-12
    )
    # boosting (threshold 0: every group, one round of one epoch): score the group adapter and the base on the
    # group's train and validation rows, train the booster, score it on validation
    b_epochs = params["training"]["boosting"]["epochs"] or epochs
    assert [g["boosted"] for g in report["groups"]] == [True, True]
    assert cost["boosting"]["train_flops"] == pytest.approx(b_epochs * train_flops(shape, all_train), rel=1e-12)
    expected_eval = (
        forward_flops(shape, all_train)
        + forward_flops(shape, all_train, lora=False)
        + forward_flops(shape, all_val)
        + forward_flops(shape, all_val, lora=False)
        + b_epochs * forward_flops(shape, all_val)
    )
    assert cost["boosting"]["eval_flops"] == pytest.approx(expected_eval, rel=1e-12)
    # the ensemble's training compute and the ratios printed and quoted
    parts = [cost[k]["total_flops"] for k in ("groups", "boosting", "weight_fit")]
    assert cost["ensemble_training"]["total_flops"] == pytest.approx(sum(parts), rel=1e-12)
    assert cost["ensemble_vs_single_flops"] == pytest.approx(sum(parts) / single["total_flops"], rel=1e-12)
    assert cost["ensemble_vs_single_train_tokens"] == pytest.approx(
        cost["ensemble_training"]["train_tokens"] / single["train_tokens"], rel=1e-12
    )
    # Stage 1 (linear mode, meta-initialised): the meta fine-tune's epochs and the gradient pass over the
    # training rows, a gradient pass over the validation rows, the base evaluation (one forward)
    assert (affinity["mode"], affinity["init"]) == ("linear", "meta") and theta0["rows"] == 36
    stage1 = (
        (1 + theta0["epochs"]) * train_flops(shape, all_train)
        + train_flops(shape, all_val)
        + forward_flops(shape, all_val)
    )
    assert cost["affinity_flops"] == pytest.approx(stage1, rel=1e-12)
    with_aff = (sum(parts) + stage1) / single["total_flops"]
    assert cost["ensemble_with_affinity_vs_single_flops"] == pytest.approx(with_aff, rel=1e-12)
    # inference: the members with a non-zero weight run for a task's request (README: "runs that task's members")
    manifest = json.loads((out / "ensemble.json").read_text())
    members = {t: sum(1 for w in manifest["tasks"][t]["weights"].values() if w != 0) for t in TASKS}
    assert cost["inference"]["members_per_example"] == members
    assert cost["inference"]["mean_members_per_example"] == pytest.approx(sum(members.values()) / len(TASKS))
    rows = _printed_rows(output, "cost")
    assert rows["inference: members run per example (mean)"] == [f"{sum(members.values()) / len(TASKS):.2f}"]
    assert rows["single adapter: training FLOPs (incl. validation passes)"] == [f"{single['total_flops']:.3g}"]
    assert rows["ensemble: group adapters + boosting + weight fit FLOPs"] == [f"{sum(parts):.3g}"]
    assert rows["ensemble / single training compute"] == [f"{sum(parts) / single['total_flops']:.3f}x"]
    assert rows["incl. affinity estimation"] == [f"{with_aff:.3f}x"]


def test_train_command_from_a_groups_file(pipeline_out, tmp_path):
    out, _ = pipeline_out
    out2 = tmp_path / "train"
    result = runner.invoke(
        app, ["train", "--groups", str(out / "groups.json"), *SMALL, "--no-boost", "--out", str(out2)]
    )
    assert result.exit_code == 0, result.output
    assert (out2 / "ensemble.json").is_file() and (out2 / "train_report.json").is_file()
    report = json.loads((out2 / "train_report.json").read_text())
    groups = json.loads((out / "groups.json").read_text())["groups"]
    assert [g["tasks"] for g in report["groups"]] == groups
    for i in range(len(groups)):
        assert (out2 / "adapters" / f"group_{i}" / "adapter_model.safetensors").is_file()
    assert set(report["tasks"]) == set(TASKS)


@pytest.mark.parametrize(
    "args, message",
    [
        (["pipeline", "--tasks", "cb,nope", "--groups", "2"], "nope"),
        (["pipeline", "--tasks", "cb,rte", "--groups", "3"], "groups"),
        (["pipeline", "--tasks", "cb,rte", "--groups", "many"], "--groups"),
        (["pipeline", "--tasks", "cb,rte", "--groups", "2", "--epochs", "0"], "--epochs"),
        (["pipeline", "--tasks", "cb,rte", "--groups", "2", "--model", "no-such-model"], "--model"),
        (["pipeline", "--tasks", "cb,rte", "--groups", "2", "--quantization", "int3"], "--quantization"),
    ],
)
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
