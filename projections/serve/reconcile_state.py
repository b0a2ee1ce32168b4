"""The reconciler's `StateSource` over the DuckDB projection.

`DuckDBState(on_cursor)` reads one node's projected state (`schemas.projected`) in one
read transaction, so every table is seen at the same committed batch. `on_cursor` runs a
function on a read cursor of the projection's database, off the event loop: the daemon's
projection part's query cursors, or `cursor_runner(con)` for a database this process holds
(the CLI's replayed copy, tests). `refresh`, when given, is awaited before each read (the
CLI catches its copy up with the stream there).

`OwnProjection` is a daemon part for a reconciler without the daemon's projection (`serve
--no-projection`, or the reconciler in a role of its own): it follows the stream into a
file of its own and offers the same `state`.

What is read is bounded by the node's present, not its history: its latest inventory, the
containers and workspaces it has not removed (or that the inventory shows), the attempts
still open, the tasks, attempts and instances those refer to, and the reconciler's own
commands that have no final outcome yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import duckdb

from projections.errors import ProjectionError
from projections.serve.projector import Projector
from schemas.projected import (
    AttemptRecord,
    ContainerRecord,
    InstanceRecord,
    Inventory,
    ParkedRecord,
    ProjectedState,
    SeenContainer,
    SeenWorkspace,
    TaskRecord,
    WorkspaceRecord,
)

if TYPE_CHECKING:
    from schemas.http import PartHost

log = logging.getLogger(__name__)

T = TypeVar("T")
OnCursor = Callable[[Callable[[duckdb.DuckDBPyConnection], Any]], Awaitable[Any]]

_LATEST = """
SELECT seq, observed_at, workspace_root FROM inventories
WHERE node_id = $node ORDER BY seq DESC LIMIT 1
"""

_SEEN_CONTAINERS = """
SELECT container_id, state, created_at, task_id, attempt, instance_id, deadline, managed,
       label_node AS node_id
FROM observed_containers WHERE node_id = $node
"""

_SEEN_WORKSPACES = """
SELECT path, created_at, task_id, attempt FROM observed_workspaces WHERE node_id = $node
"""

_FAILED = """
SELECT resource, max(seq) AS failed_seq, arg_max(occurred_at, seq) AS failed_at
FROM cleanups WHERE outcome = 'failed' AND step IN {steps} GROUP BY resource
"""

_CONTAINERS = f"""
SELECT c.container_id, c.task_id, c.attempt, c.node_id, c.instance_id, c.created_seq,
       c.created_at, c.deadline, c.removed_seq, f.failed_seq, f.failed_at
FROM containers c
LEFT JOIN ({_FAILED.format(steps="('kill', 'remove_container')")}) f
    ON f.resource = c.container_id
WHERE (c.node_id = $node AND c.removed_seq IS NULL)
   OR c.container_id IN (SELECT container_id FROM observed_containers WHERE node_id = $node)
"""

_WORKSPACES = f"""
SELECT w.path, w.task_id, w.attempt, w.node_id, w.instance_id, w.created_seq, w.created_at,
       w.removed_seq, f.failed_seq, f.failed_at
FROM workspaces w
LEFT JOIN ({_FAILED.format(steps="('remove_workspace',)")}) f ON f.resource = w.path
WHERE (w.node_id = $node AND w.removed_seq IS NULL)
   OR w.path IN (SELECT path FROM observed_workspaces WHERE node_id = $node)
"""

_REFS = """
CREATE OR REPLACE TEMP TABLE _reconcile_refs AS
SELECT task_id, attempt FROM observed_containers WHERE node_id = $node AND task_id IS NOT NULL
UNION SELECT task_id, attempt FROM observed_workspaces WHERE node_id = $node
                                                        AND task_id IS NOT NULL
UNION SELECT task_id, attempt FROM containers WHERE node_id = $node AND removed_seq IS NULL
UNION SELECT task_id, attempt FROM workspaces WHERE node_id = $node AND removed_seq IS NULL
UNION SELECT task_id, attempt FROM attempts WHERE node_id = $node AND finished_seq IS NULL
"""

_ATTEMPTS = """
SELECT a.task_id, a.attempt, a.node_id, a.instance_id, a.started_seq, a.started_at,
       a.finished_seq, a.finished_at
