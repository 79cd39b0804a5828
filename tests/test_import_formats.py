"""Dataset import the Hugging Face datasets way, in the library and `chorus import` / `chorus tasks`:
text/label defaults and the file stem as name, one error per missing column, repeated row errors summarised,
label names as a JSON list, a comma list or a file, the user's own splits (a split column or one file per
split), JSON arrays, Parquet, Arrow and save_to_disk folders, --overwrite, `tasks rm` and skipped folders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from services.cli.main import app
from shared.config import get_settings
from shared.ml.tasks.base import SPLITS
from shared.ml.tasks.registry import get_task
from shared.ml.tasks.user_import import (
    DatasetValidationError,
    import_dataset,
    parse_label_names,
    read_label_names_file,
    user_task_spec,
    validate_dataset_bytes,
)

runner = CliRunner()


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("CHORUS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def _rows(n: int = 20, label: Any = None) -> list[dict[str, Any]]:
    return [{"text": f"review number {i}", "label": label(i) if label else ("neg", "pos")[i % 2]} for i in range(n)]


def _csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    cols = list(rows[0])
    path.write_text(",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n" for r in rows))
    return path


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _import(*args: str) -> Any:
    return runner.invoke(app, ["import", *args])


def _stored(home: Path) -> list[str]:
    root = home / "tasks"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# -- defaults, one error per missing column, summarised row errors ------------------------------------------
def test_plain_csv_imports_with_no_options_and_warns_about_integer_labels(tmp_path: Path) -> None:
    path = _csv(tmp_path / "My Reviews.csv", _rows(20, label=lambda i: i % 2))
    result = _import(str(path))
    assert result.exit_code == 0, result.output
    assert "imported task my-reviews" in result.output
    assert "warning:" in result.output and '"0"/"1"' in result.output.replace("\n", " ")
    task = get_task("my-reviews")
    assert task.choices == ["0", "1"] and task.sizes() == {"train": 16, "val": 2, "test": 2}
    assert any("integers" in w for w in user_task_spec("my-reviews")["warnings"])
    # with names given there is no warning, and the integers index them
    named = _import(str(path), "--name", "named", "--label-names", "negative,positive")
    assert named.exit_code == 0 and "warning" not in named.output
    assert get_task("named").choices == ["negative", "positive"]


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "json", "parquet"])
def test_a_missing_column_is_one_error_listing_the_columns(tmp_path: Path, suffix: str, home: Path) -> None:
    rows = [{"review": f"r {i}", "stars": i % 2} for i in range(30)]
    path = tmp_path / f"data.{suffix}"
    if suffix == "csv":
        _csv(path, rows)
    elif suffix == "jsonl":
        _jsonl(path, rows)
    elif suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DatasetValidationError) as info:
        import_dataset(path, "reviews")
    assert len(info.value.errors) == 1, info.value
    message = info.value.errors[0].message
    assert "'text' (text field)" in message and "'label' (label field)" in message
    assert "columns present: review, stars" in message
    result = _import(str(path), "--name", "reviews")
    assert result.exit_code == 2 and "1 problem(s)" in result.output and "--text-field" in result.output
    assert _stored(home) == []


def test_repeated_row_errors_are_one_line_with_a_count(tmp_path: Path) -> None:
    rows = _rows(40)
    for i in range(2, 40, 3):  # 13 empty texts
        rows[i]["text"] = " "
    with pytest.raises(DatasetValidationError) as info:
        validate_dataset_bytes("".join(json.dumps(r) + "\n" for r in rows).encode(), "jsonl")
    assert len(info.value.errors) == 13  # every one kept for programs
    lines = str(info.value).splitlines()
    assert len(lines) == 2, lines
    assert lines[1] == "  line 3: text: empty text (13 lines in all; also lines 6, 9, 12, 15, 18 and 7 more)"


# -- label names --------------------------------------------------------------------------------------------
def test_label_names_json_comma_and_file_agree(tmp_path: Path) -> None:
    expected = ["negative", "positive"]
    assert parse_label_names('["negative","positive"]') == parse_label_names("negative, positive") == expected
    (tmp_path / "names.txt").write_text("negative\n\npositive\n")
    (tmp_path / "names.json").write_text('["negative", "positive"]')
    assert read_label_names_file(tmp_path / "names.txt") == read_label_names_file(tmp_path / "names.json") == expected
    with pytest.raises(DatasetValidationError, match="label_names: not a JSON list"):
        parse_label_names('["negative",')
    path = _csv(tmp_path / "d.csv", _rows(20, label=lambda i: i % 2))
    for i, spec in enumerate(
        ['["negative","positive"]', "negative,positive", f"@{tmp_path / 'names.txt'}", f"@{tmp_path / 'names.json'}"]
    ):
        result = _import(str(path), "--name", f"names-{i}", "--label-names", spec)
        assert result.exit_code == 0, result.output
        assert get_task(f"names-{i}").choices == expected
    missing = _import(str(path), "--name", "names-x", "--label-names", f"@{tmp_path / 'nope.txt'}")
    assert missing.exit_code == 2 and "cannot read nope.txt" in missing.output


# -- splits -------------------------------------------------------------------------------------------------
def _split_rows() -> list[dict[str, Any]]:
    rows = _rows(30)
    for i, row in enumerate(rows):
        row["split"] = "train" if i < 20 else ("validation" if i < 25 else "test")
    rows[21]["split"] = "VAL"  # val, any case, is validation too
    return rows


def test_split_column_is_kept(tmp_path: Path) -> None:
    task = import_dataset(_jsonl(tmp_path / "d.jsonl", _split_rows()), "given")
    assert task.sizes() == {"train": 20, "val": 5, "test": 5}
    assert {ex.fields["text"] for ex in task.split("test")} == {f"review number {i}" for i in range(25, 30)}
    spec = user_task_spec("given")
    assert spec["split_source"] == "column" and "as given by the split column" in spec["description"]
    ignored = import_dataset(_jsonl(tmp_path / "d.jsonl", _split_rows()), "ignored", split_field=None)
    assert ignored.sizes() == {"train": 24, "val": 3, "test": 3}


def test_split_column_problems_and_missing_splits(tmp_path: Path) -> None:
    rows = _split_rows()
    rows[3]["split"] = "dev"
    rows[4]["split"] = ""
    with pytest.raises(DatasetValidationError) as info:
        validate_dataset_bytes("".join(json.dumps(r) + "\n" for r in rows).encode(), "jsonl")
    assert {(e.line, e.field) for e in info.value.errors} == {(4, "split"), (5, "split")}
    assert "unknown split 'dev'; expected train, validation (or val) or test" in str(info.value)
    no_train = [{**r, "split": "test"} for r in _rows(10)]
    with pytest.raises(DatasetValidationError, match="no train rows"):
        validate_dataset_bytes("".join(json.dumps(r) + "\n" for r in no_train).encode(), "jsonl")
    # train and test given: val is carved from train, test kept as it is
    rows = [{**r, "split": "train" if i < 20 else "test"} for i, r in enumerate(_rows(30))]
    task = import_dataset(_jsonl(tmp_path / "tt.jsonl", rows), "train-test")
    assert task.sizes() == {"train": 18, "val": 2, "test": 10}
    assert "val carved from train" in user_task_spec("train-test")["description"]


def test_one_file_per_split_in_the_cli(tmp_path: Path, home: Path) -> None:
    train = _csv(tmp_path / "imdb_train.csv", _rows(20))
    val = _jsonl(tmp_path / "val.jsonl", _rows(6))
    test = _csv(tmp_path / "test.tsv", _rows(8))
    test.write_text(test.read_text().replace(",", "\t"))
    result = _import("--train", str(train), "--val", str(val), "--test", str(test))
    assert result.exit_code == 0, result.output
    assert "imported task imdb" in result.output and "splits as given" in result.output
    assert get_task("imdb").sizes() == {"train": 20, "val": 6, "test": 8}
    # FILE with --validation: FILE is the train split, test is carved from it
    result = _import(str(train), "--name", "two-files", "--validation", str(val))
    assert result.exit_code == 0, result.output
    assert get_task("two-files").sizes() == {"train": 18, "val": 6, "test": 2}
    # a bad row in one file names that file
    bad = _jsonl(tmp_path / "bad.jsonl", [*_rows(5), {"text": "", "label": "neg"}])
    result = _import("--train", str(train), "--validation", str(bad), "--name", "bad-split")
    assert result.exit_code == 2 and "bad.jsonl (validation) line 6: text: empty text" in result.output
    assert "bad-split" not in _stored(home)
    both = _import(str(train), "--train", str(train))
    assert both.exit_code == 2 and "not both" in both.output


# -- formats ------------------------------------------------------------------------------------------------
def test_json_array_rows_are_numbered_by_their_line(tmp_path: Path) -> None:
    rows: list[Any] = _rows(20)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows, indent=2))
    assert import_dataset(path, "array").sizes() == {"train": 16, "val": 2, "test": 2}
    rows[1] = {"text": "", "label": "neg"}
    rows[2] = ["not", "an", "object"]
    text = "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"
    with pytest.raises(DatasetValidationError) as info:
        validate_dataset_bytes(text.encode(), "json")
    assert {(e.line, e.field) for e in info.value.errors} == {(3, "text"), (4, None)}
    with pytest.raises(DatasetValidationError, match="line 4: malformed JSON: Expecting value"):
        validate_dataset_bytes(b'[\n{"text": "a", "label": "x"},\n{"text": \n', "json")
    # a JSON array in a .jsonl file: the message says what to do
    with pytest.raises(DatasetValidationError, match="name it .json"):
        validate_dataset_bytes(json.dumps(_rows(4)).encode(), "jsonl")


def test_parquet_and_arrow_files(tmp_path: Path) -> None:
    table = pa.Table.from_pylist([{**r, "label": i % 2, "score": 0.5} for i, r in enumerate(_rows(20))])
    pq.write_table(table, tmp_path / "d.parquet")
    task = import_dataset(tmp_path / "d.parquet", "pq-task", label_names=["neg", "pos"])
    assert task.choices == ["neg", "pos"] and sum(task.sizes().values()) == 20
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    (tmp_path / "d.arrow").write_bytes(sink.getvalue().to_pybytes())
    assert sum(import_dataset(tmp_path / "d.arrow", "arrow-task").sizes().values()) == 20
    bad = pa.Table.from_pylist([{"text": None if i == 4 else f"t{i}", "label": i % 2} for i in range(10)])
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(DatasetValidationError, match="row 5: text: missing field"):
        import_dataset(tmp_path / "bad.parquet", "bad-pq")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetValidationError, match="unreadable Parquet file"):
        import_dataset(tmp_path / "broken.parquet", "broken")


def _save_to_disk(folder: Path, rows: list[dict[str, Any]], names: list[str]) -> None:
    """What `Dataset.save_to_disk` writes: an Arrow stream, state.json, dataset_info.json with the features."""
    folder.mkdir(parents=True)
    features = {"text": {"dtype": "string", "_type": "Value"}, "label": {"names": names, "_type": "ClassLabel"}}
    table = pa.Table.from_pylist(rows)
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))


def test_save_to_disk_folders(tmp_path: Path) -> None:
    folder = tmp_path / "movies"
    folder.mkdir()
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation", "test", "unsupervised"]}))
    for split, n in (("train", 20), ("validation", 6), ("test", 4)):
        _save_to_disk(
            folder / split, [{"text": f"{split} {i}", "label": i % 2} for i in range(n)], ["negative", "positive"]
        )
    _save_to_disk(
        folder / "unsupervised", [{"text": f"u {i}", "label": -1} for i in range(5)], ["negative", "positive"]
    )
    result = _import(str(folder))
    assert result.exit_code == 0, result.output
    assert "split 'unsupervised' of the saved dataset skipped" in result.output.replace("\n", " ")
    task = get_task("movies")
    assert task.choices == ["negative", "positive"]  # the ClassLabel names
    assert task.sizes() == {"train": 20, "val": 6, "test": 4}
    assert {ex.fields["text"] for ex in task.split("val")} == {f"validation {i}" for i in range(6)}
    assert all(ex.label == int(ex.fields["text"].split()[1]) % 2 for s in SPLITS for ex in task.split(s))
    # one saved Dataset (not a dict) is split 80/10/10; -1 (unlabelled) rows are refused with a hint
    single = tmp_path / "single"
    _save_to_disk(single, [{"text": f"s {i}", "label": -1 if i == 3 else i % 2} for i in range(20)], ["a", "b"])
    with pytest.raises(DatasetValidationError, match="row 4: label: unknown label '-1'.*unlabelled"):
        import_dataset(single, "single")


# -- overwrite, tasks rm, skipped folders -------------------------------------------------------------------
def test_overwrite(tmp_path: Path) -> None:
    path = _csv(tmp_path / "over.csv", _rows(10))
    assert _import(str(path)).exit_code == 0
    again = _import(str(_csv(tmp_path / "over.csv", _rows(20))))
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
    assert sum(get_task("over").sizes().values()) == 10
    replaced = _import(str(path), "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert sum(get_task("over").sizes().values()) == 20


def test_tasks_rm(tmp_path: Path, home: Path) -> None:
    assert _import(str(_csv(tmp_path / "gone.csv", _rows(10)))).exit_code == 0
    result = runner.invoke(app, ["tasks", "rm", "gone"])
    assert result.exit_code == 0 and "deleted task gone" in result.output
    assert _stored(home) == []
    with pytest.raises(ValueError, match="unknown task"):
        get_task("gone")
    assert runner.invoke(app, ["tasks", "rm", "gone"]).exit_code == 2
    builtin = runner.invoke(app, ["tasks", "rm", "cb"])
    assert builtin.exit_code == 2 and "built-in" in builtin.output


def test_tasks_rm_refuses_while_a_job_uses_the_task(tmp_path: Path, home: Path) -> None:
    from shared.db.models import Job, new_id
    from shared.db.session import migrate, session_scope

    assert _import(str(_csv(tmp_path / "busy.csv", _rows(10)))).exit_code == 0
    migrate()
    with session_scope() as session:
        job = Job(
            id=new_id("job"),
            type="training",
            status="queued",
            owner="alice",
            params={"groups": [["cb", "busy"]], "model": "tiny-llama"},
        )
        session.add(job)
        done = Job(id=new_id("job"), type="evaluation", status="succeeded", owner="alice", params={"tasks": ["busy"]})
        session.add(done)
    result = runner.invoke(app, ["tasks", "rm", "busy"])
    assert result.exit_code == 2 and job.id in result.output and done.id not in result.output
    assert "busy" in _stored(home)
    with session_scope() as session:
        session.get(Job, job.id).status = "cancelled"  # type: ignore[union-attr]
    assert runner.invoke(app, ["tasks", "rm", "busy"]).exit_code == 0
    assert _stored(home) == []


def test_tasks_lists_the_folders_it_skips(tmp_path: Path, home: Path) -> None:
    assert _import(str(_csv(tmp_path / "fine.csv", _rows(10)))).exit_code == 0
    assert _import(str(_csv(tmp_path / "tampered.csv", _rows(10)))).exit_code == 0
    spec_path = home / "tasks" / "tampered" / "task.json"
    spec = json.loads(spec_path.read_text())
    spec["template"] = "{{ text.__class__ }} Answer:"
    spec_path.write_text(json.dumps(spec))
    (home / "tasks" / "stray").mkdir()
    (home / "tasks" / "Bad Name").mkdir()
    (home / "tasks" / ".fine.tmp-123").mkdir()  # an import in progress: not listed
    result = runner.invoke(app, ["tasks"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "skipped 3 data folder(s)" in out
    assert "tampered: user task 'tampered' cannot be loaded" in out and "not allowed" in out
    assert "stray: no task.json" in out and "Bad Name: not a valid task name" in out and ".fine.tmp" not in out
    listed = runner.invoke(app, ["tasks", "--json"])
    names = {t["name"] for t in json.loads(listed.stdout)}
    assert "fine" in names and "tampered" not in names
    assert "skipped tampered" in listed.stderr
    # a skipped folder can be removed
    assert runner.invoke(app, ["tasks", "rm", "tampered"]).exit_code == 0
