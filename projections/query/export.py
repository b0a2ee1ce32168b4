"""A table or a query's result written as Parquet or CSV, files any DuckDB, pandas, polars
or spreadsheet opens (the projection file itself opens only in a DuckDB as new as the
one that wrote it).

The query runs on the read-only, locked-down connection `open_readonly` gives (one SELECT,
no file or network access: `check_query`); its rows stream out as Arrow record batches and
are written by pyarrow to `<out>.tmp`, renamed over `out` once complete, so a failed
export leaves no half file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from projections.errors import QueryFailed, QueryRefused
from projections.query.defaults import EXPORT_FORMATS
from projections.query.query import check_query

_BATCH_ROWS = 65_536
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def relations(con: duckdb.DuckDBPyConnection) -> list[str]:
    """The projection's tables and views, by name."""
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
        "ORDER BY table_name"
    ).fetchall()
    return [str(r[0]) for r in rows]


def table_query(con: duckdb.DuckDBPyConnection, name: str) -> str:
    """`SELECT *` of the table or view `name`; QueryRefused naming the known ones else."""
    known = relations(con)
    if not _NAME.match(name) or name not in known:
        raise QueryRefused(f"no table or view {name!r} (there are: {', '.join(known)})")
    return f'SELECT * FROM "{name}"'


def format_of(out: Path, given: str | None) -> str:
    """`given`, else the file's suffix (`.parquet`, `.csv`); QueryRefused when neither says."""
    fmt = given or out.suffix.lstrip(".").lower()
    if fmt not in EXPORT_FORMATS:
        raise QueryRefused(
            f"cannot tell the format of {out.name}: give --format {' or '.join(EXPORT_FORMATS)}"
        )
    return fmt


def export(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    out: Path,
    fmt: str,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the rows of `sql` to `out` as `fmt`; the number of rows. QueryRefused for a
    statement that is not one SELECT, QueryFailed when it fails or the file cannot be
    written."""
    check_query(sql)
    tmp = out.with_name(f".{out.name}.tmp")
    rows = 0
    try:
        reader = con.sql(sql).to_arrow_reader(_BATCH_ROWS)
        schema = _plain(reader.schema, flat=fmt == "csv")
        writer: pq.ParquetWriter | pacsv.CSVWriter = (
            pq.ParquetWriter(tmp, schema) if fmt == "parquet" else pacsv.CSVWriter(tmp, schema)
        )
        with contextlib.closing(writer):
            for batch in reader:
                columns = [_as(c, f.type) for c, f in zip(batch.columns, schema, strict=True)]
                writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=schema))
                rows += batch.num_rows
                if progress is not None:
                    progress(rows)
        os.replace(tmp, out)
    except (duckdb.Error, pa.ArrowException, OSError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise QueryFailed(f"export to {out} failed: {e}") from e
    return rows


def _plain(schema: pa.Schema, *, flat: bool) -> pa.Schema:
    """`schema` with DuckDB's extension types (JSON, UUID) as their storage types, which
    every reader knows; with `flat` (CSV), nested columns (lists, structs, maps) as JSON
    text."""
    fields = []
    for f in schema:
        t = f.type.storage_type if isinstance(f.type, pa.ExtensionType) else f.type
        if flat and pa.types.is_nested(t):
            t = pa.string()
        fields.append(pa.field(f.name, t, f.nullable))
    return pa.schema(fields)


def _as(column: pa.Array, target: pa.DataType) -> pa.Array:
    if column.type == target:
        return column
    if isinstance(column.type, pa.ExtensionType):
        return column.storage if column.storage.type == target else column.storage.cast(target)
    if pa.types.is_nested(column.type):  # to JSON text, for CSV
        return pa.array(
            [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()],
            type=target,
        )
    return column.cast(target)