FROM attempts a SEMI JOIN _reconcile_refs r ON r.task_id = a.task_id AND r.attempt = a.attempt
"""

_TASKS = """
SELECT task_id, state, last_seq, last_event_at, finished_seq, finished_at, correlation_id
FROM tasks WHERE task_id IN (SELECT task_id FROM _reconcile_refs)
"""

# An instance superseded (its successor took the data dir's lock it held) is as dead as
# one that stopped: the first of the two proves it.
_INSTANCES = """
WITH superseded AS (
    SELECT json_extract_string(payload, '$.superseded_instance') AS instance_id,
           min(seq) AS seq, arg_min(occurred_at, seq) AS at
    FROM events WHERE type = 'supervisor.superseded' GROUP BY 1
)
SELECT i.instance_id, i.node_id, i.role, i.started_seq,
       coalesce(i.stopped_seq, s.seq) AS stopped_seq,
       CASE WHEN i.stopped_seq IS NOT NULL THEN i.stopped_at ELSE s.at END AS stopped_at,
       i.last_heartbeat_seq AS heartbeat_seq, i.last_heartbeat_at AS heartbeat_at,
       i.heartbeat_timeout_s
FROM instances i LEFT JOIN superseded s ON s.instance_id = i.instance_id
WHERE i.node_id = $node
   OR i.instance_id IN (SELECT instance_id FROM observed_containers WHERE node_id = $node)
"""

# A warm pool's containers of this node that no attempt adopted and nobody removed.
_PARKED = """
SELECT container_id, workspace, node_id, instance_id, parked_seq, parked_at, state,
       retired_seq, retired_at
FROM parked_containers
WHERE node_id = $node AND state IN ('parked', 'retire_failed') AND parked_seq IS NOT NULL
"""

_OPEN_COMMANDS = """
SELECT DISTINCT command_id FROM reconcile_decisions
WHERE node_id = $node AND NOT dry_run AND command_id IS NOT NULL
  AND command_id NOT IN (SELECT command_id FROM reconcile_outcomes WHERE final)
