"""The `/v1` read API over the live projection: queries and task lookups on cursors of the
projector's own database.

One process owns a DuckDB file, so the daemon's queries do not open it again: they run on
cursors of the projector's database (one DuckDB instance; its MVCC gives each query the
last committed batch without ever stopping the writer), one cursor per thread of a small
pool, so the event loop is never blocked and at most `workers` queries run at once (more
wait their turn). The file was opened with external access off, extension loading off and
the configuration locked (`projections.store.store.store_config`), and every statement goes
through `projections.query.query.run_on_cursor`: one SELECT-class statement checked by DuckDB's
parser, a row limit, a time limit, a transaction that is rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import duckdb
import msgspec

from projections.errors import QueryRefused
from projections.query.query import (
    MAX_ROWS,
    TIMEOUT_S,
    check_query,
    read_transaction,
    run_on_cursor,
)
from projections.query.render import render, result_doc, row_doc
from projections.query.tasks import listing_sql, parse_filter
from schemas import decode_event
from schemas.errors import ApiError, projection_unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class QueryLimits:
    """A query gets `max_rows` and `timeout_s` unless it asks for other limits, up to
    `max_rows_limit` and `max_timeout_s`; a task lookup gets `task_timeout_s`."""

    max_rows: int = MAX_ROWS
    max_rows_limit: int = 100_000
    timeout_s: float = TIMEOUT_S
    max_timeout_s: float = 300.0
    task_timeout_s: float = 5.0


class QueryRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The body of `POST /v1/query`. `format` "table" or "csv" adds the rendered `text`."""

    sql: str
    max_rows: int | None = None
    timeout_s: float | None = None
    format: Literal["json", "table", "csv"] = "json"


