"""Reading a dataset file into rows: JSON lines, a JSON array of objects, CSV, TSV, Parquet, an Arrow stream,
or a folder written by `datasets.save_to_disk` (read with pyarrow; the `datasets` package is not needed).

Every reader returns a `Table` (rows with their 1-based line, or row number for Parquet/Arrow, and the columns
seen) and appends what it cannot read to `errors`; the checks of the values are the caller's.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.ml.tasks.import_errors import RowError

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "arrow")
SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
}
SPLIT_NAMES = {"train": "train", "validation": "val", "val": "val", "test": "test"}  # as written -> stored
MAX_INT_DIGITS = 1000  # a longer integer in a JSON row is refused (Python refuses to convert > 4300)
EXPANSION = 20  # a Parquet/Arrow file may hold at most this many times the upload limit once decompressed


@dataclass
class Table:
    """The rows of one file (or one split of a saved dataset)."""

    records: list[tuple[int, dict[str, Any]]]
    columns: list[str]
    fmt: str
    sha256: str
    source: str | None = None  # the name used in messages when several files were given
    split: str | None = None  # the split of every row (train, val, test) when given by the file
    header_line: int | None = None  # CSV/TSV: the header's line
    unit: str = "line"  # "row" for Parquet/Arrow
    class_labels: dict[str, list[str]] = field(default_factory=dict)  # column -> names (Hugging Face ClassLabel)
    size: int = 0

    def error(self, line: int | None, column: str | None, message: str) -> RowError:
        return RowError(line, column, message, self.source, self.unit)


def format_for(name: str) -> str | None:
    """The format a file name's suffix implies (None: unknown)."""
    suffix = Path(name).suffix.lower()
    return SUFFIX_FORMATS.get(suffix)


def split_name(value: str) -> str | None:
    """train / validation / val / test (any case) as stored (train, val, test); None for anything else."""
    return SPLIT_NAMES.get(value.strip().lower())


def read_bytes(
    raw: bytes,
    fmt: str,
    errors: list[RowError],
    *,
    source: str | None = None,
    split: str | None = None,
    max_rows: int | None = None,
    max_bytes: int | None = None,
) -> Table:
    """The rows of an uploaded file in format `fmt` (one of FORMATS)."""
    table = Table([], [], fmt, hashlib.sha256(raw).hexdigest(), source, split, size=len(raw))
    if fmt in ("parquet", "arrow"):
        table.unit = "row"
        _read_columnar(raw, table, errors, max_rows, max_bytes)
        return table
    lines = _decode_lines(raw, table, errors)
    if fmt == "json" and _looks_like_array(lines):
        _json_array_records(lines, table, errors)
    elif fmt in ("jsonl", "json"):
        _jsonl_records(lines, table, errors, fmt)
    else:
        _csv_records(lines, "\t" if fmt == "tsv" else ",", table, errors, max_bytes)
    return table


# ---------------------------------------------------------------------------------------------- text formats


