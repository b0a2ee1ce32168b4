"""Read-only SQL over a projection: the guard, and running a query within limits.

`check_query` accepts exactly one SELECT-class statement (SELECT, WITH ... SELECT, VALUES,
FROM ..., DESCRIBE, SHOW, SUMMARIZE), as DuckDB's own parser classifies it
(`duckdb.extract_statements`), and refuses anything else: writes, DDL, COPY, ATTACH,
PRAGMA, SET, CALL, EXPORT, LOAD, transactions, and a second statement smuggled after a
`;`. The guard is one layer; the connection is the other: `open_readonly` opens the file
read-only with file access outside the database disabled, extension loading off and the
configuration locked, so even a SELECT cannot read `/etc/passwd` or reach the network.
`run_query` streams at most `max_rows` rows and interrupts the statement at `timeout_s`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from projections.errors import QueryFailed, QueryRefused, QueryTimeout

MAX_ROWS = 10_000
TIMEOUT_S = 30.0
MEMORY_LIMIT = "1GB"


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    elapsed_s: float


def check_query(sql: str) -> str:
    """The single statement of `sql` if it is a SELECT-class statement; QueryRefused
    (with the reason) otherwise. Nothing is executed."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryRefused(f"the statement does not parse: {e}") from e
    if len(statements) != 1:
        raise QueryRefused(f"exactly one statement is allowed, got {len(statements)}")
    statement = statements[0]
    if statement.type != duckdb.StatementType.SELECT:
        raise QueryRefused(
            f"{statement.type.name} statements are not allowed: read-only SELECT only"
        )
    return str(statement.query)


def readonly_config(memory_limit: str = MEMORY_LIMIT) -> dict[str, str | bool]:
    return {
        "enable_external_access": False,
        "autoload_known_extensions": False,
        "autoinstall_known_extensions": False,
        "memory_limit": memory_limit,
    }


def open_readonly(db_path: str | Path) -> duckdb.DuckDBPyConnection:
    """The projection file opened read-only and locked down (see the module docstring).
    QueryFailed if it cannot be opened (missing, or held by a running projector)."""
    path = Path(db_path)
    if not path.exists():
        raise QueryFailed(f"{path}: no such projection file")
    try:
        con = duckdb.connect(str(path), read_only=True, config=readonly_config())
        con.execute("SET lock_configuration = true")
    except duckdb.Error as e:
        raise QueryFailed(f"cannot open {path} read-only: {e}") from e
    return con


def run_query(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    *,
    max_rows: int = MAX_ROWS,
    timeout_s: float = TIMEOUT_S,
) -> QueryResult:
    """Check `sql` and run it on a cursor of `con`: at most `max_rows` rows are fetched
    (`truncated` says there were more), and the statement is interrupted after
    `timeout_s`. Raises QueryRefused, QueryTimeout, QueryFailed."""
    statement = check_query(sql)
    cur = con.cursor()
    timer = threading.Timer(timeout_s, cur.interrupt)
    started = time.monotonic()
    timer.start()
    try:
        cur.execute(statement)
        description = cur.description or []
        rows = cur.fetchmany(max_rows + 1)
    except duckdb.InterruptException as e:
        raise QueryTimeout(timeout_s) from e
    except duckdb.Error as e:
        raise QueryFailed(str(e)) from e
    finally:
        timer.cancel()
        cur.close()
    return QueryResult(
        columns=[d[0] for d in description],
        types=[str(d[1]) for d in description],
        rows=rows[:max_rows],
        truncated=len(rows) > max_rows,
        elapsed_s=time.monotonic() - started,
    )
