"""Read-only SQL over a projection: the guard, and running a query within limits.

`check_query` accepts exactly one SELECT-class statement (SELECT, WITH ... SELECT, VALUES,
FROM ..., DESCRIBE, SHOW, SUMMARIZE), as DuckDB's own parser classifies it
(`duckdb.extract_statements`), and refuses anything else: writes, DDL, COPY, ATTACH,
PRAGMA, SET, CALL, EXPORT, LOAD, transactions, and a second statement smuggled after a
`;`. The guard is one layer; the connection is the other: `open_readonly` opens the file
read-only with file access outside the database disabled, extension loading off and the
configuration locked, so even a SELECT cannot read `/etc/passwd` or reach the network.
`run_query` streams at most `max_rows` rows and interrupts the statement at `timeout_s`, in
a transaction that is rolled back afterwards (a third layer: no table data is ever
committed by a query). The daemon runs the same on a cursor of the projector's own database
(`projections.serve.live`), where the file's configuration is locked down the same way.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import duckdb

from projections.errors import QueryFailed, QueryMemory, QueryRefused, QueryTimeout
from projections.query.defaults import MAX_ROWS, TIMEOUT_S

__all__ = [
    "QueryResult",
    "check_query",
    "open_readonly",
    "read_transaction",
    "readonly_config",
    "run_on_cursor",
    "run_query",
]

MEMORY_LIMIT = "1GB"


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    types: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    elapsed_s: float
    seq: int | None = None
    """The watermark of the projection the statement saw (None: not a projection)."""


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
    query = str(statement.query)
    _check_tree(query)
    return query


# Query nodes that only read; any other (an UPDATE, INSERT or DELETE inside a CTE or a
# subquery) is a write hidden in a SELECT.
_READ_NODES: Final = frozenset(
    {"SELECT_NODE", "SET_OPERATION_NODE", "RECURSIVE_CTE_NODE", "CTE_NODE"}
)
# Table functions with effects: they write (a checkpoint) or run a string as SQL, which
# this guard never sees.
_REFUSED_FUNCTIONS: Final = frozenset({"checkpoint", "force_checkpoint", "query", "query_table"})
_parser = duckdb.connect(":memory:", config={"enable_external_access": False})
_parser_lock = threading.Lock()


def _check_tree(query: str) -> None:
    """Refuse a SELECT whose parse tree (DuckDB's own parser, `json_serialize_sql`) holds
    anything but reads, wherever it is nested."""
    with _parser_lock:
        (text,) = _parser.execute("SELECT json_serialize_sql(?)", [query]).fetchone() or ("",)
    tree = json.loads(text)
    if tree.get("error"):
        raise QueryRefused(f"the statement does not parse: {tree.get('error_message')}")
    stack: list[Any] = [tree["statements"]]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            kind = node.get("type")
            if isinstance(kind, str) and kind.endswith("_NODE") and kind not in _READ_NODES:
                what = kind.removesuffix("_NODE").removesuffix("_QUERY")
                raise QueryRefused(f"{what} inside a query is not allowed: read-only SELECT only")
            name = node.get("function_name")
            if isinstance(name, str) and name.lower() in _REFUSED_FUNCTIONS:
                raise QueryRefused(f"the function {name}() is not allowed in a query")
            stack.extend(node.values())


def readonly_config(
    memory_limit: str = MEMORY_LIMIT,
) -> dict[str, str | bool | int | float | list[str]]:
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
    """`run_on_cursor` on a new cursor of `con`, closed afterwards."""
    check_query(sql)
    cur = con.cursor()
    try:
        return run_on_cursor(cur, sql, max_rows=max_rows, timeout_s=timeout_s)
    finally:
        cur.close()


def run_on_cursor(
    cur: duckdb.DuckDBPyConnection,
    sql: str,
    *,
    max_rows: int = MAX_ROWS,
    timeout_s: float = TIMEOUT_S,
) -> QueryResult:
    """Check `sql` and run it on `cur` within `read_transaction`: at most `max_rows` rows
    are fetched (`truncated` says there were more). Raises QueryRefused, QueryTimeout,
    QueryFailed."""
    statement = check_query(sql)
    started = time.monotonic()
    with read_transaction(cur, timeout_s) as seq:
        cur.execute(statement)
        description = cur.description or []
        rows = cur.fetchmany(max_rows + 1)
    return QueryResult(
        columns=[d[0] for d in description],
        types=[str(d[1]) for d in description],
        rows=rows[:max_rows],
        truncated=len(rows) > max_rows,
        elapsed_s=time.monotonic() - started,
        seq=seq,
    )


@contextlib.contextmanager
def read_transaction(cur: duckdb.DuckDBPyConnection, timeout_s: float) -> Iterator[int | None]:
    """Run the block's statements on `cur` in one transaction that is always rolled back,
    interrupted after `timeout_s`. Rolling back is a last layer under the guard: no table
    data a statement might reach is ever committed (sequences, which DuckDB does not roll
    back, do not exist in a projection). One transaction means every statement, and the
    watermark yielded (the projection's `projector_state.seq`, None for a file that is not
    a projection), see one snapshot. DuckDB errors become QueryTimeout (interrupted) or
    QueryFailed."""
    timer = threading.Timer(timeout_s, cur.interrupt)
    timer.start()
    try:
        cur.begin()
        yield _watermark(cur)
    except duckdb.InterruptException as e:
        raise QueryTimeout(timeout_s) from e
    except duckdb.OutOfMemoryException as e:
        raise QueryMemory(str(e)) from e
    except duckdb.Error as e:
        raise QueryFailed(str(e)) from e
    finally:
        timer.cancel()
        with contextlib.suppress(duckdb.Error):
            cur.rollback()


def _watermark(cur: duckdb.DuckDBPyConnection) -> int | None:
    """The projection's watermark, None for a file that is not a projection (an error
    would abort the transaction, hence the look in the catalog first)."""
    found = cur.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'projector_state'"
    ).fetchall()
    if not found[0][0]:
        return None
    rows = cur.execute("SELECT max(seq) FROM projector_state").fetchall()
    return None if rows[0][0] is None else int(rows[0][0])
