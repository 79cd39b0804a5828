"""User datasets (JSON lines, JSON arrays, CSV/TSV, Parquet, Arrow, `datasets.save_to_disk` folders) validated
row by row and stored as tasks under `get_settings().user_tasks`.

Flow: `validate_files` (all problems collected, each with its 1-based line number; `validate_dataset_bytes`
and `validate_dataset_paths` wrap it) -> `register_dataset` (the user's splits when a `split` column or one
file per split gives them, else 80/10/10 stratified with seed 0; written atomically as <name>/task.json +
data.json). `import_dataset` does both from paths. Nothing is written when any row is bad.
"""

from __future__ import annotations

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from shared.config import get_settings
from shared.errors import BadInput
from shared.ml.tasks.base import SPLITS, Example, Task, normalise
from shared.ml.tasks.builtin import BUILTIN_TASKS
from shared.ml.tasks.import_errors import MAX_SHOWN, DatasetValidationError, RowError, TaskExistsError
from shared.ml.tasks.readers import (
    FORMATS,
    MAX_INT_DIGITS,
    SUFFIX_FORMATS,
    Table,
    format_for,
    is_saved_dataset,
    json_problem,
    parse_int,
    read_bytes,
    read_saved_dataset,
    split_name,
)
from shared.ml.tasks.splits import SEED, carve_val, three_way
from shared.ml.tasks.templates import (
    MAX_TEMPLATE_CHARS,
    TemplateError,
    render_template,
    template_variables,
    validate_template,
)

__all__ = [
    "FORMATS",
    "DataFile",
    "DatasetValidationError",
    "ParsedDataset",
    "RowError",
    "SkippedTask",
    "TaskExistsError",
    "file_label",
    "format_for",
    "UserTaskError",
    "default_task_name",
    "delete_user_task",
    "import_dataset",
    "list_user_tasks",
    "load_user_task",
    "parse_label_names",
    "read_label_names_file",
    "register_dataset",
    "scan_user_tasks",
    "user_task_exists",
    "user_task_spec",
    "validate_dataset_bytes",
    "validate_dataset_paths",
    "validate_files",
]

log = logging.getLogger("chorus.tasks")

NAME_RE = re.compile(r"[a-z][a-z0-9_\-]{1,63}")  # always with fullmatch (a "$" would let a final newline in)
RESERVED_NAMES = frozenset({"all", "builtin", "core", "user"})
SPEC_FILE, DATA_FILE = "task.json", "data.json"
SPEC_VERSION = 1
TEXT_FIELD, LABEL_FIELD, SPLIT_FIELD = "text", "label", "split"  # the columns used when none are named
FORMAT_NAMES = "jsonl, json, csv, tsv, parquet or arrow"

_JINJA_WORDS = {"and", "or", "not", "in", "is", "if", "else", "true", "false", "none", "loop", "self"}


class UserTaskError(BadInput):
    """A stored user task that cannot be loaded (unreadable or tampered files, a refused template)."""


# ---------------------------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class DataFile:
    """One file of an import: bytes (or a stream, or a path: a file or a `save_to_disk` folder), its format
    (None: from the name), its name for messages, and the split it holds (train, validation/val, test)."""

    data: bytes | BinaryIO | Path
    fmt: str | None = None
    name: str | None = None
    split: str | None = None


