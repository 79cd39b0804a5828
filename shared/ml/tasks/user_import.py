"""User datasets (JSONL or CSV/TSV) validated row by row and stored as tasks under `get_settings().user_tasks`.

Flow: `validate_dataset_bytes` (all problems collected, each with its 1-based line number) ->
`register_dataset` (80/10/10 stratified split, seed 0, written atomically as <name>/task.json + data.json).
`import_dataset` does both from a path. Nothing is written when any row is bad.
"""

from __future__ import annotations

import csv
import hashlib
import json
import keyword
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from shared.config import get_settings
from shared.ml.tasks.base import SPLITS, Example, Task, normalise
from shared.ml.tasks.builtin import BUILTIN_TASKS
from shared.ml.tasks.splits import SEED, three_way
from shared.ml.tasks.templates import (
    MAX_TEMPLATE_CHARS,
    TemplateError,
    render_template,
    template_variables,
    validate_template,
)

log = logging.getLogger("chorus.tasks")

NAME_RE = re.compile(r"[a-z][a-z0-9_\-]{1,63}")  # always with fullmatch (a "$" would let a final newline in)
RESERVED_NAMES = frozenset({"all", "builtin", "core", "user"})
FORMATS = ("jsonl", "csv", "tsv")
SPEC_FILE, DATA_FILE = "task.json", "data.json"
SPEC_VERSION = 1
MAX_SHOWN = 50  # errors listed in str(); all of them stay in .errors
MAX_INT_DIGITS = 1000  # a longer integer in a JSON row is refused (Python refuses to convert > 4300)

_JINJA_WORDS = {"and", "or", "not", "in", "is", "if", "else", "true", "false", "none", "loop", "self"}


# ---------------------------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class RowError:
    """One problem: `line` is 1-based in the uploaded file (None: the file or the arguments as a whole)."""

    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line is not None else "file"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "field": self.field, "message": self.message}


class DatasetValidationError(ValueError):
    """Every problem found in a dataset (or its import arguments); nothing was registered."""

    def __init__(self, errors: Sequence[RowError]):
        self.errors = sorted(errors, key=lambda e: (e.line is not None, e.line or 0))
        super().__init__(str(self))

    def __str__(self) -> str:
        shown = "\n".join(f"  {e}" for e in self.errors[:MAX_SHOWN])
        more = f"\n  ... and {len(self.errors) - MAX_SHOWN} more" if len(self.errors) > MAX_SHOWN else ""
        return f"dataset rejected, {len(self.errors)} problem(s), nothing imported:\n{shown}{more}"

    def __reduce__(self) -> tuple[Any, ...]:  # picklable (Celery ships exceptions between processes)
        return (self.__class__, (self.errors,))

    def to_dict(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.errors]


class TaskExistsError(DatasetValidationError):
    """A user task with that name already exists (pass overwrite=True to replace it)."""


class UserTaskError(ValueError):
    """A stored user task that cannot be loaded (unreadable or tampered files, a refused template)."""


# ---------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedRow:
    line: int
    id: str
    texts: dict[str, str]  # template key -> text
    label: str


@dataclass
class ParsedDataset:
    """A validated dataset, ready for `register_dataset`."""

    fmt: str
    text_fields: list[str]  # column names in the file
    field_keys: list[str]  # the template variable of each text field (identifier-safe)
    label_field: str
    label_names: list[str]
    template: str
    id_field: str | None
    rows: list[ParsedRow]
    sha256: str
    source_name: str | None = None
    label_index: dict[str, int] = field(default_factory=dict)

    def labels(self) -> list[int]:
        """Each row's label as an index into `label_names`."""
        return [self.label_index[row.label] for row in self.rows]

    def label_counts(self) -> dict[str, int]:
        counts = Counter(self.labels())
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}


