"""Reading tables of labelled texts (CSV, TSV, JSONL/JSON, Parquet) with 🤗 ``datasets``:
each file's format from its suffix, each bad row named. Used by ``data=files`` and
``eval.py``, without Lightning."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from gpt_classifier.data.sms import DataFormatError, Message
from gpt_classifier.extras import import_extra
from gpt_classifier.files import UTF8_BOM, ZIP_MAGIC, first_bad_utf8

# Suffix: (datasets builder, its options).
READERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}
SPREADSHEETS = (".xlsx", ".xls", ".xlsm", ".ods", ".numbers")
SHOWN = 10  # rows named in an error, at most


def read_table(path: Path, key: str):  # -> datasets.Dataset
    """One file as a ``datasets.Dataset``, its format taken from its suffix."""
    datasets = import_extra("datasets", "data", f"{key}={path}")
    suffix = path.suffix.lower()
    spreadsheet = "a spreadsheet: save it as CSV UTF-8, or pd.read_excel(path).to_csv(...)"
    if suffix not in READERS:
        fix = spreadsheet if suffix in SPREADSHEETS else "rename the file to say its format"
        raise DataFormatError(f"{key}={path}: the suffix {suffix or '(none)'!r} is not one of "
                              f"{', '.join(READERS)}; {fix}")  # fmt: skip
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(ZIP_MAGIC):  # .xlsx and .ods files are zip archives too
        raise DataFormatError(f"{key}={path} is a zip archive; unzip it and give the file, "
                              f"or, if it is {spreadsheet}")  # fmt: skip
    builder, options = READERS[suffix]
    if builder == "json" and head.startswith(UTF8_BOM):
        raise DataFormatError(f"{key}={path} starts with a UTF-8 byte-order mark, which JSON "
                              "readers refuse; re-save it as UTF-8 without BOM")  # fmt: skip
    if suffix != ".parquet" and (bad := first_bad_utf8(path)) is not None:
        # Caught here: the JSON reader keeps such bytes, to fail later on a row's text.
        raise DataFormatError(f"{key}={path}, line {bad[0]}: bytes {bad[1]!r} are not UTF-8; "
                              "re-save the file as UTF-8")  # fmt: skip
    if path.stat().st_size == 0:
        raise DataFormatError(f"{key}={path} is empty")
    if builder == "csv":  # Excel and Windows editors start CSV files with a BOM
        options = {**options, "encoding": "utf-8-sig", **_verbatim(path, options, key)}
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train", **options)
    except Exception as err:  # noqa: BLE001 - each reader raises its own kinds
        cause = err.__cause__ or err
        if "corresponds to no data" in str(cause):  # a header alone, or blank lines
            raise DataFormatError(f"{key}={path} has no rows") from err
        said = f"{type(cause).__name__}: {str(cause).strip()}"[:1500]
        if "Expected" in said and "fields in line" in said:  # pandas' words for an extra cell
            said += '; put a text that holds the separator in quotes ("a, b")'
        if suffix == ".jsonl" and (bad := _first_bad_json_line(path)):  # arrow counts by block
            said = f"line {bad[0]}: {bad[1]}"
        raise DataFormatError(f"{key}={path} could not be read as {suffix[1:]}: {said}") from err
    # One JSON object holding the rows (pandas' to_json writes its columns so by default).
    if builder == "json" and table.num_rows == 1 and _lists_only(table[0]):
        raise DataFormatError(
            f"{key}={path} is one JSON object ({', '.join(table.column_names)}), not a row "
            "per record: write a list of records, or JSON lines (pandas: "
            "df.to_json(path, orient='records', lines=True) into a .jsonl file)"
        )
    return table


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """The first line of a JSON-lines file that is not a JSON record, and why."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            try:
                value = json.loads(line) if line.strip() else {}
            except ValueError as err:
                return number, f"not JSON ({err})"
            if not isinstance(value, dict):
                kind = {str: "string", list: "array", bool: "boolean"}.get(type(value), "value")
                return number, (f"a JSON {kind}, not a record: write one object a line, such "
                                'as {"text": "...", "label": "..."}')  # fmt: skip
    return None


def _lists_only(row: dict[str, Any]) -> bool:
    return all(isinstance(value, list | dict) for value in row.values())