class QueryEndpoint:
    """Queries and task lookups on `workers` cursors of `con`, made here: build it before
    the projector writes from its own thread, so no cursor is ever created on a connection
    in use."""

    def __init__(
        self, con: duckdb.DuckDBPyConnection, *, workers: int, limits: QueryLimits
    ) -> None:
        self.limits = limits
        self._cursors: queue.SimpleQueue[duckdb.DuckDBPyConnection] = queue.SimpleQueue()
        self._all = [con.cursor() for _ in range(workers)]
        for cur in self._all:
            self._cursors.put(cur)
        self._busy: set[duckdb.DuckDBPyConnection] = set()
        self._busy_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            workers, thread_name_prefix="projection-query"
        )

    async def query(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Run `{"sql", "max_rows"?, "timeout_s"?, "format"?}`. Returns
        `projections.query.render.result_doc` (+ `text` for format table/csv). Raises
        QueryRefused (not one SELECT, or a bad request), QueryFailed, QueryTimeout, and
        ApiError 503 once closed."""
        req = self._request(request)
        check_query(req.sql)  # refuse before waiting for a query thread
        max_rows = req.max_rows or self.limits.max_rows
        timeout_s = req.timeout_s or self.limits.timeout_s

        def run(cur: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            result = run_on_cursor(cur, req.sql, max_rows=max_rows, timeout_s=timeout_s)
            doc = result_doc(result)
            if req.format != "json":
                doc["text"] = render(result, req.format)
            return doc

        return await self._on_cursor(run)

    async def task(self, task_id: str) -> dict[str, Any] | None:
        """The task's row of `tasks` (every column), with `result` (the `Result` of the
        terminal event the projection applied, the one the attempt's owner sent; None
        until the task ends), `attempt_details` (its rows of `attempts`), `errors` (its
        rows of `errors`, in stream order) and `projection_seq` (the watermark read); None
        when the projection does not know the task."""
        timeout_s = self.limits.task_timeout_s

        def read(cur: duckdb.DuckDBPyConnection) -> dict[str, Any] | None:
            with read_transaction(cur, timeout_s) as seq:
                task = _rows(cur, "SELECT * FROM tasks WHERE task_id = $1", task_id)
                if not task:
                    return None
                attempts = _rows(
                    cur, "SELECT * FROM attempts WHERE task_id = $1 ORDER BY attempt", task_id
                )
                errors = _rows(
                    cur,
                    "SELECT seq, occurred_at, attempt, error_type, code, "
                    "message, retryable, container_id FROM errors "
                    "WHERE task_id = $1 ORDER BY seq",
                    task_id,
                )
                finished = task[0].get("finished_seq")
                end = (
                    cur.execute("SELECT payload FROM events WHERE seq = $1", [finished]).fetchone()
                    if finished is not None
                    else None
                )
            return {
                **task[0],
                "result": _result(end[0]) if end else None,
                "attempt_details": attempts,
                "errors": errors,
                "projection_seq": seq,
            }

        return await self._on_cursor(read)

    async def tasks(self, params: Mapping[str, str]) -> dict[str, Any]:
        """`GET /v1/tasks`: one page of tasks matching the filters of
        `projections.query.tasks` (QueryRefused naming a bad one): `tasks`, `next_cursor`
        (None on the last page) and `projection_seq`."""
        f = parse_filter(dict(params), datetime.now(UTC))
        sql, args = listing_sql(f)
        timeout_s = self.limits.task_timeout_s

        def read(cur: duckdb.DuckDBPyConnection) -> dict[str, Any]:
            with read_transaction(cur, timeout_s) as seq:
                cur.execute(sql, args)
                names = [d[0] for d in cur.description or []]
                rows = [row_doc(names, r) for r in cur.fetchall()]
            page = rows[: f.limit]
            cursor = str(page[-1]["first_seq"]) if len(rows) > f.limit else None
            for row in page:
                del row["first_seq"]
            return {"tasks": page, "next_cursor": cursor, "projection_seq": seq}

        return await self._on_cursor(read)

    async def close(self) -> None:
        """Interrupt what runs, drop what waits, close the cursors. Later calls answer 503."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        with self._busy_lock:
            for cur in self._busy:
                cur.interrupt()
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        for cur in self._all:
            with contextlib.suppress(duckdb.Error):
                cur.close()

    def _request(self, request: Mapping[str, Any]) -> QueryRequest:
        lim = self.limits
        try:
            req = msgspec.convert(dict(request), QueryRequest)
        except msgspec.ValidationError as e:
            raise QueryRefused(f"bad request: {e}") from e
        if req.max_rows is not None and not 1 <= req.max_rows <= lim.max_rows_limit:
            raise QueryRefused(f"max_rows must be between 1 and {lim.max_rows_limit}")
        if req.timeout_s is not None and not 0 < req.timeout_s <= lim.max_timeout_s:
            raise QueryRefused(f"timeout_s must be above 0 and at most {lim.max_timeout_s:g}")
        return req

    async def _on_cursor(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        pool = self._pool
        if pool is None:
            raise unavailable()
        try:
            future = asyncio.get_running_loop().run_in_executor(pool, self._with_cursor, fn)
        except RuntimeError as e:  # shut down meanwhile
            raise unavailable() from e
        return await future

    def _with_cursor(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        cur = self._cursors.get_nowait()  # never empty: one cursor per worker thread
        with self._busy_lock:
            self._busy.add(cur)
        try:
            return fn(cur)
        finally:
            with self._busy_lock:
                self._busy.discard(cur)
            self._cursors.put(cur)


def unavailable() -> ApiError:
    """The answer while there is no projection to read (503)."""
    return projection_unavailable("the projection is not open (the daemon is starting or stopping)")


def _rows(cur: duckdb.DuckDBPyConnection, sql: str, *params: Any) -> list[dict[str, Any]]:
    cur.execute(sql, list(params))
    columns = [d[0] for d in cur.description or []]
    return [row_doc(columns, row) for row in cur.fetchall()]


def _result(payload: str) -> dict[str, Any] | None:
    """The `Result` of a stored terminal event, as JSON values (None if it has none)."""
    end = decode_event(payload.encode())
    result = getattr(end, "result", None)
    return msgspec.to_builtins(result) if result is not None else None  # type: ignore[no-any-return]
