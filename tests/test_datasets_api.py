"""POST/GET/DELETE /v1/datasets the Hugging Face datasets way, against the real app on a temporary SQLite home:
text/label defaults, one error per missing column, label names as a JSON or comma list, integer-label
warnings, the user's splits (a split column, or file + validation_file + test_file), JSON arrays and Parquet,
and delete by name or id (owner-scoped, refused while a queued job uses the task)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.bad_input_apps import dataset_api


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The API on a fresh SQLite home, with keys for two owners."""
    yield from dataset_api(tmp_path_factory)


def _headers(env: dict[str, Any], owner: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {env['keys'][owner]}"}


def _upload(
    env: dict[str, Any], name: str, files: dict[str, tuple[str, bytes]], owner: str = "alice", **form: str
) -> Any:
    return env["client"].post("/v1/datasets", headers=_headers(env, owner), data={"name": name, **form}, files=files)


def _csv(rows: list[dict[str, Any]]) -> bytes:
    cols = list(rows[0])
    return (",".join(cols) + "\n" + "".join(",".join(str(r[c]) for c in cols) + "\n" for r in rows)).encode()


def _rows(n: int, integer: bool = False) -> list[dict[str, Any]]:
    return [{"text": f"review number {i}", "label": i % 2 if integer else ("neg", "pos")[i % 2]} for i in range(n)]


def test_plain_csv_with_defaults_warns_about_integer_labels(env: dict[str, Any]) -> None:
    response = _upload(env, "plain", {"file": ("reviews.csv", _csv(_rows(20, integer=True)))})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["text_fields"] == ["text"] and body["label_field"] == "label" and body["label_names"] == ["0", "1"]
    assert body["split_source"] == "carved" and body["sizes"] == {"train": 16, "val": 2, "test": 2}
    assert len(body["warnings"]) == 1 and '"0"/"1"' in body["warnings"][0]
    got = env["client"].get("/v1/datasets/plain", headers=_headers(env, "alice"))  # by name
    assert got.status_code == 200 and got.json()["id"] == body["id"] and got.json()["warnings"] == body["warnings"]


def test_label_names_json_and_comma_lists_agree(env: dict[str, Any]) -> None:
    data = _csv(_rows(20, integer=True))
    made = [
        _upload(env, f"names-{i}", {"file": ("d.csv", data)}, label_names=spec)
        for i, spec in enumerate(['["negative","positive"]', "negative,positive"])
    ]
    assert [m.status_code for m in made] == [201, 201], [m.text for m in made]
    assert made[0].json()["label_names"] == made[1].json()["label_names"] == ["negative", "positive"]
    assert made[0].json()["warnings"] == []
    bad = _upload(env, "names-bad", {"file": ("d.csv", data)}, label_names='["negative",')
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "label_names"


def test_a_missing_column_is_one_error(env: dict[str, Any]) -> None:
    rows = [{"review": f"r {i}", "stars": i % 2} for i in range(30)]
    response = _upload(env, "missing", {"file": ("d.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in rows))})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "1 problem(s)" in message and "'text' (text field), 'label' (label field)" in message
    assert "columns present: review, stars" in message


def test_split_column_and_formats(env: dict[str, Any]) -> None:
    rows = [{**r, "split": "train" if i < 20 else ("val" if i < 25 else "test")} for i, r in enumerate(_rows(30))]
    as_json = _upload(env, "array", {"file": ("d.json", json.dumps(rows, indent=1).encode())})
    assert as_json.status_code == 201, as_json.text
    assert as_json.json()["split_source"] == "column" and as_json.json()["sizes"] == {"train": 20, "val": 5, "test": 5}
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    as_parquet = _upload(env, "parquet", {"file": ("d.parquet", buffer.getvalue())})
    assert as_parquet.status_code == 201, as_parquet.text
    assert as_parquet.json()["format"] == "parquet" and as_parquet.json()["sizes"] == as_json.json()["sizes"]


def test_one_file_per_split(env: dict[str, Any]) -> None:
    files = {
        "file": ("train.csv", _csv(_rows(20))),
        "validation_file": ("val.csv", _csv(_rows(6))),
        "test_file": ("test.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in _rows(8))),
    }
    response = _upload(env, "three", files)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["split_source"] == "files" and body["sizes"] == {"train": 20, "val": 6, "test": 8}
    assert len(body["artifact_ids"]) == 3 and body["artifact_id"] == body["artifact_ids"][0]
    bad = _upload(env, "three-bad", {**files, "validation_file": ("val.csv", _csv(_rows(6)) + b",neg\n")})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "validation_file", bad.text
    assert "val.csv (validation) line 8: text: empty text" in bad.json()["error"]["message"]
    gone = env["client"].get("/v1/datasets/three-bad", headers=_headers(env, "alice"))
    assert gone.status_code == 404


def test_delete_by_name_is_owner_scoped_and_waits_for_jobs(env: dict[str, Any]) -> None:
    from shared.db.models import Artifact, Job, new_id
    from shared.db.session import session_scope
    from shared.ml.tasks.user_import import user_task_exists

    client = env["client"]
    made = _upload(env, "doomed", {"file": ("train.csv", _csv(_rows(20))), "test_file": ("t.csv", _csv(_rows(4)))})
    assert made.status_code == 201, made.text
    body = made.json()
    # another owner: 404 by name and by id, exactly like a dataset that does not exist
    for ref in ("doomed", body["id"]):
        other = client.delete(f"/v1/datasets/{ref}", headers=_headers(env, "bob"))
        assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    with session_scope() as session:
        job = Job(
            id=new_id("job"),
            type="training",
            status="running",
            owner="alice",
            params={"groups": [["cb", body["task_name"]]]},
        )
        session.add(job)
    busy = client.delete("/v1/datasets/doomed", headers=_headers(env, "alice"))
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "dataset_in_use"
    assert job.id in busy.json()["error"]["message"] and user_task_exists(body["task_name"])
    with session_scope() as session:
        session.get(Job, job.id).status = "succeeded"  # type: ignore[union-attr]
    deleted = client.delete("/v1/datasets/doomed", headers=_headers(env, "alice"))
    assert deleted.status_code == 200 and deleted.json() == {"id": body["id"], "object": "dataset", "deleted": True}
    assert not user_task_exists(body["task_name"])
    with session_scope() as session:
        assert all(session.get(Artifact, a) is None for a in body["artifact_ids"])
    assert client.get(f"/v1/datasets/{body['id']}", headers=_headers(env, "alice")).status_code == 404
