"""The store on its own (no NATS): which statements a batch runs, and that leaving out the
ones whose inputs are empty changes no row, whatever the batch boundaries."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import duckdb
import pytest

from projections.store.apply import (
    APPLY_STATEMENTS,
    ATTEMPT_SCOPE,
    FILL_NEW,
    INSERT_BATCH_EVENTS,
    INSERT_EVENTS,
    MERGE_ATTEMPTS,
    MERGE_CONTAINERS,
    MERGE_INSTANCES,
    MERGE_TASKS,
    SET_WATERMARK,
    TASK_SCOPE,
    steps_for,
)
from projections.store.store import FIND_DUPLICATES, FOLD_MAX_EVENTS, ProjectionStore
from projections.stream.decode import decode_batch, stage
from schemas import (
    BreakerTransition,
    Event,
    NodeHeartbeat,
    NodeInventory,
    ObservedContainer,
    ObservedWorkspace,
    ReconcileDecision,
    ReconcileOutcome,
    ResourceAlert,
    ResourceRecovered,
    ResourceSample,
    SupervisorStarted,
    SupervisorStopped,
    encode_event,
)
from testing.synthetic import AttemptPlan, HistoryBuilder
from tests.test_projections import tables

POISON = b'{"type": "task.submitted"}'


def history() -> list[Event]:
    """Every kind of event: tasks that succeed, retry after a timeout, are OOM-killed, are
    rejected, leak resources or fail a cleanup; node, resource, breaker and reconciler
    events in between."""
    b = HistoryBuilder()
    b.emit(SupervisorStarted, pid=7, role="serve")
    b.emit(NodeHeartbeat, interval_s=1.0, timeout_s=3.0)
    b.run_task("t-ok", AttemptPlan())
    b.emit(ResourceAlert, metric="cpu_pct", value=95.0, threshold=90.0)
    b.emit(ResourceSample, cpu_pct=95.0, memory_pct=10.0, disk_pct=5.0)
    b.run_task(
        "t-retry",
        AttemptPlan(error="EXECUTION_TIMEOUT", exit_code=137, kill_reason="timeout"),
        AttemptPlan(),
    )
    b.emit(BreakerTransition, from_state="closed", to_state="open", reason="failures")
    b.run_task("t-oom", AttemptPlan(error="OOM_KILLED", exit_code=137), max_attempts=1)
    b.submit("t-bad")
    b.reject("t-bad")
    b.emit(ResourceRecovered, metric="cpu_pct", value=20.0, threshold=90.0)
    b.run_task("t-leak", AttemptPlan(leak_container=True, leak_workspace=True))
    b.run_task(
        "t-cleanup",
        AttemptPlan(fail_cleanup=("kill", "remove_workspace"), resolve_failed_cleanup=True),
    )
    b.emit(NodeHeartbeat, interval_s=1.0, timeout_s=3.0)
    leaked = ObservedContainer(container_id="c-t-leak-1", state="exited", created=1767225600.0)
    ws = ObservedWorkspace(path=b.workspace_path("t-leak", 1), created=1767225600.0)
    b.emit(NodeInventory, workspace_root="/data/workspaces", containers=(leaked,), workspaces=(ws,))
    b.emit(
        ReconcileDecision,
        rule="orphan_container",
        resource_kind="container",
        resource="c-t-leak-1",
        action="remove_container",
        command_id="cmd-1",
        resource_task_id="t-leak",
        resource_attempt=1,
    )
    b.emit(
        ReconcileOutcome,
        command_id="cmd-1",
        outcome="succeeded",
        action="remove_container",
        resource="c-t-leak-1",
    )
    b.emit(NodeInventory, workspace_root="/data/workspaces", workspaces=(ws,))
    b.emit(SupervisorStopped, reason="exit")
    return b.events


def messages(events: list[Event]) -> list[bytes]:
    """The payloads, with a poison message and a repeat of an event applied long before."""
    payloads = [encode_event(e) for e in events]
    return [*payloads[:20], POISON, *payloads[20:], payloads[5]]


def project(db: Path, payloads: list[bytes], cuts: tuple[int, ...] = ()) -> list[Any]:
    """Apply `payloads` (stream sequences 1, 2, ...) in batches cut before each index of
    `cuts`; returns what each batch did."""
    bounds = [0, *cuts, len(payloads)]
    results = []
    with ProjectionStore(db) as store:
        for lo, hi in itertools.pairwise(bounds):
            seqs = list(range(lo + 1, hi + 1))
            batch = decode_batch(
                seqs, [f"sup.x.{s}" for s in seqs], [s * 1000 for s in seqs], payloads[lo:hi]
            )
            results.append(store.apply(stage(batch)))
    return results


def test_each_statement_runs_only_for_the_inputs_it_reads() -> None:
    assert steps_for({"batch"}) == (INSERT_EVENTS, MERGE_INSTANCES)
    assert steps_for({"batch", "container", TASK_SCOPE, ATTEMPT_SCOPE}) == (
        INSERT_EVENTS,
        MERGE_ATTEMPTS,
        MERGE_TASKS,
        MERGE_CONTAINERS,
        MERGE_INSTANCES,
    )
    assert len(steps_for({"batch", "inventory"})) == 2 + 6  # inventories, latest, observed x4
    everything = {"batch", *(r for s in APPLY_STATEMENTS for r in s.reads)}
    assert steps_for(everything) == tuple(s.sql for s in APPLY_STATEMENTS)


def test_batches_of_one_event_give_the_rows_of_one_batch(tmp_dir: Path) -> None:
    payloads = messages(history())
    whole, pieces, singles = tmp_dir / "a.duckdb", tmp_dir / "b.duckdb", tmp_dir / "c.duckdb"

    project(whole, payloads)
    project(pieces, payloads, cuts=(3, 9, 10, 21, 22, 40, 41, 42, 70))
    per_event = project(singles, payloads, cuts=tuple(range(1, len(payloads))))

    expected = tables(whole)
    assert tables(pieces) == expected
    assert tables(singles) == expected
    assert [(r.applied, r.duplicates, r.dead) for r in per_event[19:22]] == [
        (1, 0, 0),
        (0, 0, 1),
        (1, 0, 0),
    ]
    assert (per_event[-1].applied, per_event[-1].duplicates) == (0, 1)
    assert len(expected["events"]) == len(payloads) - 2
    assert expected["dead_letters"][0][:2] == (21, "sup.x.21")


class _Recording:
    """A connection that records the SQL it is given, and otherwise is the connection."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self.sql: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.con, name)

    def execute(self, sql: str | duckdb.Statement, *args: Any) -> Any:
        self.sql.append(sql if isinstance(sql, str) else sql.query)
        return self.con.execute(sql, *args)


