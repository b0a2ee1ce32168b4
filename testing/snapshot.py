"""A projection file's rows, in the form two projections are compared in (tests and
benchmarks only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb

from projections.store.ddl import KEYS, TABLES


def table_rows(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[Any, ...]]:
    """Every row of `table`, ordered by its key."""
    if table not in KEYS:
        raise ValueError(f"not a projection table: {table}")
    order = ", ".join(KEYS[table])
    return con.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()


def snapshot(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows (see `table_rows`)."""
    return {table: table_rows(con, table) for table in TABLES}


def tables(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every table of the projection file at `path`, row for row (`snapshot`)."""
    con = duckdb.connect(str(path), read_only=True)
    try:
        return snapshot(con)
    finally:
        con.close()