def validate_name(name: str, errors: list[RowError]) -> None:
    """Append a problem when `name` is not a valid, free task name (builtin names are taken)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        errors.append(RowError(None, "name", f"invalid task name {name!r}: use 2-64 chars, a-z first, then a-z 0-9 _ -"))
    elif name in BUILTIN_TASKS or name in RESERVED_NAMES:
        errors.append(RowError(None, "name", f"task name {name!r} is reserved (a built-in task or keyword)"))


def field_key(column: str) -> str:
    """The Jinja variable used for a column: non-identifier characters become '_' ("review text" -> review_text)."""
    key = re.sub(r"\W", "_", column.strip()) or "field"
    if key[0].isdigit():
        key = "f_" + key
    return key + "_" if key in _JINJA_WORDS or keyword.iskeyword(key) else key


def default_template(text_fields: Sequence[str], keys: Sequence[str], label_names: Sequence[str]) -> str:
    """Lists each text field, then the options, and ends with the "Answer:" cue."""
    def literal(text: str) -> str:  # a Jinja string literal: braces in names cannot inject template code
        return "{{ " + json.dumps(text) + " }}"

    if len(keys) == 1:
        body = "{{ " + keys[0] + " }}"
    else:
        body = "\n".join(f"{literal(col)}: {{{{ {key} }}}}" for col, key in zip(text_fields, keys, strict=True))
    return f"{body}\nQuestion: Which label fits? Options: {literal(', '.join(label_names))}.\nAnswer:"


def _decode_lines(data: bytes, errors: list[RowError]) -> list[str]:
    """Lines split on b'\\n' (ends kept); each line not valid UTF-8 is reported and decoded with U+FFFD."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(RowError(number, None, f"not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})"))
            text = raw.decode("utf-8", errors="replace")
        out.append(text + "\n")
    if out and out[-1] == "\n":  # the split after a final newline
        out.pop()
    return out


class _LongInteger(ValueError):
    pass


def _parse_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _LongInteger(f"an integer with {digits:,} digits (at most {MAX_INT_DIGITS:,}; quote it to keep it as text)")
    return int(text)