def _verbatim(path: Path, options: dict[str, Any], key: str) -> dict[str, Any]:
    """pandas options that keep every cell the string it is: no number parsing ('007' stays
    '007') and no missing-value words ('NA', 'null' and 'N/A' are texts and labels too)."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        header = next(
            (row for row in csv.reader(f, delimiter=options.get("delimiter", ",")) if row), []
        )
        f.seek(0)
        check_quoting(f, options.get("delimiter", ","), f"{key}={path}")
    check_header(header, f"{key}={path}")
    return {"converters": {i: str for i in range(len(header))}, "na_filter": False}


def check_quoting(lines: Iterable[str], delimiter: str, where: str) -> None:
    """A quote that opens a cell must close it: pandas reads a text that goes on after its
    closing quote without the quotes, and one never closed as the start of one text that
    takes in the following rows (Python's csv module too, unless strict), silently."""
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    start = 1  # the line the row being read starts on
    try:
        for _ in reader:
            start = reader.line_num + 1
    except csv.Error as err:
        if "end of data" in str(err):
            line, what = start, 'a quote (") opens a text that none closes: the rows after it'
            what += " would become part of it"
        else:
            line, what = reader.line_num, 'a text goes on after its closing quote ("): it would'
            what += " lose its quotes"
        raise DataFormatError(
            f"{where}, line {line}: {what}; put the whole text in quotes and double every quote"
            ' in it ("He said ""hi"""), as CSV writers do'
        ) from None


def check_header(header: Sequence[str], where: str) -> None:
    """A header naming a column twice is ambiguous: pandas would read a second 'text' as
    'text.1' (and Python's csv module keep only the last), and text_column=text one of them."""
    if twice := sorted({name for name in header if name and header.count(name) > 1}):
        raise DataFormatError(f"{where}: the header names {', '.join(map(repr, twice))} more "
                              "than once; give each column its own name")  # fmt: skip


def column_values(table: Any, column: str) -> list[Any]:
    """A column's values. A JSON column of mixed types (``1`` and ``"b"``) is a 🤗 ``Json``
    column, kept as JSON text: decoded here, or ``"b"`` would be a label with quotes."""
    values = table.data.column(column).to_pylist()
    if type(table.features[column]).__name__ == "Json":  # a type of recent datasets versions
        values = [None if value is None else json.loads(value) for value in values]
    return values


def read_rows(table: Any, source: str, text_columns: Sequence[str], label_column: str,
              separator: str = " ", keys: str = "data.") -> list[Message]:  # fmt: skip
    """The (label, text) rows of a table, every problem named by row and column (``keys``:
    where the column names were set, for the messages)."""
    columns = list(table.column_names)
    absent = [c for c in [*text_columns, label_column] if c not in columns]
    if absent:
        which = " and ".join(f"{keys}{key}_column" for key, names in
                             (("text", text_columns), ("label", [label_column]))
                             if any(n in absent for n in names))  # fmt: skip
        # No column found, and names with spaces: a file without a header row, whose first
        # row was taken for column names.
        headless = len(absent) == len(text_columns) + 1 and any(" " in str(c) for c in columns)
        hint = "; its first row looks like data: add a header row naming the columns"
        hint = hint if headless else ""
        if len(columns) == 1 and ";" in str(columns[0]):  # a CSV as European Excel saves it
            hint = "; the header is separated by ';': save the file with commas, or tabs as .tsv"
        raise DataFormatError(f"{source}: no column {absent} (set {which}); its columns "
                              f"are {columns}{hint}")  # fmt: skip
    feature = table.features[label_column]
    names = getattr(feature, "names", None)  # a ClassLabel keeps its names
    # Whole columns at once: iterating a Dataset formats a table per row.
    texts = [column_values(table, c) for c in text_columns]
    # Text columns of strings (the usual case): no row can hold a list or a record.
    strings = all(getattr(table.features[c], "dtype", None) in ("string", "large_string")
                  for c in text_columns)  # fmt: skip
    labels = column_values(table, label_column)
    problems: dict[str, list[int]] = {}
    rows = []
    for i, (label, *parts) in enumerate(zip(labels, *texts), start=1):
        if label is None or (isinstance(label, str) and not label.strip()):
            problems.setdefault(f"an empty {label_column!r}", []).append(i)
            continue
        if isinstance(label, list | dict):  # one class per row is what a classifier learns
            what = f"a list or record as {label_column!r} (multi-label data is not supported"
            problems.setdefault(f"{what}: give each row one label)", []).append(i)
            continue
        if names and not 0 <= label < len(names):  # -1: how 🤗 datasets hide a test set's labels
            what = (
                f"no label ({label_column!r} -1 or past the ClassLabel's {len(names)} names; "
                "for data=hf, data.split_names.test=null splits a test set off training)"
            )
            problems.setdefault(what, []).append(i)
            continue
        if None in parts:
            problems.setdefault(f"a null text ({', '.join(text_columns)})", []).append(i)
            continue
        if not strings and any(isinstance(part, list | dict) for part in parts):
            what = f"a list or record as text ({', '.join(text_columns)}): make it one string"
            problems.setdefault(what, []).append(i)
            continue
        text = separator.join(str(part) for part in parts)
        if not text.strip():
            problems.setdefault("an empty text", []).append(i)
            continue
        rows.append(Message(label=names[label] if names else str(label), text=text))
    if problems:
        said = "; ".join(
            f"{len(where)} row(s) with {what}: rows "
            + ", ".join(map(str, where[:SHOWN])) + (", ..." if len(where) > SHOWN else "")
            for what, where in problems.items()
        )  # fmt: skip
        raise DataFormatError(f"{source}: {said} (data rows counted from 1); fill or "
                              "remove them")  # fmt: skip
    if not rows:
        raise DataFormatError(f"{source} has no rows")
    return rows
