"""The DuckDB file of the projection: schema, batch application, watermark.

One `ProjectionStore` is the single writer of its file (DuckDB allows one writer process).
`apply` loads a `Staged` batch into the connection's temp tables and runs the set-based
statements of `projections.store.apply` and the watermark update in one transaction: either the
rows and the new `projector_state.seq` are both durable, or neither is. That is what makes
a restart resume exactly after the last applied message.

Two ways, one result (`tests/test_fold.py` holds them equal, row for row):

- A large batch (a replay, a catch-up: more than `FOLD_MAX_EVENTS` events) is set-based
  SQL: the Arrow tables are read once each into temp tables made once per connection, so
  the statements scan DuckDB's own storage and never call back into Python for rows; only
  the statements whose inputs hold rows run (`projections.store.apply.steps_for`); the temp
  tables are emptied inside the transaction, so nothing of them is ever committed.
- A small batch (live) would pay most of its cost planning five `MERGE`s whatever its
  size, so its current-state rows are computed in Python (`projections.store.batch_fold`) and
  replaced with one keyed `DELETE` and one Arrow insert per table; `events` and the fact
  tables get Arrow inserts too, with no staging table unless the batch holds a kind that
  only SQL handles (inventories, reconcile decisions and outcomes). The writer keeps the
  rows it last wrote (`CACHED_ROWS` per table, forgotten on a rollback or a set-based
  batch), so the steady state reads none back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from projections.errors import ProjectionStoreError, ProjectionVersionMismatch
from projections.store.apply import (
    ATTEMPT_CATEGORIES,
    ATTEMPT_SCOPE,
    CREATE_NEW,
    FILL_NEW,
    INSERT_BATCH_EVENTS,
    INSERT_DEAD_LETTERS,
    SET_WATERMARK,
    TASK_SCOPE,
    steps_for,
)
from projections.store.batch_fold import FACT_KINDS, FOLDS, Event, Fold, Look, Row, fact_rows
from projections.store.ddl import DDL_VERSION, schema_statements
from projections.stream.decode import BAD_SIGNATURE, STAGING, UNSIGNED, Staged
from schemas import NO_TASK
from schemas.lifecycle import Keyring
from schemas.streams import EVENTS_STREAM

__all__ = ["ApplyResult", "ProjectionStore", "store_config"]

FOLD_MAX_EVENTS = 2000
"""A batch of at most this many new events has its current-state rows computed in Python
(`projections.store.batch_fold`); a larger one (a replay, a catch-up) runs the set-based `MERGE`s."""


@dataclass(frozen=True)
class ApplyResult:
    """What one batch did: events inserted, duplicates skipped (an `event_id` already
    applied), dead letters written, and the watermark reached. `committed_ns` is the wall
    clock (ns since the epoch) right after the commit, when the batch became visible to
    readers, and `stored_ns` the stream's timestamp of each event of the batch: together
    they give each event's delay from publish to visible (see `projections.serve.live`)."""

    applied: int
    duplicates: int
    dead: int
    seq: int
    committed_ns: int = field(default=0, compare=False)
    stored_ns: pa.ChunkedArray | None = field(default=None, compare=False, repr=False)
    apply_s: float = field(default=0.0, compare=False)
    """How long the transaction took, from begin to commit."""


def store_config(
    *,
    bulk: bool = False,
    threads: int | None = None,
    memory_limit: str | None = None,
    temp_limit: str | None = None,
) -> dict[str, str | bool | int | float | list[str]]:
    """The database configuration of a projection file, locked once opened: no file access
    beyond the database itself and no extension loading (so a query cursor on the writer's
    database can read nothing else), and, in bulk mode, no checkpoint before `close` (a
    one-off build such as a replay writes its tables out once instead of every 16 MB of
    WAL). `threads` sets DuckDB's worker threads (default: one per core); `memory_limit`
    and `temp_limit` bound its memory and its spill to disk (default: DuckDB's own)."""
    config: dict[str, str | bool | int | float | list[str]] = {
        "enable_external_access": False,
        "autoload_known_extensions": False,
        "autoinstall_known_extensions": False,
        "checkpoint_threshold": "1TB" if bulk else "16MB",
    }
    if threads is not None:
        config["threads"] = threads
    if memory_limit is not None:  # the live projection; a replay uses what it needs
        config["memory_limit"] = memory_limit
    if temp_limit is not None:
        config["max_temp_directory_size"] = temp_limit
    return config


