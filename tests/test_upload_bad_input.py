"""A bad-input corpus for POST /v1/datasets, run against the real app (TestClient) on a temporary SQLite
home: every case answers 4xx in the one error shape, names what is wrong, shows no server path and stores
nothing (no dataset row, no artifact, no object, no task folder); the app still answers afterwards.
Also: dataset names are per owner, and a name with a trailing newline is refused."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from tests.bad_input_apps import dataset_api

PAYLOADS = {
    "mro": "{{ ''.__class__.__mro__[1].__subclasses__() }} Answer:",
    "globals": "{{ cycler.__init__.__globals__.os.popen('id').read() }} Answer:",
    "range_list": "{{ range(10**8)|list }} {{ text }} Answer:",
    "for_loop": "{{ text }} {% for i in range(100000000) %}x{% endfor %} Answer:",
    "attribute": "{{ text.__class__ }} Answer:",
    "item": "{{ text['x'] }} Answer:",
    "unknown_field": "{{ text }} {{ secret }} Answer:",
    "too_long": "{{ text }} " + "x" * 5000 + " Answer:",
}


def _rows(n: int = 20) -> list[dict[str, Any]]:
    return [
        {"text": f"review number {i} was {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"}
        for i in range(n)
    ]


def _jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _with_line(n: int, raw: str) -> bytes:
    """Twenty good rows with line `n` replaced by `raw`."""
    lines = [json.dumps(r) for r in _rows()]
    lines[n - 1] = raw
    return ("\n".join(lines) + "\n").encode()


DEEP = '{"text": "x", "label": "pos", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
BIG_INT = "1" + "0" * 4999

# name -> (form fields over the defaults, file bytes, file name, status, param, words the message must contain)
CASES: dict[str, tuple[dict[str, str], bytes, str, int, str | None, tuple[str, ...]]] = {
    "huge_int_label": (
        {},
        _with_line(3, f'{{"text": "a", "label": {BIG_INT}}}'),
        "d.jsonl",
        422,
        "file",
        ("line 3", "5,000 digits"),
    ),
    "huge_int_text": (
        {},
        _with_line(4, f'{{"text": {BIG_INT}, "label": "pos"}}'),
        "d.jsonl",
        422,
        "file",
        ("line 4", "digits"),
    ),
    "deep_nesting": ({}, _with_line(2, DEEP), "d.jsonl", 422, "file", ("line 2", "nested too deeply")),
    "huge_csv_label": (
        {"template": "{{ text }} Answer:"},
        b"text,label\n" + b"".join(f"t{i},{'ab'[i % 2]}\n".encode() for i in range(10)) + f"odd,{BIG_INT}\n".encode(),
        "d.csv",
        422,
        "file",
        ("line 12", "only 1 example"),
    ),
    "label_names_deep": (
        {"label_names": "[" * 100_000},
        _jsonl(_rows()),
        "d.jsonl",
        422,
        "label_names",
        ("label_names", "nested too deeply"),
    ),
    "label_names_big_int": (
        {"label_names": f"[{BIG_INT}, 1]"},
        _jsonl(_rows()),
        "d.jsonl",
        422,
        "label_names",
        ("label_names",),
    ),
    "json_array": ({}, json.dumps(_rows()).encode(), "d.jsonl", 422, "file", ("line 1", "JSON object")),
    "not_utf8": (
        {},
        _jsonl(_rows()) + b'{"text": "caf\xe9", "label": "pos"}\n',
        "d.jsonl",
        422,
        "file",
        ("line 21", "UTF-8"),
    ),
    "nul_bytes": ({}, b"\x00" * 64, "d.jsonl", 422, "file", ("line 1",)),
    "empty_file": ({}, b"", "d.jsonl", 422, "file", ("no data rows",)),
    "unknown_format": ({}, _jsonl(_rows()), "d.bin", 422, "format", ("format",)),
    "bad_format_arg": ({"format": "xml"}, _jsonl(_rows()), "d.jsonl", 422, "file", ("unknown format",)),
    "name_newline": ({"name": "reviews\n"}, _jsonl(_rows()), "d.jsonl", 422, "name", ("invalid task name",)),
    "name_traversal": ({"name": "../etc"}, _jsonl(_rows()), "d.jsonl", 422, "name", ("invalid task name",)),
    "name_builtin": ({"name": "cb"}, _jsonl(_rows()), "d.jsonl", 422, "name", ("reserved",)),
    "label_is_text": ({"label_field": "text"}, _jsonl(_rows()), "d.jsonl", 422, "label_field", ("label field",)),
    "template_syntax": (
        {"template": "{{ text "},
        _jsonl(_rows()),
        "d.jsonl",
        422,
        "template",
        ("template line 1", "invalid Jinja template"),
    ),
    "template_output_cap": (
        {"template": "{{ text }}" * 400 + " Answer:"},
        _jsonl([{"text": "w" * 200, "label": r["label"]} for r in _rows()]),
        "d.jsonl",
        422,
        "template",
        ("rendered prompt is over",),
    ),
    "template_bad_filter_arg": (
        {"template": "{{ text|truncate(1) }} Answer:"},
        _jsonl(_rows()),
        "d.jsonl",
        422,
        "template",
        ("line 1", "cannot be rendered"),
    ),
    "template_replace_blowup": (
        {"template": "{{ text|replace('', '" + "y" * 3000 + "') }} Answer:"},
        _jsonl(_rows()),
        "d.jsonl",
        422,
        "template",
        ("replace would add",),
    ),
    **{
        f"template_{key}": ({"template": template}, _jsonl(_rows()), "d.jsonl", 422, "template", ("template",))
        for key, template in PAYLOADS.items()
    },
}
POSITIONED = {f"template_{key}" for key in PAYLOADS if key != "too_long"}  # these name "template line 1"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The API on a fresh SQLite home, with keys for two owners."""
    yield from dataset_api(tmp_path_factory)