def parse_label_names(raw: str | Sequence[str] | None) -> list[str] | None:
    """Label names from `["negative","positive"]` (a JSON list) or `negative,positive`; None when empty.

    DatasetValidationError (field label_names) for a malformed JSON list.
    """
    if raw is None:
        return None
    if not isinstance(raw, str):
        return [str(x) for x in raw]
    if not raw.strip():
        return None
    if not raw.lstrip().startswith("["):
        return [p.strip() for p in raw.split(",")]
    try:
        value = json.JSONDecoder(parse_int=parse_int).decode(raw)
    except (ValueError, RecursionError) as exc:
        raise DatasetValidationError([RowError(None, "label_names", f"not a JSON list: {json_problem(exc)}")]) from None
    if not isinstance(value, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        raise DatasetValidationError([RowError(None, "label_names", "expected a JSON list of strings")])
    return [str(v) for v in value]


def read_label_names_file(path: str | Path) -> list[str]:
    """Label names from a file: a JSON list, or one name per line (blank lines skipped)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise DatasetValidationError([RowError(None, "label_names", f"cannot read {path.name}: {reason}")]) from None
    if text.lstrip().startswith("["):
        return parse_label_names(text) or []
    return [line.strip() for line in text.splitlines() if line.strip()]


def default_task_name(path: str | Path) -> str:
    """A task name from a file or folder name: "My Reviews.csv" -> "my-reviews"; "imdb_train.csv" -> "imdb"
    (a trailing split word is dropped; a bare "train.csv" takes its folder's name)."""
    path = Path(path)
    for candidate in (
        path.stem if path.is_file() or path.suffix.lower() in SUFFIX_FORMATS else path.name,
        path.parent.name,
    ):
        stem = re.sub(r"[^a-z0-9_\-]+", "-", candidate.lower()).strip("-_")
        stem = re.sub(r"(^|[-_.])(train|training|validation|valid|val|dev|test)$", "", stem).strip("-_")
        if stem:
            return stem
    return ""


# ---------------------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ParsedRow:
    line: int
    id: str
    texts: dict[str, str]  # template key -> text
    label: str
    split: str | None = None  # train, val or test when the user gave the splits
    source: str | None = None  # the file, when several were given


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
    split_source: str | None = None  # "column" (a split column) or "files" (one per split); None: carve them
    warnings: list[str] = field(default_factory=list)

    def labels(self) -> list[int]:
        """Each row's label as an index into `label_names`."""
        return [self.label_index[row.label] for row in self.rows]

    def label_counts(self) -> dict[str, int]:
        counts = Counter(self.labels())
        return {name: counts.get(i, 0) for i, name in enumerate(self.label_names)}


def validate_name(name: str, errors: list[RowError]) -> None:
    """Append a problem when `name` is not a valid, free task name (builtin names are taken)."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        errors.append(
            RowError(None, "name", f"invalid task name {name!r}: use 2-64 chars, a-z first, then a-z 0-9 _ -")
        )
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


def _scalar(value: Any) -> str | None:
    """A JSON/CSV value as text; None when it is not a string, number or boolean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if math.isfinite(value) and value.is_integer() else str(value)
    return value if isinstance(value, str) else None


def _is_int(text: str) -> bool:
    return re.fullmatch(rf"-?\d{{1,{MAX_INT_DIGITS}}}", text) is not None


def _sort_labels(labels: set[str]) -> list[str]:
    """Integer labels in numeric order (when short enough to convert), anything else as text."""
    if all(_is_int(x) for x in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _read_upload(data: bytes | BinaryIO, limit: int) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    return data.read(limit + 1)


def validate_dataset_bytes(
    data: bytes | BinaryIO,
    fmt: str,
    text_fields: Sequence[str] | str = TEXT_FIELD,
    label_field: str = LABEL_FIELD,
    template: str | None = None,
    label_names: Sequence[str] | None = None,
    id_field: str | None = None,
    *,
    name: str | None = None,
    source_name: str | None = None,
    split_field: str | None = SPLIT_FIELD,
) -> ParsedDataset:
    """Parse and check one uploaded file; raise DatasetValidationError listing every problem (see validate_files)."""
    return validate_files(
        [DataFile(data, fmt, source_name)],
        text_fields,
        label_field,
        template,
        label_names,
        id_field,
        name=name,
        split_field=split_field,
    )


def validate_dataset_paths(
    path: str | Path | None = None,
    text_fields: Sequence[str] | str = TEXT_FIELD,
    label_field: str = LABEL_FIELD,
    template: str | None = None,
    label_names: Sequence[str] | None = None,
    id_field: str | None = None,
    fmt: str | None = None,
    *,
    splits: Mapping[str, str | Path] | None = None,
    name: str | None = None,
    split_field: str | None = SPLIT_FIELD,
) -> ParsedDataset:
    """Check a file or `save_to_disk` folder (`path`), or one file per split (`splits`: {"train": path, ...});
    with both, `path` is the train split."""
    splits = dict(splits or {})
    if path is not None and splits and not any(split_name(s) == "train" for s in splits):
        splits = {"train": path, **splits}
        path = None
    files = [DataFile(Path(path), fmt, Path(path).name)] if path is not None else []
    files += [DataFile(Path(p), fmt, Path(p).name, split) for split, p in (splits or {}).items()]
    return validate_files(
        files, text_fields, label_field, template, label_names, id_field, name=name, split_field=split_field
    )


def validate_files(
    files: Sequence[DataFile],
    text_fields: Sequence[str] | str = TEXT_FIELD,
    label_field: str = LABEL_FIELD,
    template: str | None = None,
    label_names: Sequence[str] | None = None,
    id_field: str | None = None,
    *,
    name: str | None = None,
    split_field: str | None = SPLIT_FIELD,
) -> ParsedDataset:
    """Parse and check a dataset given as one file (or folder), or one file per split; raise
    DatasetValidationError listing every problem.

    Labels are matched against `label_names` when given (an all-integer label column is read as indices
    into them when no label equals a name), else against the ClassLabel names a Hugging Face file carries;
    otherwise the sorted distinct labels become the label names. The splits are the files' (one per split)
    or the `split_field` column's (train / validation or val / test) when there is one.
    """
    settings = get_settings()
    errors: list[RowError] = []
    warnings: list[str] = []
    fields = (
        [f.strip() for f in text_fields.split(",")] if isinstance(text_fields, str) else [str(f) for f in text_fields]
    )
    _check_arguments(fields, label_field, label_names, id_field, errors)
    _check_files(files, errors)
    if errors:  # the rows cannot be read without valid arguments
        raise DatasetValidationError(errors)
    tables = _read_tables(files, errors, warnings)
    if name is not None:
        validate_name(name, errors)
    keys = [field_key(f) for f in fields]
    required = [*fields, label_field, *([id_field] if id_field else [])]
    if not _check_columns(tables, required, fields, label_field, id_field, errors):
        raise DatasetValidationError(errors)  # one error per file names the missing columns: no row-by-row echo
    split_column = _split_column(tables, split_field, required, warnings)
    rows, labelled = _check_rows(tables, fields, keys, label_field, id_field, split_column, errors)
    _check_sizes(tables, settings.max_dataset_rows, errors)
    class_names = _class_label_names(tables, label_field, warnings)
    labels = _check_labels(labelled, label_names, class_names, label_field, errors, warnings)
    split_source = _split_source(tables, split_column, rows, errors)
    final_template = _final_template(template, fields, keys, labels.names, rows, errors)
    if errors:
        raise DatasetValidationError(errors)
    return ParsedDataset(
        fmt="+".join(dict.fromkeys(t.fmt for t in tables)),
        text_fields=fields,
        field_keys=keys,
        label_field=label_field,
        label_names=labels.names,
        template=final_template,
        id_field=id_field,
        rows=rows,
        sha256=_digest(tables),
        source_name=", ".join(dict.fromkeys(f.name or "upload" for f in files)),
        label_index=labels.index,
        split_source=split_source,
        warnings=warnings,
    )


def _check_sizes(tables: list[Table], max_rows: int, errors: list[RowError]) -> None:
    """A "no data rows" problem for each empty file without row problems; one for a total over `max_rows`."""
    for table in tables:
        table_errors = [e for e in errors if e.line is not None and e.source == table.source]
        if not table.records and not table_errors:
            errors.append(table.error(None, None, "no data rows"))
    total = sum(len(t.records) for t in tables)
    if total > max_rows:
        errors.append(RowError(None, None, f"{total:,} rows is over the {max_rows:,}-row limit"))


def _class_label_names(tables: list[Table], label_field: str, warnings: list[str]) -> list[str] | None:
    """The ClassLabel names a Hugging Face file gives the label column; None (with a warning) when unusable."""
    class_names = next((t.class_labels[label_field] for t in tables if label_field in t.class_labels), None)
    if class_names is not None and (
        len(class_names) < 2 or len(set(class_names)) != len(class_names) or not all(n.strip() for n in class_names)
    ):
        warnings.append(
            f"the ClassLabel names {class_names[:20]} of {label_field!r} are ignored (fewer than 2, repeated or empty)"
        )
        return None
    return class_names


@dataclass(frozen=True)
class _Labels:
    """The label names and a map from the labels as written to their index into them."""

    names: list[str]
    index: dict[str, int]


def _check_labels(
    labelled: list[tuple[Table, int, str]],
    label_names: Sequence[str] | None,
    class_names: list[str] | None,
    label_field: str,
    errors: list[RowError],
    warnings: list[str],
) -> _Labels:
    """Resolve the labels (given names, else ClassLabel names, else the sorted labels); report unknown labels,
    labels with a single example and fewer than 2 distinct labels; warn when bare integers become the names."""
    names, index = _resolve_labels(
        labelled, label_names if label_names is not None else class_names, label_field, errors
    )
    if label_names is None and class_names is None and labelled and all(_is_int(x) for x in names):
        shown = "/".join(f'"{n}"' for n in names[:6]) + ("/..." if len(names) > 6 else "")
        warnings.append(
            f"labels are integers and no label names were given: the model will be asked to answer "
            f"{shown}; pass the names in label order (e.g. --label-names negative,positive) so it "
            "answers with words"
        )
    counts = Counter(label for _, _, label in labelled)
    for table, line, label in labelled:
        if label in index and counts[label] < 2:
            errors.append(
                table.error(line, label_field, f"label {label!r} has only 1 example; every label needs at least 2")
            )
    if labelled and len({index[label] for label in counts if label in index}) < 2:
        errors.append(RowError(None, label_field, "need examples of at least 2 different labels"))
    return _Labels(names, index)


def _split_source(
    tables: list[Table], split_column: str | None, rows: list[ParsedRow], errors: list[RowError]
) -> str | None:
    """Where the user's splits come from ("files" or "column"; None: carve them); a problem when they give
    no train rows."""
    split_source = "files" if any(t.split for t in tables) else ("column" if split_column else None)
    if split_source and rows and not any(r.split == "train" for r in rows):
        given = ", ".join(sorted({r.split or "" for r in rows}))
        errors.append(
            RowError(
                None,
                split_column if split_source == "column" else None,
                f"no train rows: the {'split column' if split_source == 'column' else 'files'} give only {given}",
            )
        )
    return split_source


def _final_template(
    template: str | None,
    fields: list[str],
    keys: list[str],
    names: list[str],
    rows: list[ParsedRow],
    errors: list[RowError],
) -> str:
    """The user's template, else the default one; checked against the fields and rendered on every row."""
    final_template = template if template is not None else default_template(fields, keys, names)
    if template is None and len(final_template) > MAX_TEMPLATE_CHARS:
        message = (
            f"the default template (listing {len(names):,} label names) would be {len(final_template):,} "
            f"characters, over the {MAX_TEMPLATE_CHARS:,}-character limit; pass a template"
        )
        errors.append(RowError(None, "template", message))
    else:
        _check_template(final_template, keys, rows, errors, user_given=template is not None)
    return final_template


def _digest(tables: list[Table]) -> str:
    """The file's sha256; for several files, the sha256 of their "split:sha256" lines."""
    if len(tables) == 1:
        return tables[0].sha256
    return hashlib.sha256("".join(f"{t.split or t.source}:{t.sha256}\n" for t in tables).encode()).hexdigest()


def _check_arguments(
    fields: list[str],
    label_field: str,
    label_names: Sequence[str] | None,
    id_field: str | None,
    errors: list[RowError],
) -> None:
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


def _check_files(files: Sequence[DataFile], errors: list[RowError]) -> None:
    """The formats and splits of the files: one dataset, or one file per split with a train file among them."""
    if not files:
        errors.append(RowError(None, None, "no data file given"))
    for f in files:
        fmt = (f.fmt or "").lower() or format_for(f.name or "")
        folder = isinstance(f.data, Path) and f.data.is_dir()
        if f.fmt and f.fmt.lower() not in FORMATS:
            errors.append(RowError(None, None, f"unknown format {f.fmt!r}; expected one of {', '.join(FORMATS)}"))
        elif fmt is None and not folder:
            errors.append(
                RowError(
                    None,
                    None,
                    f"cannot tell the format of {f.name or 'the upload'!r}; pass the format ({FORMAT_NAMES})",
                )
            )
        if f.split is not None and split_name(f.split) is None:
            errors.append(
                RowError(None, None, f"unknown split {f.split!r}; expected train, validation (or val) or test")
            )
    given = [split_name(f.split) for f in files if f.split is not None]
    if len(files) > 1 and len(given) < len(files):
        errors.append(RowError(None, None, "several files: give each one's split (train, validation, test)"))
    if given and len(set(given)) != len(given):
        errors.append(RowError(None, None, f"a split is given twice: {[f.split for f in files]}"))
    if given and None not in given and "train" not in given:
        errors.append(RowError(None, None, "one file per split needs a train file"))


def _read_tables(files: Sequence[DataFile], errors: list[RowError], warnings: list[str]) -> list[Table]:
    """Every file's rows; the upload limit applies to all files together."""
    settings = get_settings()
    limit, max_rows = settings.max_upload_bytes, settings.max_dataset_rows
    several = len(files) > 1
    tables: list[Table] = []
    for f in files:
        split = split_name(f.split) if f.split is not None else None
        source = file_label(f) if several else None
        used = sum(t.size for t in tables)
        if isinstance(f.data, Path) and f.data.is_dir():
            if not is_saved_dataset(f.data):
                errors.append(
                    RowError(
                        None,
                        None,
                        f"folder {f.data.name!r} is not a datasets.save_to_disk folder "
                        "(no state.json or dataset_dict.json)",
                    )
                )
                continue
            tables += read_saved_dataset(
                f.data, errors, warnings, split=split, max_rows=max_rows, max_bytes=limit - used
            )
            continue
        if isinstance(f.data, Path):
            size = f.data.stat().st_size
            if used + size > limit:
                raise DatasetValidationError(
                    [RowError(None, None, f"file is {size:,} bytes, over the {limit:,}-byte upload limit")]
                )
            raw = f.data.read_bytes()
        else:
            raw = _read_upload(f.data, limit - used)
        if used + len(raw) > limit:
            shown = f"{len(raw):,} bytes" if isinstance(f.data, (bytes, bytearray, memoryview)) else "larger than that"
            message = f"file is over the {limit:,}-byte upload limit ({shown})"
            raise DatasetValidationError([RowError(None, None, message, source)])
        fmt = (f.fmt or "").lower() or format_for(f.name or "") or "jsonl"
        tables.append(read_bytes(raw, fmt, errors, source=source, split=split, max_rows=max_rows, max_bytes=limit))
    return tables


def file_label(f: DataFile) -> str:
    """How messages name one of several files: "b.csv (validation)"."""
    return f"{f.name} ({f.split})" if f.name and f.split else (f.name or f.split or "upload")


def _check_columns(
    tables: list[Table],
    required: list[str],
    fields: list[str],
    label_field: str,
    id_field: str | None,
    errors: list[RowError],
) -> bool:
    """One error per file that lacks a needed column, naming it and the columns the file has; False then."""
    ok = True
    role = {
        **{f: "text field" for f in fields},
        label_field: "label field",
        **({id_field: "id field"} if id_field else {}),
    }
    for table in tables:
        if not table.columns:
            continue
        missing = [c for c in required if c not in table.columns]
        if missing:
            listed = ", ".join(f"{c!r} ({role[c]})" for c in missing)
            present = ", ".join(table.columns[:50]) + (", ..." if len(table.columns) > 50 else "")
            where = "header has" if table.header_line is not None else "the rows have"
            errors.append(
                table.error(table.header_line, None, f"{where} no column(s) {listed}; columns present: {present}")
            )
            ok = False
    return ok


def _split_column(tables: list[Table], split_field: str | None, required: list[str], warnings: list[str]) -> str | None:
    """The column that gives each row's split, when there is one and the files do not give the splits."""
    if not split_field or split_field in required or not any(split_field in t.columns for t in tables):
        return None
    if any(t.split for t in tables):
        warnings.append(f"the {split_field!r} column is ignored: the files give the splits")
        return None
    return split_field


def _check_rows(
    tables: list[Table],
    fields: list[str],
    keys: list[str],
    label_field: str,
    id_field: str | None,
    split_column: str | None,
    errors: list[RowError],
) -> tuple[list[ParsedRow], list[tuple[Table, int, str]]]:
    """(rows without problems, (table, line, label) of every row whose label could be read)."""
    rows: list[ParsedRow] = []
    labelled: list[tuple[Table, int, str]] = []
    seen_ids: dict[tuple[str | None, str], int] = {}
    position = 0
    for table in tables:
        for line, record in table.records:
            row = _check_row(
                table,
                line,
                record,
                fields,
                keys,
                label_field,
                id_field,
                split_column,
                str(position),
                seen_ids,
                labelled,
                errors,
            )
            position += 1
            if row is not None:
                rows.append(row)
    return rows, labelled


def _check_row(
    table: Table,
    line: int,
    record: dict[str, Any],
    fields: list[str],
    keys: list[str],
    label_field: str,
    id_field: str | None,
    split_column: str | None,
    default_id: str,
    seen_ids: dict[tuple[str | None, str], int],
    labelled: list[tuple[Table, int, str]],
    errors: list[RowError],
) -> ParsedRow | None:
    def problem(column: str | None, message: str) -> None:
        errors.append(table.error(line, column, message))

    ok = True
    texts: dict[str, str] = {}
    for column, key in zip(fields, keys, strict=True):
        if column not in record or record[column] is None:
            problem(column, "missing field")
            ok = False
            continue
        value = _scalar(record[column])
        if value is None:
            problem(column, f"expected text, got {type(record[column]).__name__}")
            ok = False
        elif not normalise(value):
            problem(column, "empty text")
            ok = False
        else:
            texts[key] = value
    raw_label = record.get(label_field)
    label = _scalar(raw_label)
    if raw_label is None or (label is not None and not label.strip()):
        problem(label_field, "missing label")
        ok = False
    elif label is None:
        problem(label_field, f"label must be a string or an integer, got {type(raw_label).__name__}")
        ok = False
    else:
        label = label.strip()
        labelled.append((table, line, label))
    split = table.split
    if split_column is not None:
        raw_split = _scalar(record.get(split_column))
        split = split_name(raw_split) if raw_split else None
        if not raw_split or not raw_split.strip():
            problem(split_column, "missing split (train, validation or test)")
            ok = False
        elif split is None:
            problem(split_column, f"unknown split {raw_split.strip()!r}; expected train, validation (or val) or test")
            ok = False
    row_id = default_id
    if id_field is not None:
        value = _scalar(record.get(id_field))
        if value is None or not value.strip():
            problem(id_field, "missing id")
            ok = False
        else:
            row_id = value.strip()
            if (split, row_id) in seen_ids:  # ids need only be unique within a split given by the user
                problem(id_field, f"duplicate id {row_id!r} (first on line {seen_ids[split, row_id]})")
                ok = False
            else:
                seen_ids[split, row_id] = line
    return ParsedRow(line, row_id, texts, str(label), split, table.source) if ok else None


def _resolve_labels(
    labelled: list[tuple[Table, int, str]],
    label_names: Sequence[str] | None,
    label_field: str,
    errors: list[RowError],
) -> tuple[list[str], dict[str, int]]:
    """The label names and a map from the labels as written to their index; unknown labels reported."""
    present = {label for _, _, label in labelled}
    if label_names is None:
        names = _sort_labels(present)
        return names, {n: i for i, n in enumerate(names)}
    names = list(label_names)
    index = {n: i for i, n in enumerate(names)}
    if present and not present & set(names) and all(re.fullmatch(r"-?\d+", x) for x in present):
        index = {str(i): i for i in range(len(names))}  # integer labels index the given names
    expected = ", ".join(index) if len(index) <= 20 else ", ".join(list(index)[:20]) + ", ..."
    for table, line, label in labelled:
        if label not in index:
            hint = " (-1 marks an unlabelled row in Hugging Face datasets: drop those rows)" if label == "-1" else ""
            errors.append(table.error(line, label_field, f"unknown label {label!r}; expected one of {expected}{hint}"))
    return names, index


def _check_template(
    template: str, keys: list[str], rows: list[ParsedRow], errors: list[RowError], user_given: bool
) -> None:
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
            errors.append(RowError(row.line, "template", str(exc), row.source))
            failed += 1
            if failed >= MAX_SHOWN:
                break


# ---------------------------------------------------------------------------------------------- storage


def _root() -> Path:
    return get_settings().user_tasks


def user_task_exists(name: str) -> bool:
    """Whether a user task folder named `name` exists (loadable or not)."""
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None and (_root() / name).exists()


def import_dataset(
    path: str | Path | None = None,
    name: str | None = None,
    text_fields: Sequence[str] | str = TEXT_FIELD,
    label_field: str = LABEL_FIELD,
    template: str | None = None,
    label_names: Sequence[str] | None = None,
    id_field: str | None = None,
    fmt: str | None = None,
    *,
    splits: Mapping[str, str | Path] | None = None,
    split_field: str | None = SPLIT_FIELD,
    overwrite: bool = False,
    description: str | None = None,
) -> Task:
    """Validate a file or `save_to_disk` folder (or one file per split) and register it as task `name`
    (default: from the file name); DatasetValidationError when any row is bad."""
    if name is None:
        first = path if path is not None else next(iter((splits or {}).values()), None)
        name = default_task_name(first) if first is not None else ""
    parsed = validate_dataset_paths(
        path,
        text_fields,
        label_field,
        template,
        label_names,
        id_field,
        fmt,
        splits=splits,
        name=name,
        split_field=split_field,
    )
    return register_dataset(parsed, name, overwrite=overwrite, description=description)


def _split_rows(parsed: ParsedDataset, name: str) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """The stored splits and how they were made: the user's (val or test carved from train when missing),
    or 80/10/10 stratified by label (seed 0)."""
    labels = parsed.labels()
    groups = [normalise(" ".join(row.texts.values())).lower() for row in parsed.rows]
    given = {s: [i for i, r in enumerate(parsed.rows) if r.split == s] for s in SPLITS} if parsed.split_source else {}
    origin = "the split column" if parsed.split_source == "column" else "the files (one per split)"
    if not given:
        parts: tuple[list[int], ...] = three_way(labels, (0.8, 0.1, 0.1), SEED, groups)
        note = "train/val/test carved 80/10/10, stratified by label (seed 0)"
    elif not (given["val"] or given["test"]):  # only train rows: they are the whole dataset
        train = given["train"]
        cut = three_way([labels[i] for i in train], (0.8, 0.1, 0.1), SEED, [groups[i] for i in train])
        parts = tuple([train[i] for i in part] for part in cut)
        note = f"only train given by {origin}; train/val/test carved from it 80/10/10, stratified by label (seed 0)"
    else:
        parts = (given["train"], given["val"], given["test"])
        note = f"train/val/test as given by {origin}"
        missing = "val" if not given["val"] else "test" if not given["test"] else None
        if missing:
            train = given["train"]
            kept, held = carve_val([labels[i] for i in train], 0.1, SEED, [groups[i] for i in train])
            rest, carved = [train[i] for i in kept], [train[i] for i in held]
            parts = (rest, carved, given["test"]) if missing == "val" else (rest, given["val"], carved)
            kept_name = "test" if missing == "val" else "val"
            note = f"train and {kept_name} as given by {origin}; {missing} carved from train (10%, stratified, seed 0)"
    stored = {
        split: [
            {"id": f"{name}/{split}/{parsed.rows[i].id}", "fields": parsed.rows[i].texts, "label": labels[i]}
            for i in index
        ]
        for split, index in zip(SPLITS, parts, strict=True)
    }
    return stored, note


def register_dataset(
    parsed: ParsedDataset, name: str, *, overwrite: bool = False, description: str | None = None
) -> Task:
    """Split (the user's splits, else 80/10/10 stratified, seed 0) and store `parsed` as user task `name`,
    atomically; with `overwrite` an existing user task of that name is replaced."""
    errors: list[RowError] = []
    validate_name(name, errors)
    if errors:
        raise DatasetValidationError(errors)
    root = _root()
    target = root / name
    if target.exists() and not overwrite:
        raise TaskExistsError(
            [RowError(None, "name", f"a task named {name!r} already exists (--overwrite replaces it)")]
        )
    splits, split_note = _split_rows(parsed, name)
    lengths = {k: sum(len(r.texts[k]) for r in parsed.rows) for k in parsed.field_keys}
    source = parsed.source_name or "upload"
    spec = {
        "version": SPEC_VERSION,
        "name": name,
        "template": parsed.template,
        "choices": parsed.label_names,
        "label_names": parsed.label_names,
        "truncate_field": max(lengths, key=lengths.__getitem__),
        "description": description or f"User dataset {source} ({len(parsed.rows)} rows, {parsed.fmt}); {split_note}.",
        "text_fields": parsed.text_fields,
        "field_keys": parsed.field_keys,
        "label_field": parsed.label_field,
        "id_field": parsed.id_field,
        "format": parsed.fmt,
        "source": source,
        "sha256": parsed.sha256,
        "label_counts": parsed.label_counts(),
        "sizes": {k: len(v) for k, v in splits.items()},
        "split_source": parsed.split_source or "carved",
        "splits_note": split_note,
        "warnings": parsed.warnings,
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
        name=spec["name"],
        template=spec["template"],
        choices=list(spec["choices"]),
        loader=load,
        label_names=list(spec["label_names"]),
        truncate_field=spec.get("truncate_field"),
        description=spec.get("description", ""),
        source="user",
        field_names=keys,
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
        raise UserTaskError(
            f"{problem}: its {SPEC_FILE} is unreadable ({exc.strerror or type(exc).__name__})"
        ) from None
    except KeyError as exc:
        raise UserTaskError(f"{problem}: its {SPEC_FILE} has no {exc.args[0]!r}") from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise UserTaskError(f"{problem}: {exc}") from None
    _cache[name] = (stamp, task)
    return task


@dataclass(frozen=True)
class SkippedTask:
    """A folder under the user task directory that is not listed as a task, and why."""

    name: str
    reason: str


def scan_user_tasks() -> tuple[list[Task], list[SkippedTask]]:
    """(every loadable user task sorted by name, the folders skipped with the reason). Hidden folders (imports
    and deletions in progress) are neither."""
    root = _root()
    if not root.is_dir():
        return [], []
    tasks: list[Task] = []
    skipped: list[SkippedTask] = []
    for folder in sorted(root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue
        name = folder.name
        if not NAME_RE.fullmatch(name):
            skipped.append(SkippedTask(name, "not a valid task name (2-64 chars, a-z first, then a-z 0-9 _ -)"))
            continue
        if name in BUILTIN_TASKS:
            skipped.append(SkippedTask(name, "has the name of a built-in task, which takes precedence"))
            continue
        try:
            task = load_user_task(name)
        except UserTaskError as exc:
            log.warning("skipping %s", exc)
            skipped.append(SkippedTask(name, str(exc)))
            continue
        if task is None:
            skipped.append(SkippedTask(name, f"no {SPEC_FILE} (not an imported task)"))
        else:
            tasks.append(task)
    return tasks, skipped


def list_user_tasks() -> list[Task]:
    """Every stored user task, sorted by name (folders that cannot be loaded are skipped: scan_user_tasks)."""
    return scan_user_tasks()[0]


def delete_user_task(name: str) -> None:
    """Remove user task `name`, loadable or not (ValueError when there is none; built-in tasks cannot be deleted)."""
    if name in BUILTIN_TASKS:
        raise ValueError(f"{name!r} is a built-in task and cannot be deleted")
    folder = _root() / name
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or not folder.is_dir():
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
