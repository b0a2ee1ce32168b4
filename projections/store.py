"""The DuckDB file of the projection: schema, batch application, watermark.

One `ProjectionStore` is the single writer of its file (DuckDB allows one writer process).
`apply` registers a `Staged` batch's Arrow tables and runs the set-based statements of
`projections.apply` and the watermark update in one transaction: either the rows and the
new `projector_state.seq` are both durable, or neither is. That is what makes a restart
resume exactly after the last applied message.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from projections.apply import APPLY_STATEMENTS, INSERT_DEAD_LETTERS, SET_WATERMARK
from projections.ddl import DDL_VERSION, KEYS, TABLES, schema_statements
from projections.decode import Staged
from projections.errors import ProjectionStoreError, ProjectionVersionMismatch
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


def store_config(*, bulk: bool = False) -> dict[str, str | bool | int | float | list[str]]:
    """The database configuration of a projection file, locked once opened: no file access
    beyond the database itself and no extension loading (so a query cursor on the writer's
    database can read nothing else), and, in bulk mode, no checkpoint before `close` (a
    one-off build such as a replay writes its tables out once instead of every 16 MB of
    WAL)."""
    return {
        "enable_external_access": False,
        "autoload_known_extensions": False,
        "autoinstall_known_extensions": False,
        "checkpoint_threshold": "1TB" if bulk else "16MB",
    }


class ProjectionStore:
    """The projection file, open for writing (see `store_config`). Not thread-safe: one
    thread at a time (the projector applies batches from a single worker thread)."""

    def __init__(
        self, path: str | Path, *, stream: str = EVENTS_STREAM, bulk: bool = False
    ) -> None:
        self.path = Path(path)
        self.stream = stream
        try:
            self.con = duckdb.connect(str(self.path), config=store_config(bulk=bulk))
        except duckdb.Error as e:
            raise ProjectionStoreError(str(self.path), f"cannot open: {e}") from e
        try:
            self.con.execute("SET lock_configuration = true")
            self._install()
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
        names: list[str] = []
        try:
            con.begin()
            if staged.events:
                for kind, table in staged.tables.items():
                    con.register(f"_{kind}", table)
                    names.append(f"_{kind}")
                for statement in APPLY_STATEMENTS:
                    con.execute(statement)
                dups = con.execute("SELECT count(*) FROM _dups").fetchall()[0][0]
                applied = staged.events - int(dups)
            if staged.dead.num_rows:
                con.register("_dead", staged.dead)
                names.append("_dead")
                con.execute(INSERT_DEAD_LETTERS)
            con.execute(SET_WATERMARK, {"seq": staged.last_seq, "stream": self.stream})
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
        finally:
            for name in names:
                with contextlib.suppress(duckdb.Error):
                    con.unregister(name)
        duplicates = staged.events - applied + staged.repeats
        return ApplyResult(
            applied, duplicates, staged.dead.num_rows, staged.last_seq,
            committed_ns, staged.tables["batch"].column("stored_ns"),
        )  # fmt: skip

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