LEARN_KEY: Final = "INSERT INTO node_keys VALUES ($node, $key, false, $seq)"


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
        fold_max: int = FOLD_MAX_EVENTS,
        memory_limit: str | None = None,
        temp_limit: str | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        self.path = Path(path)
        self.stream = stream
        self.keyring = keyring or Keyring()
        self.fold_max = fold_max
        self._schemas: dict[str, pa.Schema] = {}
        self._sources: dict[str, _ArrowSource] = {}
        self._cached: dict[str, OrderedDict[Any, Row]] = {f.name: OrderedDict() for f in FOLDS}
        """The last `CACHED_ROWS` rows this writer wrote to each folded table, by key."""
        self._parsed: dict[str, duckdb.Statement] = {}
        try:
            self.con = duckdb.connect(
                str(self.path),
                config=store_config(
                    bulk=bulk, threads=threads, memory_limit=memory_limit, temp_limit=temp_limit
                ),
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
        # The pins as configured now; the keys learned so far, which go on being the nodes'.
        con.execute("DELETE FROM node_keys WHERE pinned")
        for node, keys in self.keyring.pinned.items():
            for key in keys:
                con.execute("INSERT INTO node_keys VALUES (?, ?, true, NULL)", [node, key])
        learned = "SELECT node_id, public_key FROM node_keys WHERE NOT pinned ORDER BY first_seq"
        self.keyring.learned.update(dict(con.execute(learned).fetchall()))
        con.commit()

    def _create_staging(self) -> None:
        """The temp tables a batch is loaded into, this connection's own and emptied before
        each commit: `_<kind>` for each staging kind of `STAGING`, with the columns DuckDB
        reads from its Arrow schema (`_batch` without the subjects and payloads), and `_new`;
        and a registered Arrow source per table an Arrow insert reads (`_rows_<table>`), and
        `_rows_batch` for the batch itself."""
        for kind, schema in STAGING.items():
            empty = _staged_rows(kind, schema.empty_table())
            with _registered(self.con, "_empty", empty):
                self.con.execute(f"CREATE TEMP TABLE _{kind} AS FROM _empty LIMIT 0")
        self.con.execute(CREATE_NEW)
        for table in (*FACT_KINDS, *(f.name for f in FOLDS)):
            self._schemas[table] = self.con.sql(f"FROM {table} LIMIT 0").arrow().schema
        self._schemas["batch"] = STAGING["batch"]
        for table, schema in self._schemas.items():
            source = self._sources[table] = _ArrowSource(schema.empty_table())
            self.con.register(f"_rows_{table}", source)

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
        learned = dict(self.keyring.learned)
        try:
            con.begin()
            staged = self._judge(staged)
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
            self._forget(learned)
            raise ProjectionStoreError(
                str(self.path), f"batch up to seq {staged.last_seq}: {e}"
            ) from e
        except BaseException:
            _rollback_quietly(con)
            self._forget(learned)
            raise
        duplicates = staged.events - applied + staged.repeats
        return ApplyResult(
            applied,
            duplicates,
            staged.dead.num_rows,
            staged.last_seq,
            committed_ns,
            staged.tables["batch"].column("stored_ns"),
            time.perf_counter() - started,
        )

    def _judge(self, staged: Staged) -> Staged:
        """In the open transaction: the batch with each checked event's `proof` judged by
        the keyring (in stream order), and the keys it learned stored in `node_keys`."""
        batch = staged.tables["batch"]
        at = batch.schema.get_field_index("proof")
        raw = batch.column(at)
        if raw.null_count == len(raw):
            return staged
        nodes, seqs = batch.column("node_id").to_pylist(), batch.column("seq").to_pylist()
        proofs: list[str | None] = []
        for signer, node, seq in zip(raw.to_pylist(), nodes, seqs, strict=True):
            if signer is None:
                proofs.append(None)
                continue
            proof, new = self.keyring.judge(
                node, None if signer == UNSIGNED else "" if signer == BAD_SIGNATURE else signer
            )
            if new:
                self._run(LEARN_KEY, {"node": node, "key": signer, "seq": seq})
            proofs.append(proof)
        tables = dict(staged.tables)
        tables["batch"] = batch.set_column(at, "proof", pa.array(proofs, pa.string()))
        return dataclasses.replace(staged, tables=tables)

    def _apply_events(self, staged: Staged) -> int:
        """In the open transaction: load the staging kinds that have rows (a folded batch:
        those SQL reads), fill `_new`, run the statements those inputs call for, fold the
        rest; then empty the temp tables again. Returns the number of new events (the batch
        less the duplicates)."""
        con = self.con
        folded = staged.events <= self.fold_max
        if folded and all(k in _DIRECT for k, t in staged.tables.items() if t.num_rows):
            return self._apply_direct(staged)
        filled = [
            kind
            for kind, table in staged.tables.items()
            if table.num_rows and not (folded and kind in _FOLD_ONLY)
        ]
        for kind in filled:
            con.from_arrow(_staged_rows(kind, staged.tables[kind])).insert_into(f"_{kind}")
        applied = int(self._run(FILL_NEW).fetchall()[0][0])
        if applied:
            if not folded:
                self._forget()
            with self._source("batch", staged.tables["batch"]):
                for statement in steps_for(_inputs(staged), folded=folded):
                    self._run(statement)
            if folded:
                new = None if applied == staged.events else self._new_seqs()
                events = _events(staged, new)
                self._fold_all(events)
            self._run("DELETE FROM _new")
        for kind in filled:
            self._run(f"DELETE FROM _{kind}")
        return applied

    def _apply_direct(self, staged: Staged) -> int:
        """A small batch of no kind that only SQL reads: no staging table at all. Its
        duplicates are found with one keyed read of `events` (`FILL_NEW`'s test: same
        `event_id` and `occurred_at`); `events` gets its Arrow rows, the fact tables
        `fact_rows`, the current-state tables their folds."""
        batch = staged.tables["batch"]
        stamps = batch.column("occurred_at")
        span = pc.min_max(stamps)
        stored = set(
            self._run(
                FIND_DUPLICATES,
                {
                    "ids": batch.column("event_id").to_pylist(),
                    "lo": span["min"].as_py(),
                    "hi": span["max"].as_py(),
                },
            ).fetchall()
        )
        new = None
        if stored:
            pairs = zip(batch.column("event_id").to_pylist(), stamps.to_pylist(), strict=True)
            keep = pa.array([p not in stored for p in pairs], pa.bool_())
            batch = batch.filter(keep)
            new = set(batch.column("seq").to_pylist())
        if not batch.num_rows:
            return 0
        with self._source("batch", batch):
            self._run(INSERT_BATCH_EVENTS)
        events = _events(staged, new)
        for table in FACT_KINDS:
            columns = self._schemas[table].names
            if rows := fact_rows(table, columns, events):
                self._insert(table, pa.Table.from_pylist(rows, schema=self._schemas[table]))
        self._fold_all(events)
        return int(batch.num_rows)

    def _insert(self, table: str, rows: pa.Table) -> None:
        """Insert `rows` (of `self._schemas[table]`) through the table's registered source:
        half the cost of binding a new Arrow relation for each insert."""
        with self._source(table, rows):
            self._run(f"INSERT INTO {table} SELECT * FROM _rows_{table}")

    @contextlib.contextmanager
    def _source(self, table: str, rows: pa.Table) -> Iterator[None]:
        """`rows` readable as `_rows_<table>` for the duration."""
        source = self._sources[table]
        source.table = rows
        try:
            yield
        finally:
            source.table = source.empty

    def _new_seqs(self) -> set[int]:
        return {int(r[0]) for r in self._run("SELECT seq FROM _new").fetchall()}

    def _fold_all(self, events: list[Event]) -> None:
        """Replace the current-state rows the events touch by the rows `projections.store.batch_fold`
        computes for them: per table, a keyed delete of the stored ones and an Arrow insert.
        The stored rows come from `_cached` (this writer's own recent rows) or are read;
        one statement finds which of the other keys are stored at all, so a batch of new
        and recently written keys (the steady state) reads no row."""
        groups = {f.name: g for f in FOLDS if (g := f.select(events))}
        if not groups:
            return
        stored: dict[str, dict[Any, Row]] = {t: {} for t in groups}
        unknown: dict[str, list[Any]] = {}
        for table, g in groups.items():
            cache = self._cached[table]
            for key in g:
                row = cache.get(key)
                if row is not None:
                    stored[table][key] = row
                else:
                    unknown.setdefault(table, []).append(key)
        if unknown:
            for table in self._stored_among(unknown):
                stored[table].update(self._read(_BY_TABLE[table], unknown[table]))
        for f in FOLDS:
            if f.name in groups:
                self._replace(f, groups[f.name], stored[f.name], self._look(f, groups[f.name]))

    def _look(self, f: Fold, groups: dict[Any, list[Event]]) -> Look:
        """The rows (as of this batch, folded already) of the table `f` looks up, that the
        events of `groups` name (a task's terminal events: the attempts they claim)."""
        if f.lookup is None:
            return f.look({})
        wanted = f.looked_up(groups)
        cache = self._cached[f.lookup.table]
        rows = {k: cache[k] for k in wanted if k in cache}
        missing = [k for k in wanted if k not in rows]
        if missing:
            rows.update(self._read(_BY_TABLE[f.lookup.table], missing))
        return f.look(rows)

    def _stored_among(self, unknown: dict[str, list[Any]]) -> set[str]:
        """The tables where some of their `unknown` keys are stored: one statement."""
        params = {t: _key_param(t, unknown.get(t, [])) for t in _BY_TABLE}
        attempts = unknown.get("attempts", [])
        params["attempt_tasks"] = list({t for t, _ in attempts}) or [""]
        return {r[0] for r in self._run(_STORED_AMONG, params).fetchall()}

    def _read(self, f: Fold, keys: list[Any]) -> dict[Any, Row]:
        where, params = _keyed(f, keys)
        cur = self.con.execute(f"SELECT * FROM {f.name} WHERE {where}", params)
        names = [d[0] for d in cur.description or []]
        rows = (dict(zip(names, values, strict=True)) for values in cur.fetchall())
        return {f.key_of(row): row for row in rows}

    def _replace(
        self, f: Fold, groups: dict[Any, list[Event]], stored: dict[Any, Row], look: Look
    ) -> None:
        rows = [f.fold(key, stored.get(key), evs, look) for key, evs in groups.items()]
        if stored:
            where, params = _keyed(f, list(stored))
            self.con.execute(f"DELETE FROM {f.name} WHERE {where}", params)
        self._insert(f.name, pa.Table.from_pylist(rows, schema=self._schemas[f.name]))
        cache = self._cached[f.name]
        for key, row in zip(groups, rows, strict=True):
            cache[key] = row
            cache.move_to_end(key)
        while len(cache) > CACHED_ROWS:
            cache.popitem(last=False)

    def _forget(self, learned: dict[str, str] | None = None) -> None:
        """Empty `_cached`: after a rollback (with the keys learned before the batch), or
        before SQL rewrites the tables."""
        for cache in self._cached.values():
            cache.clear()
        if learned is not None:
            self.keyring.learned = learned

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


_UNSTAGED: Final = ("subject", "payload")
"""The columns of the batch that `_batch` leaves out (see `projections.store.apply.INSERT_EVENTS`)."""


def _staged_rows(kind: str, table: pa.Table) -> pa.Table:
    """What the temp table of `kind` holds of its Arrow table."""
    return table.drop_columns(list(_UNSTAGED)) if kind == "batch" else table


class _ArrowSource:
    """An Arrow table DuckDB reads at each scan: registered once, refilled per insert."""

    def __init__(self, empty: pa.Table) -> None:
        self.empty = self.table = empty

    def __arrow_c_schema__(self) -> object:
        return self.table.schema.__arrow_c_schema__()

    def __arrow_c_stream__(self, requested_schema: object = None) -> object:
        return self.table.__arrow_c_stream__(requested_schema)


CACHED_ROWS = 2_000
"""Rows of each folded table the writer keeps (see `ProjectionStore._fold_all`): a live
key is touched over a task's few seconds, and a task's row is a few kB of Python objects."""

_BY_TABLE: Final[dict[str, Fold]] = {f.name: f for f in FOLDS}


def _keyed(f: Fold, keys: list[Any]) -> tuple[str, dict[str, Any]]:
    """The WHERE clause selecting `keys` of `f.name`, and its parameters."""
    if len(f.keys) == 1:
        return f"list_contains($k, {f.keys[0]})", {"k": keys}
    # (task_id, attempt): the strings first, they are cheaper to compare.
    where = "list_contains($t, task_id) AND list_contains($k, {'t': task_id, 'a': attempt})"
    return where, {"t": list({t for t, _ in keys}), "k": _key_param("attempts", keys)}


def _key_param(table: str, keys: list[Any]) -> list[Any]:
    """`keys` as a list parameter (never empty: DuckDB cannot type an empty list; the
    placeholder matches no row, as every key column is NOT NULL and no id is empty)."""
    if table == "attempts":
        return [{"t": t, "a": a} for t, a in keys] or [{"t": "", "a": -1}]
    return list(keys) or [""]


_STORED_AMONG = """
SELECT 'tasks' FROM tasks WHERE list_contains($tasks, task_id)
UNION SELECT 'attempts' FROM attempts
    WHERE list_contains($attempt_tasks, task_id)
      AND list_contains($attempts, {'t': task_id, 'a': attempt})
UNION SELECT 'containers' FROM containers WHERE list_contains($containers, container_id)
UNION SELECT 'workspaces' FROM workspaces WHERE list_contains($workspaces, path)
UNION SELECT 'instances' FROM instances WHERE list_contains($instances, instance_id)
"""

FIND_DUPLICATES = """
SELECT event_id, occurred_at FROM events
WHERE occurred_at BETWEEN $lo AND $hi AND list_contains($ids, event_id)
"""
"""The events of a batch already applied (see `projections.store.apply.FILL_NEW`)."""

_FOLDED_STATEMENTS: Final = (
    FILL_NEW,
    *steps_for((*STAGING, TASK_SCOPE, ATTEMPT_SCOPE), folded=True),
)
_FOLD_ONLY: Final[frozenset[str]] = frozenset(
    kind
    for kind in STAGING
    if not any(re.search(rf"\b_{kind}\b", sql) for sql in _FOLDED_STATEMENTS)
)
"""The staging kinds that only the folded `MERGE`s read: a folded batch does not load them."""

_DIRECT: Final[frozenset[str]] = frozenset({"batch", *_FOLD_ONLY, *FACT_KINDS.values()})
"""A folded batch of these kinds only needs no staging table (`ProjectionStore._apply_direct`)."""


def _events(staged: Staged, new: set[int] | None) -> list[Event]:
    """The batch's events as `projections.store.batch_fold` reads them, in stream order: each envelope
    with the row of its kind (`kind` names it; None for an event of no kind); `new`: only
    these sequences (None: all)."""
    envelopes = staged.tables["batch"].drop_columns(["subject", "payload"]).to_pylist()
    by_seq: dict[int, Event] = {}
    for e in envelopes:
        if new is None or e["seq"] in new:
            e["_kind"] = None
            by_seq[e["seq"]] = e
    for kind, table in staged.tables.items():
        if kind == "batch" or not table.num_rows:
            continue
        for row in table.to_pylist():
            e = by_seq.get(row["seq"])
            if e is not None:
                e.update(row)
                e["_kind"] = kind
    return sorted(by_seq.values(), key=lambda e: e["seq"])


def _inputs(staged: Staged) -> frozenset[str]:
    """The inputs of `projections.store.apply.steps_for` that hold rows in `staged`: its non-empty
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