def _decode_lines(data: bytes, table: Table, errors: list[RowError]) -> list[str]:
    """Lines split on b'\\n' (ends kept); each line not valid UTF-8 is reported and decoded with U+FFFD."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.append(
                table.error(number, None, f"not valid UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1})")
            )
            text = raw.decode("utf-8", errors="replace")
        out.append(text + "\n")
    if out and out[-1] == "\n":  # the split after a final newline
        out.pop()
    return out


class _LongInteger(ValueError):
    pass


def parse_int(text: str) -> int:
    """int(text), refusing integers of more than MAX_INT_DIGITS digits (json's parse_int)."""
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise _LongInteger(
            f"an integer with {digits:,} digits (at most {MAX_INT_DIGITS:,}; quote it to keep it as text)"
        )
    return int(text)


def json_problem(exc: Exception) -> str:
    """Why a JSON text could not be read, in a few words."""
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON: {exc.msg} at column {exc.colno}"
    if isinstance(exc, _LongInteger):
        return f"unreadable JSON: {exc}"
    if isinstance(exc, RecursionError):
        return "unreadable JSON: nested too deeply"
    return f"unreadable JSON: {str(exc).split(';')[0][:200]}"


def _add_record(table: Table, line: int, obj: Any, errors: list[RowError], hint: str = "") -> None:
    if not isinstance(obj, dict):
        errors.append(table.error(line, None, f"expected a JSON object, got {type(obj).__name__}{hint}"))
        return
    for key in obj:
        if key not in table.columns and len(table.columns) < 10_000:
            table.columns.append(key)
    table.records.append((line, obj))


def _jsonl_records(lines: list[str], table: Table, errors: list[RowError], fmt: str) -> None:
    decoder = json.JSONDecoder(parse_int=parse_int)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = decoder.decode(line)
        except (ValueError, RecursionError) as exc:
            errors.append(table.error(number, None, json_problem(exc)))
            continue
        hint = ""
        if isinstance(obj, list) and fmt == "jsonl":
            hint = " (for a file holding one JSON array of objects, name it .json or pass the format json)"
        _add_record(table, number, obj, errors, hint)


def _looks_like_array(lines: list[str]) -> bool:
    for line in lines:
        if line.strip():
            return line.lstrip().startswith("[")
    return False


def _json_array_records(lines: list[str], table: Table, errors: list[RowError]) -> None:
    """A JSON array of objects, each row numbered by the line its object starts on."""
    text = "".join(lines)
    decoder = json.JSONDecoder(parse_int=parse_int)
    pos, line, counted = text.index("[") + 1, 1, 0

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    pos = skip(pos)
    if pos < len(text) and text[pos] == "]":
        pos = skip(pos + 1)
    else:
        while True:
            try:
                obj, end = decoder.raw_decode(text, pos)
            except (ValueError, RecursionError) as exc:
                where = line_at(exc.pos) if isinstance(exc, json.JSONDecodeError) else line_at(pos)
                errors.append(table.error(where, None, json_problem(exc)))
                return
            _add_record(table, line_at(pos), obj, errors)
            pos = skip(end)
            if pos < len(text) and text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos = skip(pos + 1)
                break
            errors.append(
                table.error(line_at(min(pos, len(text))), None, "malformed JSON: expected ',' or ']' in the array")
            )
            return
    if pos < len(text):
        errors.append(table.error(line_at(pos), None, "malformed JSON: extra data after the array"))


def _csv_records(lines: list[str], delimiter: str, table: Table, errors: list[RowError], max_bytes: int | None) -> None:
    if max_bytes:
        csv.field_size_limit(max(csv.field_size_limit(), max_bytes))  # long texts are fine
    reader = csv.reader(iter(lines), delimiter=delimiter)
    header: list[str] | None = None
    previous = 0
    try:
        for cells in reader:
            start, previous = previous + 1, reader.line_num
            if not any(c.strip() for c in cells):
                continue
            if header is None:
                header = [c.strip() for c in cells]
                table.columns, table.header_line = list(dict.fromkeys(header)), start
                continue
            if len(cells) != len(header):
                errors.append(
                    table.error(start, None, f"expected {len(header)} columns, got {len(cells)} (check the quoting)")
                )
                continue
            table.records.append((start, dict(zip(header, cells, strict=True))))
    except csv.Error as exc:
        errors.append(table.error(previous + 1, None, f"unreadable {table.fmt.upper()}: {exc}"))


# ---------------------------------------------------------------------------------------------- Parquet, Arrow


def _class_labels(features: Any) -> dict[str, list[str]]:
    """{column: names} of the Hugging Face ClassLabel features in a `features` JSON object."""
    if not isinstance(features, dict):
        return {}
    out = {}
    for column, feature in features.items():
        if isinstance(feature, dict) and feature.get("_type") == "ClassLabel":
            names = feature.get("names")
            if isinstance(names, list) and all(isinstance(n, str) for n in names):
                out[str(column)] = names
    return out


def _schema_class_labels(schema: Any) -> dict[str, list[str]]:
    """ClassLabel names from the b"huggingface" schema metadata that `datasets` writes into its files."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return {}
    try:
        info = json.loads(meta)
    except (ValueError, RecursionError):
        return {}
    return _class_labels(((info or {}).get("info") or {}).get("features")) if isinstance(info, dict) else {}


def _arrow_table(raw: bytes) -> Any:
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.BufferReader(raw)).read_all()  # what `datasets` writes
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.BufferReader(raw)).read_all()


def _read_columnar(
    raw: bytes, table: Table, errors: list[RowError], max_rows: int | None, max_bytes: int | None
) -> None:
    """Parquet or Arrow IPC bytes; the row count and decompressed size are checked before the rows are built."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = "Parquet" if table.fmt == "parquet" else "Arrow"
    try:
        if table.fmt == "parquet":
            meta = pq.ParquetFile(pa.BufferReader(raw)).metadata
            decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
            if max_bytes and decoded > EXPANSION * max_bytes:
                errors.append(
                    table.error(
                        None,
                        None,
                        f"{kind} file decompresses to {decoded:,} bytes, over {EXPANSION} times the upload limit",
                    )
                )
                return
            if max_rows is not None and meta.num_rows > max_rows:
                errors.append(table.error(None, None, f"{meta.num_rows:,} rows is over the {max_rows:,}-row limit"))
                return
            data = pq.read_table(pa.BufferReader(raw))
        else:
            data = _arrow_table(raw)
    except (pa.ArrowException, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        errors.append(table.error(None, None, f"unreadable {kind} file: {reason}"))
        return
    add_arrow(data, table, errors, max_rows, max_bytes)


def add_arrow(data: Any, table: Table, errors: list[RowError], max_rows: int | None, max_bytes: int | None) -> None:
    """Append the rows of a pyarrow Table, numbered on from the rows already there."""
    if max_rows is not None and len(table.records) + data.num_rows > max_rows:
        errors.append(
            table.error(None, None, f"{len(table.records) + data.num_rows:,} rows is over the {max_rows:,}-row limit")
        )
        return
    if max_bytes and data.nbytes > EXPANSION * max_bytes:
        errors.append(
            table.error(
                None, None, f"the data takes {data.nbytes:,} bytes in memory, over {EXPANSION} times the upload limit"
            )
        )
        return
    for column in data.column_names:
        if column not in table.columns:
            table.columns.append(column)
    table.class_labels.update(_schema_class_labels(data.schema))
    start = len(table.records) + 1
    table.records.extend(enumerate(data.to_pylist(), start=start))


# ---------------------------------------------------------------------------------------------- save_to_disk


def is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _shards(folder: Path) -> list[Path]:
    """The Arrow files of one saved Dataset, in order (state.json's list, else sorted *.arrow)."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return sorted(folder.glob("*.arrow"))
    return [folder / Path(str(n)).name for n in names]  # a bare name: never outside the folder


def _read_saved_split(
    folder: Path,
    errors: list[RowError],
    source: str | None,
    split: str | None,
    max_rows: int | None,
    max_bytes: int | None,
) -> Table:
    import pyarrow as pa

    digest = hashlib.sha256()
    table = Table([], [], "arrow", "", source, split, unit="row")
    shards = _shards(folder)
    if not shards:
        errors.append(table.error(None, None, "no .arrow files in the saved dataset"))
    try:
        info = json.loads((folder / "dataset_info.json").read_text(encoding="utf-8"))
        table.class_labels.update(_class_labels(info.get("features")) if isinstance(info, dict) else {})
    except (OSError, ValueError, RecursionError):
        pass
    for shard in shards:
        try:
            raw = shard.read_bytes()
            digest.update(hashlib.sha256(raw).digest())
            table.size += len(raw)
            if max_bytes and table.size > max_bytes:
                errors.append(table.error(None, None, f"the saved dataset is over the {max_bytes:,}-byte upload limit"))
                break
            add_arrow(_arrow_table(raw), table, errors, max_rows, max_bytes)
        except OSError as exc:
            errors.append(table.error(None, None, f"cannot read {shard.name}: {exc.strerror or type(exc).__name__}"))
        except (pa.ArrowException, ValueError) as exc:  # a damaged file
            errors.append(table.error(None, None, f"unreadable Arrow file {shard.name}: {str(exc)[:200]}"))
    table.sha256 = digest.hexdigest()
    return table


def read_saved_dataset(
    folder: Path,
    errors: list[RowError],
    warnings: list[str],
    *,
    split: str | None = None,
    max_rows: int | None = None,
    max_bytes: int | None = None,
) -> list[Table]:
    """The tables of a `save_to_disk` folder: one per split of a DatasetDict (train/validation/test; others are
    skipped with a warning), or one for a single Dataset (its rows in `split` when given)."""
    dict_file = folder / "dataset_dict.json"
    if not dict_file.is_file():
        return [_read_saved_split(folder, errors, None if split is None else folder.name, split, max_rows, max_bytes)]
    if split is not None:
        errors.append(
            RowError(
                None,
                None,
                f"{folder.name} holds several splits (a DatasetDict); give it as the dataset, not as one split",
            )
        )
        return []
    try:
        names = json.loads(dict_file.read_text(encoding="utf-8"))["splits"]
        assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        errors.append(RowError(None, None, "dataset_dict.json does not list the splits"))
        return []
    tables: list[Table] = []
    for name in names:
        stored = split_name(name)
        if stored is None:
            warnings.append(
                f"split {name!r} of the saved dataset skipped (only train, validation and test are imported)"
            )
            continue
        if any(t.split == stored for t in tables):
            errors.append(RowError(None, None, f"the saved dataset has two {stored} splits"))
            continue
        subfolder = folder / Path(name).name
        tables.append(_read_saved_split(subfolder, errors, name, stored, max_rows, max_bytes))
    return tables
