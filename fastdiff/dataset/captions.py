"""Caption sets in the formats they come in: a text file (one caption per line), JSONL, CSV/TSV
or parquet.

A caption's index is its row in the source (line for text and JSONL, data row for CSV/TSV and
parquet, counting from 0), so its seeds stay tied to the row whatever else the file holds.
Empty rows get no images; they and duplicated captions are reported (`Captions.report()`,
stats.json), never dropped silently. A duplicate is generated like any other row: it has its
own index and so its own seeds.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field

FORMATS = ("txt", "jsonl", "csv", "tsv", "parquet")
FIELDS = ("caption", "text")  # looked for in this order when no column is named
EXAMPLES = 10  # rows named in a report


@dataclass
class Captions:
    """The usable captions: `texts[k]` is row `indices[k]` of the source."""

    indices: list[int]
    texts: list[str]
    rows: int  # rows in the source, empty ones included
    source: str = ""
    format: str = ""
    empty: list[int] = field(default_factory=list)  # rows with no caption
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (row, row of its first occurrence)

    def __len__(self) -> int:
        return len(self.texts)

    def sha256(self) -> str:
        """Identifies the caption set by content (rows and texts), not by file name."""
        h = hashlib.sha256()
        for i, t in zip(self.indices, self.texts):
            h.update(json.dumps([i, t], ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()

    def report(self) -> list[str]:
        """Lines for a person: how many rows, and which were empty or repeated."""
        lines = [f"{self.source or 'captions'}: {self.rows} rows, {len(self)} captions"]
        if self.empty:
            rows = ", ".join(str(r) for r in self.empty[:EXAMPLES])
            more = f" and {len(self.empty) - EXAMPLES} more" if len(self.empty) > EXAMPLES else ""
            lines.append(f"  {len(self.empty)} empty rows get no images (rows {rows}{more})")
        if self.duplicates:
            pairs = ", ".join(f"{r} = {f}" for r, f in self.duplicates[:EXAMPLES])
            more = f" and {len(self.duplicates) - EXAMPLES} more" if len(self.duplicates) > EXAMPLES else ""
            lines.append(f"  {len(self.duplicates)} rows repeat an earlier caption and are generated with "
                         f"their own seeds (row = first row: {pairs}{more})")
        return lines

    def summary(self) -> dict:
        return {"source": self.source, "format": self.format, "rows": self.rows, "captions": len(self),
                "empty": len(self.empty), "empty_rows": self.empty[:1000],
                "duplicates": len(self.duplicates), "duplicate_rows": [list(d) for d in self.duplicates[:1000]]}


def from_rows(values, *, source: str = "", format: str = "") -> Captions:
    """Row values (str or None) -> Captions, with empty and duplicate rows found."""
    indices, texts, empty, dups, first = [], [], [], [], {}
    n = 0
    for n, v in enumerate(values, 1):
        row = n - 1
        text = "" if v is None else str(v).strip()
        if not text:
            empty.append(row)
            continue
        if text in first:
            dups.append((row, first[text]))
        else:
            first[text] = row
        indices.append(row)
        texts.append(text)
    return Captions(indices, texts, n, source, format, empty, dups)


def detect_format(path: str) -> str:
    name = path.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".csv", "csv"), (".tsv", "tsv"),
                        (".parquet", "parquet"), (".pq", "parquet")):
        if name.endswith(suffix):
            return fmt
    return "txt"


def read_captions(path, *, format: str | None = None, column: str | None = None) -> Captions:
    """Read a caption file. `format` (default: from the extension; anything unknown is text):
    txt | jsonl | csv | tsv | parquet. `column`: the caption field or column (default: `caption`,
    else `text`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file {path} does not exist")
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"caption format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    values = {"txt": _text_rows, "jsonl": _jsonl_rows, "csv": _csv_rows, "tsv": _csv_rows,
              "parquet": _parquet_rows}[fmt](path, column, fmt)
    return from_rows(values, source=path, format=fmt)


def _text_rows(path, column, fmt):
    if column is not None:
        raise ValueError(f"{path}: a text file has no columns (one caption per line); column={column!r}")
    with open(path, encoding="utf-8") as f:
        # splitlines(), not iteration: a caption file from Windows has \r\n, and a lone \r is a break too
        return f.read().splitlines()


def _pick(names, column, path):
    if column is not None:
        if column not in names:
            raise ValueError(f"{path}: no column {column!r}; it has {', '.join(map(str, names)) or 'none'}")
        return column
    for name in FIELDS:
        if name in names:
            return name
    lower = {str(n).lower(): n for n in names}
    for name in FIELDS:
        if name in lower:
            return lower[name]
    raise ValueError(f"{path}: no 'caption' or 'text' column (it has {', '.join(map(str, names)) or 'none'}); "
                     "name the column with --caption-column")


def _jsonl_rows(path, column, fmt):
    values = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                values.append(None)
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n} is not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}: line {n} is not a JSON object")
            key = _pick(list(record), column, f"{path}: line {n}")
            value = record[key]
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{path}: line {n}: {key!r} is not a string")
            values.append(value)
    return values


def _csv_rows(path, column, fmt):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
        header = next(reader, None)
        if header is None:
            return []
        col = header.index(_pick(header, column, path))
        return [row[col] if col < len(row) else None for row in reader]


def _parquet_rows(path, column, fmt):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading parquet captions needs pyarrow: pip install 'fastdiff[dataset]'") from None
    names = pq.read_schema(path).names
    col = _pick(names, column, path)
    values = pq.read_table(path, columns=[col]).column(0).to_pylist()
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise ValueError(f"{path}: column {col!r} holds {type(bad).__name__} values, not strings")
    return values
