"""Prompt templates are untrusted: code-execution and resource payloads are refused by the validator (with
the template position), at library import, at `chorus import` and when a tampered stored task.json is
loaded; rendering happens only in the sandbox, with capped output. Built-in templates pass the validator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from typer.testing import CliRunner

from shared.config import get_settings
from shared.ml.tasks import templates
from shared.ml.tasks.base import Task
from shared.ml.tasks.templates import (
    MAX_RENDER_CHARS,
    MAX_TEMPLATE_CHARS,
    TemplateError,
    render_template,
    template_variables,
    validate_template,
)

# payload -> words its refusal names
PAYLOADS = {
    "{{ ''.__class__.__mro__[1].__subclasses__() }}": "function calls are not allowed",
    "{{ text.__class__.__mro__[1].__subclasses__() }}": "function calls are not allowed",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}": "function calls are not allowed",
    "{{ range(10**8)|list }}": "not allowed",
    "{% for i in range(100000000) %}x{% endfor %}": "loops",
    "{{ text.upper }}": "(found '.upper')",
    "{{ text['a'] }}": "item access",
    "{{ text[0:2] }}": "item access",
    "{{ text|attr('__class__') }}": "filter 'attr' is not allowed",
    "{{ text|join(', ') }}": "filter 'join' is not allowed",
    "{{ secret }}": "unknown field(s) secret; available: text",
    "{% set x = text %}{{ x }}": "{% set %} is not allowed",
    "{% macro m() %}{% endmacro %}{{ text }}": "macros",
    "{% include 'task.json' %}": "{% include %}",
    "{% import 'x' as y %}": "{% import %}",
    "{% extends 'x' %}": "{% extends %}",
    "{{ text ~ text }}": "~ operator",
    "{{ 10 ** 10 ** 10 }}": "arithmetic",
    "{{ text is callable }}": "test 'callable'",
    "{{ text" + "|lower" * 40 + " }}": "nested more than",
}
EVIL = {**PAYLOADS, "{{ text }}" + "x" * MAX_TEMPLATE_CHARS: "4,096-character limit"}


def _rows(n: int = 20) -> list[dict]:
    return [
        {"text": f"review {i} is {'good' if i % 2 else 'bad'}", "label": "pos" if i % 2 else "neg"} for i in range(n)
    ]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("CHORUS_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield tmp_path / "home"
    get_settings.cache_clear()


def _task_folder(home: Path) -> list[str]:
    root = home / "tasks"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# -- the validator and the sandbox --------------------------------------------------------------------
@pytest.mark.parametrize("payload", list(EVIL))
def test_validator_refuses_with_the_position(payload: str) -> None:
    with pytest.raises(TemplateError) as info:
        validate_template(payload, ["text"])
    assert EVIL[payload] in str(info.value)
    if len(payload) <= MAX_TEMPLATE_CHARS:
        assert info.value.lineno == 1 and str(info.value).startswith("template line 1 (")


def test_position_is_the_offending_line() -> None:
    with pytest.raises(TemplateError) as info:
        validate_template("{{ text }}\nsecond line\n{{ text.__class__ }} Answer:", ["text"])
    assert info.value.lineno == 3 and "'{{ text.__class__ }} Answer:'" in str(info.value)


def test_plain_templates_pass_and_render() -> None:
    fields = ["text", "question"]
    ok = (
        "{% if question == 'cause' %}Why?{% elif question in ['a', 'b'] %}AB{% else %}{{ question|upper }}{% endif %} "
        "{{ text|trim|truncate(12) }} {{ text|replace('bad', 'poor')|default('') }} {{ text|length }} Answer:"
    )
    validate_template(ok, fields)
    assert template_variables(ok) == ("question", "text")
    out = render_template(ok, {"text": " a bad example of text ", "question": "effect"})
    assert out == "EFFECT a bad...  a poor example of text  23 Answer:"


def test_sandbox_has_no_globals_and_refuses_unsafe_attributes() -> None:
    assert isinstance(templates.ENV, ImmutableSandboxedEnvironment)
    assert templates.ENV.globals == {} and set(templates.ENV.filters) == set(templates.ALLOWED_FILTERS)
    with pytest.raises(Exception, match="undefined"):  # even unvalidated, range/cycler do not exist
        templates.ENV.from_string("{{ range(3) }}").render()
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        templates.ENV.from_string("{{ x.__class__.__mro__ }}").render(x="")


def test_render_output_is_capped() -> None:
    field = "w" * 200
    with pytest.raises(TemplateError, match="rendered prompt is over"):
        render_template("{{ text }}" * 400, {"text": field})  # 80,000 characters from 200
    with pytest.raises(TemplateError, match="replace would add"):
        render_template("{{ text|replace('', '" + "y" * 1000 + "') }}", {"text": field})
    long_field = "z" * (3 * MAX_RENDER_CHARS)  # a long field itself is fine: the cap is on what the template adds
    assert render_template("Doc: {{ text }} Answer:", {"text": long_field}) == f"Doc: {long_field} Answer:"


def test_render_refuses_an_unvalidated_template() -> None:
    with pytest.raises(TemplateError, match="function calls"):
        render_template("{{ cycler.__init__.__globals__.os.popen('id').read() }}", {})


def test_task_refuses_a_bad_template() -> None:
    for payload in PAYLOADS:
        with pytest.raises(ValueError, match="refused template"):
            Task(name="t", template=payload, choices=["a", "b"], loader=dict, field_names=["text"])


def test_ensemble_runner_template_fields_uses_the_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.ml.serving import ensemble_runner

    calls = []
    real_parse = templates.ENV.parse
    monkeypatch.setattr(templates.ENV, "parse", lambda source: calls.append(source) or real_parse(source))
    task = SimpleNamespace(template="{{ premise }} {% if question == 'cause' %}Why?{% endif %} {{ choice1 }} Answer:")
    assert ensemble_runner.template_fields(task) == ("choice1", "premise", "question")
    assert calls and all(c == task.template for c in calls)
    for payload in PAYLOADS:
        if "secret" in payload:
            continue  # no field list here: any plain name is allowed
        with pytest.raises(TemplateError):
            ensemble_runner.template_fields(SimpleNamespace(template=payload))


# -- built-in tasks ---------------------------------------------------------------------------------------
def test_builtin_templates_pass_the_validator() -> None:
    from shared.ml.tasks.builtin import BUILTIN_TASKS, make_builtin_tasks

    tasks = make_builtin_tasks()  # Task() validates each template's structure
    assert [t.name for t in tasks] == list(BUILTIN_TASKS)
    have_data = (get_settings().data_dir / "cb" / "train.jsonl").is_file()
    for task in tasks:
        validate_template(task.template)
        if have_data:  # and every name it uses is a field of the task's examples
            validate_template(task.template, list(task.split("train")[0].fields))


# -- refused at import: library, CLI -------------------------------------------------------------------
@pytest.mark.parametrize("payload", list(EVIL))
def test_import_dataset_refuses(payload: str, tmp_path: Path, home: Path) -> None:
    from shared.ml.tasks.user_import import DatasetValidationError, import_dataset

    path = _write(tmp_path / "d.jsonl", _rows())
    with pytest.raises(DatasetValidationError) as info:
        import_dataset(path, "evil", ["text"], "label", template=payload)
    assert [e.field for e in info.value.errors] == ["template"]
    assert EVIL[payload] in str(info.value)
    assert _task_folder(home) == []


def test_cli_import_refuses_with_a_clean_error(tmp_path: Path, home: Path) -> None:
    from services.cli.main import app

    path = _write(tmp_path / "d.jsonl", _rows())
    marker = tmp_path / "ran"
    runner = CliRunner()
    for template in [
        "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}",
        "{{ text[/] }}",
        "{% for i in range(100000000) %}x{% endfor %}",
    ]:
        result = runner.invoke(
            app,
            [
                "import",
                str(path),
                "--name",
                "evil",
                "--text-field",
                "text",
                "--label-field",
                "label",
                "--template",
                template,
            ],
        )
        assert result.exit_code == 2, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert "template" in result.output and "Traceback" not in result.output
    assert (
        "function calls are not allowed"
        in runner.invoke(
            app,
            [
                "import",
                str(path),
                "--name",
                "evil",
                "--text-field",
                "text",
                "--label-field",
                "label",
                "--template",
                "{{ text.__class__.__mro__[1].__subclasses__() }}",
            ],
        ).output
    )
    assert not marker.exists() and _task_folder(home) == []


def test_cli_import_bad_rows_name_the_line(tmp_path: Path, home: Path) -> None:
    from services.cli.main import app

    lines = [json.dumps(r) for r in _rows()]
    lines[2] = '{"text": "a", "label": ' + "9" * 5000 + "}"
    lines[5] = '{"text": "a", "label": "pos", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(
        app, ["import", str(path), "--name", "bad", "--text-field", "text", "--label-field", "label"]
    )
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "line 3" in result.output and "5,000 digits" in result.output
    assert "line 6" in result.output and "nested too deeply" in result.output
    assert _task_folder(home) == []


# -- refused at load: a tampered task.json ------------------------------------------------------------------
@pytest.mark.parametrize("payload", list(EVIL))
def test_tampered_stored_template_never_loads(payload: str, tmp_path: Path, home: Path) -> None:
    from shared.ml.tasks.registry import get_task, list_tasks, parse_task_list
    from shared.ml.tasks.user_import import UserTaskError, import_dataset, list_user_tasks

    import_dataset(_write(tmp_path / "d.jsonl", _rows()), "victim", ["text"], "label")
    import_dataset(_write(tmp_path / "e.jsonl", _rows()), "other", ["text"], "label")
    assert get_task("victim").render({"text": "fine"}).startswith("fine")  # cached before the tampering
    spec_path = home / "tasks" / "victim" / "task.json"
    spec = json.loads(spec_path.read_text())
    spec["template"] = payload
    spec_path.write_text(json.dumps(spec))
    for load in (lambda: get_task("victim"), lambda: parse_task_list("cb,victim")):
        with pytest.raises(UserTaskError) as info:
            load()
        message = str(info.value)
        assert "user task 'victim' cannot be loaded" in message and EVIL[payload] in message
        assert str(home) not in message
    assert [t.name for t in list_user_tasks()] == ["other"]  # skipped, the others still listed
    assert "victim" not in [t.name for t in list_tasks()]


def test_tampered_template_would_not_run_code(tmp_path: Path, home: Path) -> None:
    from shared.ml.tasks.registry import get_task
    from shared.ml.tasks.user_import import UserTaskError, import_dataset

    import_dataset(_write(tmp_path / "d.jsonl", _rows()), "victim", ["text"], "label")
    marker = tmp_path / "ran"
    spec_path = home / "tasks" / "victim" / "task.json"
    spec = json.loads(spec_path.read_text())
    spec["template"] = "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(UserTaskError, match="template line 1"):
        get_task("victim").render({"text": "x"})
    spec["template"], spec["name"] = "{{ text }} Answer:", "cb"  # a spec naming another task
    spec_path.write_text(json.dumps(spec))
    with pytest.raises(UserTaskError, match="names task 'cb'"):
        get_task("victim")
    spec_path.write_text("{not json")
    with pytest.raises(UserTaskError, match="cannot be loaded"):
        get_task("victim")
    assert not marker.exists()


def test_names_with_a_trailing_newline_are_refused(tmp_path: Path, home: Path) -> None:
    from shared.ml.tasks.registry import get_task
    from shared.ml.tasks.user_import import DatasetValidationError, import_dataset

    with pytest.raises(DatasetValidationError, match="invalid task name"):
        import_dataset(_write(tmp_path / "d.jsonl", _rows()), "victim\n", ["text"], "label")
    assert _task_folder(home) == []
    with pytest.raises(ValueError, match="unknown task"):
        get_task("cb\n")


def test_unknown_task_message_lists_no_imported_names(tmp_path: Path) -> None:
    from shared.ml.tasks.registry import get_task, parse_task_list
    from shared.ml.tasks.user_import import import_dataset

    import_dataset(_write(tmp_path / "d.jsonl", _rows()), "someone-elses", ["text"], "label")
    for call in (lambda: get_task("nope"), lambda: parse_task_list("cb,nope")):
        with pytest.raises(ValueError, match="unknown task") as info:
            call()
        assert "someone-elses" not in str(info.value) and "cb" in str(info.value)