def _upload(env: dict[str, Any], owner: str, data: bytes, filename: str = "d.jsonl", **form: str) -> Any:
    fields = {"name": "reviews", "text_fields": "text", "label_field": "label", **form}
    headers = {"Authorization": f"Bearer {env['keys'][owner]}"}
    return env["client"].post("/v1/datasets", headers=headers, data=fields, files={"file": (filename, data)})


def _stored(home: Path) -> tuple[int, int, list[str], list[str]]:
    """(dataset rows, artifact rows, stored objects, entries of the task folder, hidden ones included)."""
    from shared.db.models import Artifact, Dataset
    from shared.db.session import session_scope
    from shared.storage import ArtifactStore

    with session_scope() as session:
        datasets = session.scalar(select(func.count()).select_from(Dataset)) or 0
        artifacts = session.scalar(select(func.count()).select_from(Artifact)) or 0
    tasks = home / "tasks"
    return (
        datasets,
        artifacts,
        [p.name for p in ArtifactStore().iter_objects()],
        sorted(p.name for p in tasks.iterdir()) if tasks.is_dir() else [],
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_upload_is_a_4xx_that_stores_nothing(env: dict[str, Any], case: str) -> None:
    form, data, filename, status, param, words = CASES[case]
    before = _stored(env["home"])
    response = _upload(env, "alice", data, filename, **form)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "param"}, body
    assert body["error"]["param"] == param, body
    message = body["error"]["message"]
    for word in words:
        assert word in message, (word, message)
    if case in POSITIONED:
        assert "template line 1" in message, message
    assert str(env["home"]) not in message and "/tasks/" not in message, message
    assert "Traceback" not in message
    assert _stored(env["home"]) == before


def test_every_template_payload_is_refused_before_anything_runs(env: dict[str, Any], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    template = "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }} {{ text }} Answer:"
    response = _upload(env, "alice", _jsonl(_rows()), template=template)
    assert response.status_code == 422 and response.json()["error"]["param"] == "template"
    assert re.search(r"template line 1 .*function calls are not allowed", response.json()["error"]["message"])
    assert not marker.exists()


def test_names_are_per_owner_and_the_app_still_answers(env: dict[str, Any]) -> None:
    """Runs after the corpus (file order): the app answers, and a name taken by another owner is free."""
    client, keys = env["client"], env["keys"]
    assert client.get("/v1/datasets", headers={"Authorization": f"Bearer {keys['alice']}"}).json()["data"] == []
    mine = _upload(env, "alice", _jsonl(_rows()), name="shared-name", template="Review: {{ text|trim }} Answer:")
    assert mine.status_code == 201, mine.text
    theirs = _upload(env, "bob", _jsonl(_rows()), name="shared-name")
    assert theirs.status_code == 201, theirs.text  # exactly what a free name answers: nothing to probe
    a, b = mine.json(), theirs.json()
    assert a["name"] == b["name"] == "shared-name"
    assert a["task_name"] != b["task_name"]
    assert all(re.fullmatch(r"shared-name-[0-9a-f]{8}", t) for t in (a["task_name"], b["task_name"]))
    again = _upload(env, "alice", _jsonl(_rows()), name="shared-name")
    assert again.status_code == 409 and again.json()["error"]["param"] == "name"
    from shared.ml.tasks.registry import get_task

    assert get_task(a["task_name"]).render({"text": "  fine  "}) == "Review: fine Answer:"
    # A 64-character name still gives a valid task name.
    long_name = "l" * 64
    made = _upload(env, "alice", _jsonl(_rows()), name=long_name)
    assert made.status_code == 201 and len(made.json()["task_name"]) == 64
    listing = client.get("/v1/datasets", headers={"Authorization": f"Bearer {keys['bob']}"}).json()["data"]
    assert [d["task_name"] for d in listing] == [b["task_name"]]