_KEYED = "list_contains($k, instance_id)"
_MERGED = (
    [
        FILL_NEW,
        INSERT_EVENTS,
        MERGE_INSTANCES,
        "DELETE FROM _new",
        "DELETE FROM _batch",
        "DELETE FROM _instance",
        SET_WATERMARK,
    ],
    [FILL_NEW, "DELETE FROM _batch", "DELETE FROM _instance", SET_WATERMARK],
)
# Folded in Python, with no staging table: the duplicate check, the event's Arrow row, then
# the instance's row, known from the batches before, replaced.
_FOLDED = (
    [FIND_DUPLICATES, INSERT_BATCH_EVENTS,
     f"DELETE FROM instances WHERE {_KEYED}",
     "INSERT INTO instances SELECT * FROM _rows_instances", SET_WATERMARK],
    [FIND_DUPLICATES, SET_WATERMARK],
)  # fmt: skip


@pytest.mark.parametrize(
    ("fold_max", "expected"), [(0, _MERGED), (FOLD_MAX_EVENTS, _FOLDED)], ids=["merge", "fold"]
)
def test_a_heartbeat_runs_the_events_insert_and_the_instances_merge_only(
    tmp_dir: Path, fold_max: int, expected: tuple[list[str], list[str]]
) -> None:
    events = history()
    payloads = [encode_event(e) for e in events]
    beat = next(i for i, e in enumerate(events) if isinstance(e, NodeHeartbeat) and i > 2)
    with ProjectionStore(tmp_dir / "p.duckdb", fold_max=fold_max) as store:
        recording = _Recording(store.con)
        store.con = recording  # type: ignore[assignment]
        for seq in (1, 2, beat + 1):
            recording.sql.clear()
            batch = decode_batch([seq], ["sup.x"], [0], [payloads[seq - 1]])
            store.apply(stage(batch))
        assert recording.sql == expected[0]
        beats = sum(isinstance(events[seq - 1], NodeHeartbeat) for seq in (1, 2, beat + 1))
        assert store.con.execute("SELECT sum(heartbeats) FROM instances").fetchall() == [(beats,)]

        recording.sql.clear()  # the heartbeat again: a duplicate, nothing to merge
        store.apply(stage(decode_batch([beat + 1], ["sup.x"], [0], [payloads[beat]])))
        assert recording.sql == expected[1]

        left = {
            t: store.con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]
            for t in ("_new", "_batch", "_instance", "_container")
        }
        assert left == {"_new": 0, "_batch": 0, "_instance": 0, "_container": 0}


def test_threads_set_the_worker_threads_of_the_file_and_its_query_cursors(
    tmp_dir: Path,
) -> None:
    def threads(con: duckdb.DuckDBPyConnection) -> Any:
        return con.execute("SELECT current_setting('threads')").fetchall()[0][0]

    with ProjectionStore(tmp_dir / "live.duckdb", threads=1) as store:
        cursor = store.con.cursor()
        assert (threads(store.con), threads(cursor)) == (1, 1)
        cursor.close()