"""

_FINALS = """
SELECT action, resource, count(*), max(occurred_at) FROM reconcile_outcomes
WHERE node_id = $node AND final GROUP BY action, resource
"""


def _records(
    cur: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any], cls: Callable[..., T]
) -> list[T]:
    """Rows as `cls(**columns)`; DuckDB's naive TIMESTAMPs (UTC by the projection's
    convention) become aware datetimes."""
    cur.execute(sql, params)
    names = [d[0] for d in cur.description or []]
    return [
        cls(
            **{
                n: v.replace(tzinfo=UTC) if isinstance(v, datetime) else v
                for n, v in zip(names, row, strict=True)
            }
        )
        for row in cur.fetchall()
    ]


def read_state(
    cur: duckdb.DuckDBPyConnection, node_id: str, inventory_id: str
) -> ProjectedState | None:
    """The projected state of `node_id`, or None while inventory `inventory_id` is not in
    the projection. Blocking; one read transaction (rolled back: it writes only a temp
    table)."""
    p = {"node": node_id}
    cur.execute("BEGIN TRANSACTION")
    try:
        if not cur.execute(
            "SELECT 1 FROM inventories WHERE event_id = $id", {"id": inventory_id}
        ).fetchall():
            return None
        seq, observed_at, root = cur.execute(_LATEST, p).fetchall()[0]
        seen = {c.container_id: c for c in _records(cur, _SEEN_CONTAINERS, p, SeenContainer)}
        seen_ws = {w.path: w for w in _records(cur, _SEEN_WORKSPACES, p, SeenWorkspace)}
        containers = {c.container_id: c for c in _records(cur, _CONTAINERS, p, ContainerRecord)}
        workspaces = {w.path: w for w in _records(cur, _WORKSPACES, p, WorkspaceRecord)}
        cur.execute(_REFS, p)
        attempts = {(a.task_id, a.attempt): a for a in _records(cur, _ATTEMPTS, {}, AttemptRecord)}
        tasks = {t.task_id: t for t in _records(cur, _TASKS, {}, TaskRecord)}
        instances = {i.instance_id: i for i in _records(cur, _INSTANCES, p, InstanceRecord)}
        parked = {r.container_id: r for r in _records(cur, _PARKED, p, ParkedRecord)}
        open_commands = frozenset(r[0] for r in cur.execute(_OPEN_COMMANDS, p).fetchall())
        rows = cur.execute(_FINALS, p).fetchall()
    finally:
        cur.execute("ROLLBACK")
    inventory = Inventory(seq, observed_at.replace(tzinfo=UTC), root, seen, seen_ws)
    finals = {(r[0], r[1]): int(r[2]) for r in rows}
    finals_at = {(r[0], r[1]): r[3].replace(tzinfo=UTC) for r in rows}
    return ProjectedState(
        node_id,
        inventory,
        containers,
        workspaces,
        attempts,
        tasks,
        instances,
        open_commands,
        finals,
        finals_at,
        parked=parked,
    )


class DuckDBState:
    """The `supervisor.reconcile.reconciler.StateSource` adapter (see the module docstring)."""

    def __init__(
        self, on_cursor: OnCursor, *, refresh: Callable[[], Awaitable[object]] | None = None
    ) -> None:
        self.on_cursor = on_cursor
        self.refresh = refresh

    async def load(self, node_id: str, inventory_id: str) -> ProjectedState | None:
        if self.refresh is not None:
            await self.refresh()
        state: ProjectedState | None = await self.on_cursor(
            lambda cur: read_state(cur, node_id, inventory_id)
        )
        return state


def cursor_runner(con: duckdb.DuckDBPyConnection) -> tuple[OnCursor, Callable[[], None]]:
    """(`on_cursor`, `close`) for a database this process holds: one cursor, made now (before
    any other thread writes on `con`), used from one worker thread."""
    cur = con.cursor()
    pool = ThreadPoolExecutor(1, thread_name_prefix="reconcile-read")

    async def on_cursor(fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, cur)

    def close() -> None:
        pool.shutdown(wait=True)
        cur.close()

    return on_cursor, close


class OwnProjection:
    """A daemon `Part`: a live projection of `SUP_EVENTS` in `<data_dir>/reconcile.duckdb`
    (or `db_path`) for the reconciler alone; `state` reads it. Start it before the
    `ReconcilerPart`. A projector that fails is restarted after `retry_s`."""

    name = "reconcile-projection"

    def __init__(
        self, db_path: str | Path | None = None, *, batch_age_s: float = 0.05, retry_s: float = 1.0
    ) -> None:
        self.db_path = Path(db_path) if db_path is not None else None
        self.batch_age_s = batch_age_s
        self.retry_s = retry_s
        self.state = DuckDBState(self.on_cursor)
        self._on_cursor: OnCursor | None = None

    async def on_cursor(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        if self._on_cursor is None:
            raise ProjectionError("the reconciler's projection is not open")
        result: T = await self._on_cursor(fn)
        return result

    async def start(self, ctx: PartHost, stack: contextlib.AsyncExitStack) -> None:
        """Open the file and catch up with the stream, then follow it. Raises
        ProjectionStoreError, StreamUnavailable."""
        path = self.db_path or Path(ctx.data_dir) / "reconcile.duckdb"
        url = ctx.nats_url
        projector = await asyncio.to_thread(Projector, path, url, batch_age_s=self.batch_age_s)
        on_cursor, close = cursor_runner(projector.store.con)  # before the projector writes
        stop = asyncio.Event()

        async def teardown() -> None:
            stop.set()
            self._on_cursor = None
            with contextlib.suppress(asyncio.CancelledError):
                await follow
            close()
            await asyncio.to_thread(projector.close)

        try:
            await projector.catch_up()
        except BaseException:
            close()
            await asyncio.to_thread(projector.close)
            raise
        follow = asyncio.create_task(self._follow(projector, stop), name="reconcile-projection")
        stack.push_async_callback(teardown)
        self._on_cursor = on_cursor

    async def _follow(self, projector: Projector, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await projector.run(stop)
            except ProjectionError as e:
                log.warning("reconciler's projection: %s; restarting in %gs", e, self.retry_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.retry_s)
