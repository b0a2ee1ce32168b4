"""Query results as text: an aligned table for people, JSON and CSV for scripts, and the
JSON document `POST /v1/query` answers with. Pure.

JSON is an array of objects (column -> value); timestamps are ISO 8601, decimals are
numbers, bytes are base64, lists and structs stay nested, integers beyond 64 bits are
strings. CSV has a header row and uses the same conversions, with nested values written
as JSON. `result_doc` / `result_from_doc` are the wire form of a `QueryResult` (columns,
types, rows as arrays of those values), so the CLI renders a daemon's answer exactly as it
renders a local one.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import io
import json
import uuid
from typing import Any

from projections.query.defaults import FORMATS
from projections.query.query import QueryResult

_MAX_CELL = 60


_INT_RANGE = range(-(2**63), 2**64)


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | float):
        return value
    if isinstance(value, int):
        return value if value in _INT_RANGE else str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    plain = _plain(value)
    text = json.dumps(plain, ensure_ascii=False) if isinstance(plain, dict | list) else str(plain)
    text = text.replace("\n", "\\n")
    return text if len(text) <= _MAX_CELL else text[: _MAX_CELL - 1] + "…"


def render_table(result: QueryResult) -> str:
    """Columns padded to their widest cell; numbers right-aligned; a row count footer."""
    header = result.columns
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    numeric = [
        all(
            isinstance(row[i], int | float | decimal.Decimal) or row[i] is None
            for row in result.rows
        )
        and bool(result.rows)
        for i in range(len(header))
    ]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return " | ".join(parts).rstrip()

    out = [line(header), "-+-".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells)
    more = " (truncated: more rows than the row limit)" if result.truncated else ""
    out.append(f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''}){more}")
    return "\n".join(out) + "\n"


def render_json(result: QueryResult) -> str:
    rows = [dict(zip(result.columns, (_plain(v) for v in row), strict=True)) for row in result.rows]
    return json.dumps(rows, ensure_ascii=False) + "\n"


def render_csv(result: QueryResult) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(result.columns)
    for row in result.rows:
        plain = [_plain(v) for v in row]
        writer.writerow(
            "" if v is None else json.dumps(v) if isinstance(v, dict | list) else v for v in plain
        )
    return buf.getvalue()


def render(result: QueryResult, fmt: str) -> str:
    """`fmt` is one of FORMATS."""
    if fmt == "json":
        return render_json(result)
    if fmt == "csv":
        return render_csv(result)
    if fmt == "table":
        return render_table(result)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def result_doc(result: QueryResult) -> dict[str, Any]:
    """The JSON-able answer of `POST /v1/query`: `columns`, `types` (DuckDB's names),
    `rows` (arrays, values as in `render_json`), `row_count`, `truncated`, `elapsed_s` and
    `seq` (the projection's watermark the statement saw)."""
    return {
        "columns": result.columns,
        "types": result.types,
        "rows": [[_plain(v) for v in row] for row in result.rows],
        "row_count": len(result.rows),
        "truncated": result.truncated,
        "elapsed_s": round(result.elapsed_s, 6),
        "seq": result.seq,
    }


def row_doc(columns: list[str], row: tuple[Any, ...]) -> dict[str, Any]:
    """One row as a JSON-able object (column -> value, as in `render_json`)."""
    return {c: _plain(v) for c, v in zip(columns, row, strict=True)}


def result_from_doc(doc: dict[str, Any]) -> QueryResult:
    """A `QueryResult` from `result_doc`'s form. Raises ValueError if `doc` is not one."""
    try:
        return QueryResult(
            columns=[str(c) for c in doc["columns"]],
            types=[str(t) for t in doc.get("types") or ["" for _ in doc["columns"]]],
            rows=[tuple(row) for row in doc["rows"]],
            truncated=bool(doc["truncated"]),
            elapsed_s=float(doc.get("elapsed_s") or 0.0),
            seq=doc.get("seq"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not a query result: {e!r}") from e
