"""The DuckDB file of the projection: schema, batch application, watermark.

One `ProjectionStore` is the single writer of its file (DuckDB allows one writer process).
`apply` loads a `Staged` batch into the connection's temp tables and runs the set-based
statements of `projections.apply` and the watermark update in one transaction: either the
rows and the new `projector_state.seq` are both durable, or neither is. That is what makes
a restart resume exactly after the last applied message.

What a batch costs whatever its size is kept small, because a live batch holds a few
events: only the statements whose inputs hold rows run (`projections.apply.steps_for`);
the Arrow tables are read once each, into temp tables made once per connection, so the
statements scan DuckDB's own storage and never call back into Python for rows; the temp
tables are emptied inside the transaction, so nothing of them is ever committed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from projections.apply import (
    ATTEMPT_CATEGORIES,
    ATTEMPT_SCOPE,
    CREATE_NEW,
    FILL_NEW,
    INSERT_DEAD_LETTERS,
    SET_WATERMARK,
    TASK_SCOPE,
    steps_for,
)
from projections.ddl import DDL_VERSION, KEYS, TABLES, schema_statements
from projections.decode import STAGING, Staged
from projections.errors import ProjectionStoreError, ProjectionVersionMismatch
from schemas import NO_TASK
from supervisor.streams import EVENTS_STREAM


@dataclass(frozen=True)
class ApplyResult:
    """What one batch did: events inserted, duplicates skipped (an `event_id` already
    applied), dead letters written, and the watermark reached. `committed_ns` is the wall
    clock (ns since the epoch) right after the commit, when the batch became visible to
    readers, and `stored_ns` the stream's timestamp of each event of the batch: together
    they give each event's delay from publish to visible (see `projections.live`)."""

    applied: int
    duplicates: int
    dead: int
    seq: int
    committed_ns: int = field(default=0, compare=False)
    stored_ns: pa.ChunkedArray | None = field(default=None, compare=False, repr=False)
    apply_s: float = field(default=0.0, compare=False)
    """How long the transaction took, from begin to commit."""


def store_config(
    *, bulk: bool = False, threads: int | None = None
) -> dict[str, str | bool | int | float | list[str]]:
    """The database configuration of a projection file, locked once opened: no file access
    beyond the database itself and no extension loading (so a query cursor on the writer's
    database can read nothing else), and, in bulk mode, no checkpoint before `close` (a
    one-off build such as a replay writes its tables out once instead of every 16 MB of
    WAL). `threads` sets DuckDB's worker threads (default: one per core)."""
    config: dict[str, str | bool | int | float | list[str]] = {
        "enable_external_access": False,
        "autoload_known_extensions": False,
        "autoinstall_known_extensions": False,
        "checkpoint_threshold": "1TB" if bulk else "16MB",
    }
    if threads is not None:
        config["threads"] = threads
    return config


