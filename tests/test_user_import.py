"""User dataset import: valid JSONL/CSV/TSV become tasks; every bad row is reported; nothing half-written."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.config import REPO_ROOT, get_settings
from shared.ml.tasks.base import SPLITS
from shared.ml.tasks.registry import get_task, list_tasks, parse_task_list
from shared.ml.tasks.user_import import (
    DatasetValidationError,
    RowError,
    TaskExistsError,
    delete_user_task,
    import_dataset,
    list_user_tasks,
    register_dataset,
    user_task_spec,
    validate_dataset_bytes,
)


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("CHORUS_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def _jsonl(rows: list[dict]) -> bytes:
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def _rows(n: int = 40) -> list[dict]:
    labels = ["neg", "pos", "neutral"]
    return [{"id": f"r{i}", "text": f"example text number {i}", "label": labels[i % 3]} for i in range(n)]


def _stored(home: Path) -> list[str]:
    root = home / "tasks"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def _lines(error: DatasetValidationError) -> set[tuple[int | None, str | None]]:
    return {(e.line, e.field) for e in error.errors}


def test_jsonl_import_registers_a_task(tmp_path: Path, home: Path) -> None:
    path = tmp_path / "reviews.jsonl"
    path.write_bytes(_jsonl(_rows(40)))
    task = import_dataset(path, "reviews", ["text"], "label", id_field="id")
    assert task.source == "user" and task.choices == ["neg", "neutral", "pos"]  # sorted distinct labels
    assert task.sizes() == {"train": 32, "val": 4, "test": 4}
    assert task.truncate_field == "text"
    ids = [ex.id for s in SPLITS for ex in task.split(s)]
    assert len(set(ids)) == 40 and all(i.startswith("reviews/") for i in ids)
    assert "reviews/test/" in task.split("test")[0].id and task.split("test")[0].id.split("/")[2].startswith("r")
    prompt = task.render(task.split("train")[0].fields)
    assert (
        prompt.startswith("example text number")
        and "Options: neg, neutral, pos." in prompt
        and prompt.endswith("Answer:")
    )
    # found by name, listed, and stable for a second lookup
    assert get_task("reviews").sizes() == task.sizes()
    assert [t.name for t in list_user_tasks()] == ["reviews"] and "reviews" in [t.name for t in list_tasks()]
    assert parse_task_list("cb,reviews") == ["cb", "reviews"]
    assert _stored(home) == ["reviews"]  # no temp folders left behind
    assert sorted(p.name for p in (home / "tasks" / "reviews").iterdir()) == ["data.json", "task.json"]
    spec = user_task_spec("reviews")
    assert spec["label_counts"] == {"neg": 14, "neutral": 13, "pos": 13} and spec["source"] == "reviews.jsonl"


def test_other_process_sees_the_task(tmp_path: Path, home: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(_jsonl(_rows(30)))
    task = import_dataset(path, "shared-task", ["text"], "label")
    code = (
        "from shared.ml.tasks.registry import get_task; import json; t = get_task('shared-task'); "
        "print(json.dumps([t.sizes(), [e.id for e in t.split('test')]]))"
    )
    env = {**os.environ, "CHORUS_HOME": str(home)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    sizes, test_ids = json.loads(out.stdout.strip().splitlines()[-1])
    assert sizes == task.sizes() and test_ids == [e.id for e in task.split("test")]


def test_csv_with_several_fields_and_quoted_newlines(tmp_path: Path) -> None:
    body = "title,review text,stars\n" + "".join(
        f'"Title {i}","Body {i}, with a comma\nand a second line",{i % 2}\n' for i in range(20)
    )
    path = tmp_path / "multi.csv"
    path.write_text(body, encoding="utf-8")
    task = import_dataset(path, "multi", ["title", "review text"], "stars", label_names=["bad", "good"])
    assert task.choices == ["bad", "good"] and task.sizes() == {"train": 16, "val": 2, "test": 2}
    ex = task.split("train")[0]
    assert set(ex.fields) == {"title", "review_text"}
    prompt = task.render(ex.fields)
    assert prompt.startswith("title: Title") and "review text: Body" in prompt and prompt.endswith("Answer:")
    spec = user_task_spec("multi")
    assert spec["field_keys"] == ["title", "review_text"] and spec["text_fields"] == ["title", "review text"]


def test_integer_labels_index_the_given_names(tmp_path: Path) -> None:
    rows = [{"sentence": f"s {i}", "y": i % 2} for i in range(20)]
    task = register_dataset(
        validate_dataset_bytes(_jsonl(rows), "jsonl", ["sentence"], "y", label_names=["negative", "positive"]),
        "idx-labels",
    )
    assert task.choices == ["negative", "positive"]
    by_text = {ex.fields["sentence"]: ex.label for s in SPLITS for ex in task.split(s)}
    assert by_text["s 3"] == 1 and by_text["s 4"] == 0


def test_tsv_detected_and_custom_template(tmp_path: Path) -> None:
    path = tmp_path / "q.tsv"
    path.write_text("q\tkind\n" + "".join(f"question {i}?\t{'who' if i % 2 else 'what'}\n" for i in range(10)))
    task = import_dataset(path, "kinds", "q", "kind", template="Q: {{ q }} Type? Answer:")
    assert task.render({"q": "Is it?"}) == "Q: Is it? Type? Answer:" and task.choices == ["what", "who"]


def test_every_bad_row_is_reported_and_nothing_registered(tmp_path: Path, home: Path) -> None:
    good = [{"id": f"g{i}", "text": f"fine {i}", "label": "a" if i % 2 else "b"} for i in range(6)]
    lines = [json.dumps(r) for r in good]  # lines 1-6
    lines += [
        json.dumps({"id": "m1", "label": "a"}),  # 7 missing text field
        json.dumps({"id": "m2", "text": "   ", "label": "a"}),  # 8 empty text
        json.dumps({"id": "m3", "text": "no label"}),  # 9 missing label
        json.dumps({"id": "m4", "text": "odd", "label": "zzz"}),  # 10 unknown label
        json.dumps({"id": "g1", "text": "dup", "label": "b"}),  # 11 duplicate id
        '{"id": "m6", "text": "broken", ',  # 12 malformed JSON
        "",  # 13 blank: ignored
        json.dumps(["not", "an", "object"]),  # 14 not an object
        json.dumps({"id": "m8", "text": "lonely", "label": "c"}),  # 15 label c has one example
        json.dumps({"id": "m9", "text": {"nested": 1}, "label": "a"}),  # 16 text not a string
    ]
    data = ("\n".join(lines) + "\n").encode() + b'{"id": "m10", "text": "caf\xe9", "label": "a"}\n'  # 17 Latin-1 byte
    path = tmp_path / "bad.jsonl"
    path.write_bytes(data)
    with pytest.raises(DatasetValidationError) as info:
        import_dataset(path, "bad-data", ["text"], "label", label_names=["a", "b", "c"], id_field="id")
    found = _lines(info.value)
    assert found == {
        (7, "text"),
        (8, "text"),
        (9, "label"),
        (10, "label"),
        (11, "id"),
        (12, None),
        (14, None),
        (15, "label"),
        (16, "text"),
        (17, None),
    }
    messages = {e.line: e.message for e in info.value.errors}
    assert messages[7] == "missing field" and messages[8] == "empty text" and messages[9] == "missing label"
    assert "unknown label 'zzz'" in messages[10] and "duplicate id 'g1' (first on line 2)" in messages[11]
    assert "malformed JSON" in messages[12] and "JSON object" in messages[14]
    assert "only 1 example" in messages[15] and "UTF-8" in messages[17]
    text = str(info.value)
    assert "10 problem(s)" in text and "line 7: text: missing field" in text and "nothing imported" in text
    assert _stored(home) == []
    with pytest.raises(ValueError, match="unknown task"):
        get_task("bad-data")


def test_csv_row_problems(tmp_path: Path) -> None:
    body = "text,label\nfine one,x\nfine two,y\n,x\nshort row\nthree,x,extra\nfour,\nfive,y\n"
    with pytest.raises(DatasetValidationError) as info:
        validate_dataset_bytes(body.encode(), "csv", ["text"], "label")
    assert _lines(info.value) == {(4, "text"), (5, None), (6, None), (7, "label")}
    with pytest.raises(DatasetValidationError) as info:
        validate_dataset_bytes(b"body,label\nx,y\n", "csv", ["text"], "label")
    assert [(e.line, "no column(s) 'text'" in e.message) for e in info.value.errors] == [(1, True)]


def test_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("CHORUS_MAX_UPLOAD_BYTES", "100")
    get_settings.cache_clear()
    data = _jsonl(_rows(20))
    path = tmp_path / "big.jsonl"
    path.write_bytes(data)
    for call in (
        lambda: import_dataset(path, "big", ["text"], "label"),
        lambda: validate_dataset_bytes(data, "jsonl", ["text"], "label"),
        lambda: validate_dataset_bytes(io.BytesIO(data), "jsonl", ["text"], "label"),
    ):
        with pytest.raises(DatasetValidationError, match="upload limit"):
            call()
    assert _stored(home) == []


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Bad", "invalid task name"),
        ("x", "invalid task name"),
        ("a/b", "invalid task name"),
        ("cb", "reserved"),
        ("core", "reserved"),
        ("a" * 65, "invalid task name"),
    ],
)
def test_invalid_names(name: str, reason: str) -> None:
    parsed = validate_dataset_bytes(_jsonl(_rows(10)), "jsonl", ["text"], "label")
    with pytest.raises(DatasetValidationError, match=reason):
        register_dataset(parsed, name)
    with pytest.raises(DatasetValidationError, match=reason):  # also reported with the row checks
        validate_dataset_bytes(_jsonl(_rows(10)), "jsonl", ["text"], "label", name=name)


def test_existing_name_and_overwrite(home: Path) -> None:
    register_dataset(validate_dataset_bytes(_jsonl(_rows(10)), "jsonl", ["text"], "label"), "again")
    with pytest.raises(TaskExistsError, match="already exists"):
        register_dataset(validate_dataset_bytes(_jsonl(_rows(20)), "jsonl", ["text"], "label"), "again")
    assert sum(get_task("again").sizes().values()) == 10
    task = register_dataset(
        validate_dataset_bytes(_jsonl(_rows(20)), "jsonl", ["text"], "label"), "again", overwrite=True
    )
    assert sum(task.sizes().values()) == 20 and sum(get_task("again").sizes().values()) == 20
    assert _stored(home) == ["again"]


def test_failed_write_leaves_nothing(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    from shared.ml.tasks import user_import

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(user_import, "_publish", boom)
    with pytest.raises(OSError, match="disk full"):
        register_dataset(validate_dataset_bytes(_jsonl(_rows(10)), "jsonl", ["text"], "label"), "half")
    assert _stored(home) == []


def test_template_problems() -> None:
    args = (_jsonl(_rows(10)), "jsonl", ["text"], "label")
    with pytest.raises(DatasetValidationError, match="unknown field.*label; available: text"):
        validate_dataset_bytes(*args, template="{{ text }} {{ label }} Answer:")
    with pytest.raises(DatasetValidationError, match="invalid Jinja template"):
        validate_dataset_bytes(*args, template="{{ text Answer:")
    with pytest.raises(DatasetValidationError, match="none of the text fields"):
        validate_dataset_bytes(*args, template="Answer:")


def test_label_set_problems() -> None:
    one_label = [{"text": f"t{i}", "label": "same"} for i in range(5)]
    with pytest.raises(DatasetValidationError, match="at least 2 different labels"):
        validate_dataset_bytes(_jsonl(one_label), "jsonl", ["text"], "label")
    with pytest.raises(DatasetValidationError, match="label names repeat"):
        validate_dataset_bytes(_jsonl(_rows(6)), "jsonl", ["text"], "label", label_names=["a", "a"])
    with pytest.raises(DatasetValidationError, match="unknown format"):
        validate_dataset_bytes(b"", "xml", ["text"], "label")
    with pytest.raises(DatasetValidationError, match="no data rows"):
        validate_dataset_bytes(b"\n\n", "jsonl", ["text"], "label")
    with pytest.raises(DatasetValidationError, match="no data rows"):
        validate_dataset_bytes(b"text,label\n", "csv", ["text"], "label")


def test_small_dataset_falls_back_gracefully() -> None:
    rows = [{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(4)]
    task = register_dataset(validate_dataset_bytes(_jsonl(rows), "jsonl", ["text"], "label"), "tiny-set")
    sizes = task.sizes()
    assert sum(sizes.values()) == 4 and all(sizes.values())


def test_delete_and_list(home: Path) -> None:
    for name in ("one", "two"):
        register_dataset(validate_dataset_bytes(_jsonl(_rows(10)), "jsonl", ["text"], "label"), name)
    assert [t.name for t in list_user_tasks()] == ["one", "two"]
    delete_user_task("one")
    assert [t.name for t in list_user_tasks()] == ["two"] and _stored(home) == ["two"]
    with pytest.raises(ValueError, match="unknown task 'one'"):
        get_task("one")
    with pytest.raises(ValueError, match="no user task"):
        delete_user_task("one")
    with pytest.raises(ValueError, match="built-in"):
        delete_user_task("cb")


def test_error_objects() -> None:
    err = DatasetValidationError([RowError(3, "text", "empty text"), RowError(None, "name", "bad name")])
    assert [e.line for e in err.errors] == [None, 3]
    assert str(err).splitlines()[1:] == ["  file: name: bad name", "  line 3: text: empty text"]
    again = pickle.loads(pickle.dumps(err))
    assert again.errors == err.errors and isinstance(again, DatasetValidationError)
    assert err.to_dict()[1] == {"line": 3, "field": "text", "message": "empty text"}