def _jsonl_records(lines: list[str], errors: list[RowError]) -> list[tuple[int, dict[str, Any]]]:
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, parse_int=_parse_int)
        except json.JSONDecodeError as exc:
            array = number == 1 and line.lstrip().startswith("[")
            hint = " (the file looks like a JSON array; use one JSON object per line)" if array else ""
            errors.append(RowError(number, None, f"malformed JSON: {exc.msg} at column {exc.colno}{hint}"))
            continue
        except _LongInteger as exc:
            errors.append(RowError(number, None, f"unreadable JSON: {exc}"))
            continue
        except RecursionError:
            errors.append(RowError(number, None, "unreadable JSON: nested too deeply"))
            continue
        except ValueError as exc:  # anything else the decoder refuses
            errors.append(RowError(number, None, f"unreadable JSON: {str(exc).split(';')[0][:200]}"))
            continue
        if not isinstance(obj, dict):
            errors.append(RowError(number, None, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        records.append((number, obj))
    return records


def _csv_records(
    lines: list[str], delimiter: str, required: Sequence[str], errors: list[RowError]
) -> list[tuple[int, dict[str, Any]]]:
    csv.field_size_limit(max(csv.field_size_limit(), get_settings().max_upload_bytes))  # long texts are fine
    reader = csv.reader(iter(lines), delimiter=delimiter)
    records: list[tuple[int, dict[str, Any]]] = []
    header: list[str] | None = None
    previous = 0
    try:
        for cells in reader:
            start, previous = previous + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                missing = [f for f in required if f not in header]
                if missing:
                    listed = ", ".join(map(repr, missing))
                    errors.append(RowError(start, None, f"header has no column(s) {listed}; columns: {', '.join(header)}"))
                    return []
                continue
            if len(cells) != len(header):
                errors.append(RowError(start, None, f"expected {len(header)} columns, got {len(cells)} (check the quoting)"))
                continue
            records.append((start, dict(zip(header, cells, strict=True))))
    except csv.Error as exc:
        errors.append(RowError(previous + 1, None, f"unreadable CSV: {exc}"))
    return records


def _scalar(value: Any) -> str | None:
    """A JSON/CSV value as text; None when it is not a string, number or boolean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if math.isfinite(value) and value.is_integer() else str(value)
    return value if isinstance(value, str) else None


def _sort_labels(labels: set[str]) -> list[str]:
    """Integer labels in numeric order (when short enough to convert), anything else as text."""
    if all(re.fullmatch(r"-?\d{1,%d}" % MAX_INT_DIGITS, x) for x in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _read_upload(data: bytes | BinaryIO, limit: int) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return data.read(limit + 1)


def validate_dataset_bytes(
    data: bytes | BinaryIO,
    fmt: str,
    text_fields: Sequence[str] | str,
    label_field: str,
    template: str | None = None,
    label_names: Sequence[str] | None = None,
    id_field: str | None = None,
    *,
    name: str | None = None,
    source_name: str | None = None,
) -> ParsedDataset:
    """Parse and check an upload; raise DatasetValidationError listing every problem.

    Labels are matched against `label_names` when given (an all-integer label column is read as indices
    into them when no label equals a name); otherwise the sorted distinct labels become the label names.
    """
    settings = get_settings()
    errors: list[RowError] = []
    raw = _read_upload(data, settings.max_upload_bytes)
    if len(raw) > settings.max_upload_bytes:
        size = f"{len(raw):,} bytes" if isinstance(data, (bytes, bytearray, memoryview)) else "larger than that"
        message = f"file is over the {settings.max_upload_bytes:,}-byte upload limit ({size})"
        raise DatasetValidationError([RowError(None, None, message)])
    fields = [f.strip() for f in text_fields.split(",")] if isinstance(text_fields, str) else [str(f) for f in text_fields]
    _check_arguments(fmt, fields, label_field, label_names, id_field, errors)
    if errors:  # the rows cannot be read without valid arguments
        raise DatasetValidationError(errors)
    if name is not None:
        validate_name(name, errors)
    keys = [field_key(f) for f in fields]

    lines = _decode_lines(raw, errors)
    required = [*fields, label_field, *([id_field] if id_field else [])]
    if fmt == "jsonl":
        records = _jsonl_records(lines, errors)
    else:
        records = _csv_records(lines, "\t" if fmt == "tsv" else ",", required, errors)
    rows, labelled = _check_rows(records, fields, keys, label_field, id_field, errors)
    if not records and not any(e.line is not None for e in errors):
        errors.append(RowError(None, None, "no data rows"))
    if len(rows) > settings.max_dataset_rows:
        errors.append(RowError(None, None, f"{len(rows):,} rows is over the {settings.max_dataset_rows:,}-row limit"))

    names, index = _resolve_labels(labelled, label_names, label_field, errors)
    counts = Counter(label for _, label in labelled)
    for line, label in labelled:
        if label in index and counts[label] < 2:
            errors.append(RowError(line, label_field, f"label {label!r} has only 1 example; every label needs at least 2"))
    if labelled and len({index[label] for label in counts if label in index}) < 2:
        errors.append(RowError(None, label_field, "need examples of at least 2 different labels"))
    final_template = template if template is not None else default_template(fields, keys, names)
    if template is None and len(final_template) > MAX_TEMPLATE_CHARS:
        message = (f"the default template (listing {len(names):,} label names) would be {len(final_template):,} "
                   f"characters, over the {MAX_TEMPLATE_CHARS:,}-character limit; pass a template")
        errors.append(RowError(None, "template", message))
    else:
        _check_template(final_template, keys, rows, errors, user_given=template is not None)
    if errors:
        raise DatasetValidationError(errors)
    return ParsedDataset(
        fmt=fmt, text_fields=fields, field_keys=keys, label_field=label_field, label_names=names,
        template=final_template, id_field=id_field, rows=rows, sha256=hashlib.sha256(raw).hexdigest(),
        source_name=source_name, label_index=index,
    )


def _check_arguments(
    fmt: str, fields: list[str], label_field: str, label_names: Sequence[str] | None, id_field: str | None,
    errors: list[RowError],
) -> None:
    if fmt not in FORMATS:
        errors.append(RowError(None, None, f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}"))
    if not fields or any(not f for f in fields):
        errors.append(RowError(None, "text_fields", "give at least one non-empty text field name"))
    if len(set(fields)) != len(fields):
        errors.append(RowError(None, "text_fields", f"text fields repeat: {fields}"))
    keys = [field_key(f) for f in fields]
    if len(set(keys)) != len(keys):
        errors.append(RowError(None, "text_fields", f"text fields {fields} collide as template variables {keys}"))
    if not label_field or label_field in fields:
        errors.append(RowError(None, "label_field", f"label field {label_field!r} must be set and not be a text field"))
    if id_field is not None and (not id_field or id_field in fields or id_field == label_field):
        errors.append(RowError(None, "id_field", f"id field {id_field!r} must differ from the text and label fields"))
    if label_names is not None:
        names = list(label_names)
        if len(names) < 2 or any(not isinstance(n, str) or not n.strip() for n in names):
            errors.append(RowError(None, "label_names", "give at least 2 non-empty label names"))
        elif len(set(names)) != len(names):
            errors.append(RowError(None, "label_names", f"label names repeat: {names}"))


def _check_rows(
    records: list[tuple[int, dict[str, Any]]], fields: list[str], keys: list[str], label_field: str,
    id_field: str | None, errors: list[RowError],
) -> tuple[list[ParsedRow], list[tuple[int, str]]]:
    """(rows without problems, (line, label) of every row whose label could be read)."""
    rows: list[ParsedRow] = []
    labelled: list[tuple[int, str]] = []
    seen_ids: dict[str, int] = {}
    for position, (line, record) in enumerate(records):
        ok = True
        texts: dict[str, str] = {}
        for column, key in zip(fields, keys, strict=True):
            if column not in record or record[column] is None:
                errors.append(RowError(line, column, "missing field"))
                ok = False
                continue
            value = _scalar(record[column])
            if value is None:
                errors.append(RowError(line, column, f"expected text, got {type(record[column]).__name__}"))
                ok = False
            elif not normalise(value):
                errors.append(RowError(line, column, "empty text"))
                ok = False
            else:
                texts[key] = value
        raw_label = record.get(label_field)
        label = _scalar(raw_label)
        if raw_label is None or (label is not None and not label.strip()):
            errors.append(RowError(line, label_field, "missing label"))
            ok = False
        elif label is None:
            errors.append(RowError(line, label_field, f"label must be a string or an integer, got {type(raw_label).__name__}"))
            ok = False
        else:
            label = label.strip()
            labelled.append((line, label))
        row_id = str(position)
        if id_field is not None:
            value = _scalar(record.get(id_field))
            if value is None or not value.strip():
                errors.append(RowError(line, id_field, "missing id"))
                ok = False
            else:
                row_id = value.strip()
                if row_id in seen_ids:
                    errors.append(RowError(line, id_field, f"duplicate id {row_id!r} (first on line {seen_ids[row_id]})"))
                    ok = False
                else:
                    seen_ids[row_id] = line
        if ok:
            rows.append(ParsedRow(line, row_id, texts, str(label)))
    return rows, labelled


def _resolve_labels(
    labelled: list[tuple[int, str]], label_names: Sequence[str] | None, label_field: str, errors: list[RowError]
) -> tuple[list[str], dict[str, int]]:
    """The label names and a map from the labels as written to their index; unknown labels reported."""
    present = {label for _, label in labelled}
    if label_names is None:
        names = _sort_labels(present)
        return names, {n: i for i, n in enumerate(names)}
    names = list(label_names)
    index = {n: i for i, n in enumerate(names)}
    if present and not present & set(names) and all(re.fullmatch(r"\d+", x) for x in present):
        index = {str(i): i for i in range(len(names))}  # integer labels index the given names
    for line, label in labelled:
        if label not in index:
            errors.append(RowError(line, label_field, f"unknown label {label!r}; expected one of {', '.join(index)}"))
    return names, index


def _check_template(template: str, keys: list[str], rows: list[ParsedRow], errors: list[RowError], user_given: bool) -> None:
    """Refuse an unsafe or unknown-field template (see templates.py), then render every row (capped output)."""
    try:
        validate_template(template, keys)
    except TemplateError as exc:
        errors.append(RowError(None, "template", str(exc)))
        return
    if user_given and not template_variables(template):
        errors.append(RowError(None, "template", "template uses none of the text fields"))
    failed = 0
    for row in rows:
        try:
            render_template(template, row.texts)
        except TemplateError as exc:
            errors.append(RowError(row.line, "template", str(exc)))
            failed += 1
            if failed >= MAX_SHOWN:
                break


# ---------------------------------------------------------------------------------------------- storage


def _root() -> Path:
    return get_settings().user_tasks


def _detect_format(path: Path, fmt: str | None) -> str:
    if fmt:
        return fmt.lower()
    suffix = path.suffix.lower()
    found = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}.get(suffix)
    if found is None:
        message = f"cannot tell the format of {path.name!r}; pass fmt (jsonl, csv or tsv)"
        raise DatasetValidationError([RowError(None, None, message)])
    return found


def import_dataset(
    path: str | Path,
    name: str,
    text_fields: Sequence[str] | str,
    label_field: str,
    template: str | None = None,
    label_names: Sequence[str] | None = None,
    id_field: str | None = None,
    fmt: str | None = None,
    *,
    overwrite: bool = False,
    description: str | None = None,
) -> Task:
    """Validate a JSONL/CSV/TSV file and register it as task `name`; DatasetValidationError when any row is bad."""
    path = Path(path)
    limit = get_settings().max_upload_bytes
    size = path.stat().st_size
    if size > limit:
        raise DatasetValidationError([RowError(None, None, f"file is {size:,} bytes, over the {limit:,}-byte upload limit")])
    parsed = validate_dataset_bytes(
        path.read_bytes(), _detect_format(path, fmt), text_fields, label_field, template, label_names, id_field,
        name=name, source_name=path.name,
    )
    return register_dataset(parsed, name, overwrite=overwrite, description=description)


def _split_rows(parsed: ParsedDataset, name: str) -> dict[str, list[dict[str, Any]]]:
    labels = parsed.labels()
    groups = [normalise(" ".join(row.texts.values())).lower() for row in parsed.rows]
    parts = three_way(labels, (0.8, 0.1, 0.1), SEED, groups)
    return {
        split: [{"id": f"{name}/{split}/{parsed.rows[i].id}", "fields": parsed.rows[i].texts, "label": labels[i]} for i in index]
        for split, index in zip(SPLITS, parts, strict=True)
    }


def register_dataset(
    parsed: ParsedDataset, name: str, *, overwrite: bool = False, description: str | None = None
) -> Task:
    """Split (80/10/10 stratified, seed 0) and store `parsed` as user task `name`, atomically."""
    errors: list[RowError] = []
    validate_name(name, errors)
    if errors:
        raise DatasetValidationError(errors)
    root = _root()
    target = root / name
    if target.exists() and not overwrite:
        raise TaskExistsError([RowError(None, "name", f"a task named {name!r} already exists (overwrite to replace it)")])
    splits = _split_rows(parsed, name)
    lengths = {k: sum(len(r.texts[k]) for r in parsed.rows) for k in parsed.field_keys}
    source = parsed.source_name or "upload"
    spec = {
        "version": SPEC_VERSION,
        "name": name,
        "template": parsed.template,
        "choices": parsed.label_names,
        "label_names": parsed.label_names,
        "truncate_field": max(lengths, key=lengths.__getitem__),
        "description": description or (
            f"User dataset {source} ({len(parsed.rows)} rows, {parsed.fmt}); train/val/test carved 80/10/10, "
            "stratified by label (seed 0)."
        ),
        "text_fields": parsed.text_fields,
        "field_keys": parsed.field_keys,
        "label_field": parsed.label_field,
        "id_field": parsed.id_field,
        "format": parsed.fmt,
        "source": source,
        "sha256": parsed.sha256,
        "label_counts": parsed.label_counts(),
        "sizes": {k: len(v) for k, v in splits.items()},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _spec_to_task(spec, target)  # fail before writing anything if the Task itself would be refused
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        (tmp / DATA_FILE).write_text(json.dumps({"version": SPEC_VERSION, "splits": splits}, ensure_ascii=False))
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2, ensure_ascii=False))
        _publish(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    task = load_user_task(name)
    assert task is not None
    return task


def _publish(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; with overwrite the old folder is swapped out first."""
    trash = None
    if overwrite and target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
        target.rename(trash)
    try:
        tmp.rename(target)
    except OSError as exc:  # someone else registered the name meanwhile
        if trash is not None:
            trash.rename(target)
        raise TaskExistsError([RowError(None, "name", f"a task named {target.name!r} already exists")]) from exc
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- loading

_cache: dict[str, tuple[tuple[int, int], Task]] = {}


def _spec_to_task(spec: dict[str, Any], folder: Path) -> Task:
    """The Task a stored spec describes; its template is re-validated against its fields (specs are files
    that may have been written by an older version or edited since)."""
    if not isinstance(spec, dict):
        raise TypeError(f"{SPEC_FILE} is not a JSON object")
    if spec.get("name") != folder.name:
        raise ValueError(f"{SPEC_FILE} names task {spec.get('name')!r}, not {folder.name!r}")
    keys = spec.get("field_keys")
    if keys is not None and (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)):
        raise TypeError(f"{SPEC_FILE}: field_keys is not a list of names")

    def load() -> dict[str, list[Example]]:
        stored = json.loads((folder / DATA_FILE).read_text(encoding="utf-8"))
        return {
            split: [Example(r["id"], r["fields"], int(r["label"])) for r in stored["splits"][split]] for split in SPLITS
        }

    return Task(
        name=spec["name"], template=spec["template"], choices=list(spec["choices"]), loader=load,
        label_names=list(spec["label_names"]), truncate_field=spec.get("truncate_field"),
        description=spec.get("description", ""), source="user", field_names=keys,
    )


def load_user_task(name: str) -> Task | None:
    """The user task `name`, or None when there is none (cached until its spec file changes).

    UserTaskError when it exists but cannot be loaded: unreadable files or a template the validator refuses
    (such a task is never rendered). Messages name the task, never a server path.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        return None
    folder = _root() / name
    try:
        stat = (folder / SPEC_FILE).stat()
    except OSError:
        _cache.pop(name, None)
        return None
    stamp = (stat.st_ino, stat.st_mtime_ns)
    cached = _cache.get(name)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    problem = f"user task {name!r} cannot be loaded"
    try:
        task = _spec_to_task(json.loads((folder / SPEC_FILE).read_text(encoding="utf-8")), folder)
    except FileNotFoundError:  # deleted meanwhile
        _cache.pop(name, None)
        return None
    except OSError as exc:
        raise UserTaskError(f"{problem}: its {SPEC_FILE} is unreadable ({exc.strerror or type(exc).__name__})") from None
    except KeyError as exc:
        raise UserTaskError(f"{problem}: its {SPEC_FILE} has no {exc.args[0]!r}") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise UserTaskError(f"{problem}: {exc}") from None
    _cache[name] = (stamp, task)
    return task


def list_user_tasks() -> list[Task]:
    """Every stored user task, sorted by name (unreadable folders are skipped)."""
    root = _root()
    if not root.is_dir():
        return []
    tasks = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        try:
            task = load_user_task(folder.name)
        except UserTaskError as exc:
            log.warning("skipping %s", exc)
            continue
        if task is not None:
            tasks.append(task)
    return tasks


def delete_user_task(name: str) -> None:
    """Remove user task `name` (ValueError when there is none; built-in tasks cannot be deleted)."""
    if name in BUILTIN_TASKS:
        raise ValueError(f"{name!r} is a built-in task and cannot be deleted")
    folder = _root() / name
    if not NAME_RE.fullmatch(name) or not (folder / SPEC_FILE).exists():
        raise ValueError(f"no user task named {name!r}")
    trash = folder.with_name(f".{name}.deleted-{os.getpid()}-{time.time_ns()}")
    folder.rename(trash)  # atomic: other processes see it gone at once
    _cache.pop(name, None)
    shutil.rmtree(trash, ignore_errors=True)


def user_task_spec(name: str) -> dict[str, Any]:
    """The stored task.json of a user task (fields, source, sha256, label counts, sizes)."""
    path = _root() / name / SPEC_FILE
    if not NAME_RE.fullmatch(name) or not path.exists():
        raise ValueError(f"no user task named {name!r}")
    return json.loads(path.read_text(encoding="utf-8"))