class ProjectionStore:
    """The projection file, open for writing (see `store_config`). Not thread-safe: one
    thread at a time (the projector applies batches from a single worker thread)."""

    def __init__(
        self,
        path: str | Path,
        *,
        stream: str = EVENTS_STREAM,
        bulk: bool = False,
        threads: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.stream = stream
        self._parsed: dict[str, duckdb.Statement] = {}
        try:
            self.con = duckdb.connect(
                str(self.path), config=store_config(bulk=bulk, threads=threads)
            )
        except duckdb.Error as e:
            raise ProjectionStoreError(str(self.path), f"cannot open: {e}") from e
        try:
            self.con.execute("SET lock_configuration = true")
            self._install()
            self._create_staging()
        except BaseException as e:
            self.con.close()  # or the file stays held by this process
            if isinstance(e, duckdb.Error):
                raise ProjectionStoreError(str(self.path), f"cannot open: {e}") from e
            raise

    def _install(self) -> None:
        con = self.con
        con.begin()
        for statement in schema_statements():
            con.execute(statement)
        rows = con.execute(
            "SELECT seq, ddl_version FROM projector_state WHERE stream = ?", [self.stream]
        ).fetchall()
        row = rows[0] if rows else None
        if row is None:
            con.execute("INSERT INTO projector_state VALUES (?, 0, ?)", [self.stream, DDL_VERSION])
        elif row[1] != DDL_VERSION:
            con.rollback()
            raise ProjectionVersionMismatch(str(self.path), int(row[1]), DDL_VERSION)
        con.commit()

    def _create_staging(self) -> None:
        """The temp tables a batch is loaded into, this connection's own and emptied before
        each commit: `_<kind>` for each staging kind of `STAGING`, with the columns DuckDB
        reads from its Arrow schema, and `_new`."""
        for kind, schema in STAGING.items():
            with _registered(self.con, "_empty", schema.empty_table()):
                self.con.execute(f"CREATE TEMP TABLE _{kind} AS FROM _empty LIMIT 0")
        self.con.execute(CREATE_NEW)

    def _run(self, sql: str, params: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
        """Execute `sql`, parsed once per store: the same few statements run for every
        batch, and parsing the text of a merge takes milliseconds."""
        statement = self._parsed.get(sql)
        if statement is None:
            statement = self._parsed[sql] = self.con.extract_statements(sql)[0]
        return self.con.execute(statement, params)

    def last_seq(self) -> int:
        """The last stream sequence applied (0: nothing yet)."""
        rows = self.con.execute(
            "SELECT seq FROM projector_state WHERE stream = ?", [self.stream]
        ).fetchall()
        return int(rows[0][0]) if rows else 0

    def apply(self, staged: Staged) -> ApplyResult:
        """Apply a staged batch and move the watermark to its `last_seq`, atomically.
        Raises ProjectionStoreError (after a rollback) if DuckDB refuses anything."""
        con = self.con
        applied = 0
        started = time.perf_counter()
        try:
            con.begin()
            if staged.events:
                applied = self._apply_events(staged)
            if staged.dead.num_rows:
                with _registered(con, "_dead", staged.dead):
                    self._run(INSERT_DEAD_LETTERS)
            self._run(SET_WATERMARK, {"seq": staged.last_seq, "stream": self.stream})
            con.commit()
            committed_ns = time.time_ns()
        except duckdb.Error as e:
            _rollback_quietly(con)
            raise ProjectionStoreError(
                str(self.path), f"batch up to seq {staged.last_seq}: {e}"
            ) from e
        except BaseException:
            _rollback_quietly(con)
            raise
        duplicates = staged.events - applied + staged.repeats
        return ApplyResult(
            applied, duplicates, staged.dead.num_rows, staged.last_seq,
            committed_ns, staged.tables["batch"].column("stored_ns"),
            time.perf_counter() - started,
        )  # fmt: skip

    def _apply_events(self, staged: Staged) -> int:
        """In the open transaction: load the staging kinds that have rows, fill `_new`, and
        run the statements those inputs call for; then empty the temp tables again.
        Returns the number of new events (the batch less the duplicates)."""
        con = self.con
        filled = [kind for kind, table in staged.tables.items() if table.num_rows]
        for kind in filled:
            con.from_arrow(staged.tables[kind]).insert_into(f"_{kind}")
        applied = int(self._run(FILL_NEW).fetchall()[0][0])
        if applied:
            for statement in steps_for(_inputs(staged)):
                self._run(statement)
            self._run("DELETE FROM _new")
        for kind in filled:
            self._run(f"DELETE FROM _{kind}")
        return applied

    def checkpoint(self) -> None:
        """Write everything committed into the file now (and truncate the WAL)."""
        try:
            self.con.execute("CHECKPOINT")
        except duckdb.Error as e:
            raise ProjectionStoreError(str(self.path), f"checkpoint: {e}") from e

    def interrupt(self) -> None:
        """Abort a statement running in another thread (its batch is rolled back)."""
        self.con.interrupt()

    def close(self) -> None:
        """Checkpoint and close: the file alone (no WAL) then holds the projection."""
        with contextlib.suppress(duckdb.Error):
            self.con.execute("CHECKPOINT")
        self.con.close()

    def __enter__(self) -> ProjectionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _inputs(staged: Staged) -> frozenset[str]:
    """The inputs of `projections.apply.steps_for` that hold rows in `staged`: its non-empty
    staging kinds, and `TASK_SCOPE` / `ATTEMPT_SCOPE` (read off the envelopes, as the task
    and attempt merges select them)."""
    inputs = {kind for kind, table in staged.tables.items() if table.num_rows}
    batch = staged.tables["batch"]
    if pc.any(pc.not_equal(batch.column("task_id"), NO_TASK)).as_py():
        inputs.add(TASK_SCOPE)
    in_attempt = pc.filter(batch.column("type"), pc.greater(batch.column("attempt"), 0))
    if any(t.split(".", 1)[0] in ATTEMPT_CATEGORIES for t in pc.unique(in_attempt).to_pylist()):
        inputs.add(ATTEMPT_SCOPE)
    return frozenset(inputs)


@contextlib.contextmanager
def _registered(con: duckdb.DuckDBPyConnection, name: str, table: pa.Table) -> Iterator[None]:
    """`table` readable as `name` for the duration (unregistered quietly: an error that
    aborted the transaction is the one to report)."""
    con.register(name, table)
    try:
        yield
    finally:
        with contextlib.suppress(duckdb.Error):
            con.unregister(name)


def _rollback_quietly(con: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):
        con.rollback()


def table_rows(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[Any, ...]]:
    """Every row of `table`, ordered by its key: the form two projections are compared in."""
    if table not in KEYS:
        raise ValueError(f"not a projection table: {table}")
    order = ", ".join(KEYS[table])
    return con.execute(f"SELECT * FROM {table} ORDER BY {order}").fetchall()


def snapshot(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[Any, ...]]]:
    """Every table's rows (see `table_rows`)."""
    return {table: table_rows(con, table) for table in TABLES}
