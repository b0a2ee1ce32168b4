"""The node and reconciler events in a real DuckDB projection: exact rows of `instances`,
`inventories`, `observed_*`, `reconcile_decisions`/`_outcomes` and `reconcile_commands`;
rows independent of batch boundaries; the state the reconciler reads back (and that it
waits for its own inventory); and the audit rule that every decision gets an outcome."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb

from projections.audit import Record, audit_db, audit_records, records_of
from projections.serve.reconcile_state import DuckDBState, cursor_runner, read_state
from projections.store.store import ProjectionStore
from projections.stream.decode import decode_batch, stage
from schemas import (
    Event,
    NodeHeartbeat,
    NodeInventory,
    ObservedContainer,
    ObservedWorkspace,
    ReconcileDecision,
    ReconcileOutcome,
    SupervisorStarted,
    SupervisorStopped,
    encode_event,
)
from supervisor.policy.divergence import RuleConfig, decide
from testing.snapshot import table_rows
from testing.synthetic import AttemptPlan, HistoryBuilder
from tests.test_projections import query as rows

LABELS = {
    "supervisor.managed": "true",
    "supervisor.node": "n1",
    "supervisor.task": "t-1",
    "supervisor.attempt": "1",
    "supervisor.instance": "boot-1",
    "supervisor.deadline": "1767225610.0",
}
ROOT = "/data/workspaces"  # where the history builder puts them
MINE = (
    "instances",
    "inventories",
    "observed_containers",
    "observed_workspaces",
    "reconcile_decisions",
    "reconcile_outcomes",
)


def history() -> list[Event]:
    """t-1 leaks its container and workspace; a second daemon starts, heartbeats, observes
    them twice, decides, orders and carries out the removal; boot-1 stops."""
    b = HistoryBuilder()
    b.run_task("t-1", AttemptPlan(leak_container=True, leak_workspace=True))
    at = b.events[-1].occurred_at

    def add(cls: type[Event], instance: str = "boot-2", **kw: Any) -> None:
        b.events.append(
            cls(
                event_id=f"r{len(b.events)}",
                occurred_at=at,
                node_id="n1",
                instance_id=instance,
                **kw,
            )
        )

    leaked = ObservedContainer(
        container_id="c-t-1-1", state="exited", created=1767225600.0, labels=LABELS
    )
    stray = ObservedContainer(
        container_id="c-stray",
        state="running",
        created=1767225000.0,
        labels={"supervisor.managed": "true", "supervisor.node": "n1"},
    )
    ws = ObservedWorkspace(path=f"{ROOT}/t-1.1.x", created=1767225600.0)
    add(SupervisorStarted, role="serve", pid=42)
    add(NodeHeartbeat, interval_s=1.0, timeout_s=3.0)
    add(
        NodeInventory,
        observed_at=at,
        workspace_root=ROOT,
        containers=(leaked, stray),
        workspaces=(ws,),
    )
    add(NodeHeartbeat, interval_s=1.0, timeout_s=3.0)
    add(NodeInventory, observed_at=at, workspace_root=ROOT, containers=(leaked,), workspaces=(ws,))
    add(
        ReconcileDecision,
        rule="orphan_container",
        resource_kind="container",
        resource="c-t-1-1",
        action="remove_container",
        evidence_seqs=(4, 8, 13),
        command_id="cmd-a",
        reason="observed, and its task succeeded",
        resource_task_id="t-1",
        resource_attempt=1,
        since=at,
    )
    add(
        ReconcileDecision,
        rule="leaked_workspace",
        resource_kind="workspace",
        resource=f"{ROOT}/t-1.1.x",
        action="remove_workspace",
        evidence_seqs=(13,),
        command_id="cmd-b",
        dry_run=True,
    )
    add(
        ReconcileOutcome,
        command_id="cmd-a",
        outcome="failed",
        final=False,
        delivery=1,
        action="remove_container",
        resource="c-t-1-1",
        detail="docker down",
    )
    add(
        ReconcileOutcome,
        command_id="cmd-a",
        outcome="succeeded",
        delivery=2,
        action="remove_container",
        resource="c-t-1-1",
    )
    add(SupervisorStopped, instance="boot-1", reason="exit")
    return b.events


def project(db: Path, events: list[Event], cuts: tuple[int, ...] = ()) -> None:
    """Apply `events` to `db` in batches cut before each index of `cuts`."""
    bounds = [0, *cuts, len(events)]
    with ProjectionStore(db) as store:
        for lo, hi in itertools.pairwise(bounds):
            part = events[lo:hi]
            batch = decode_batch(
                list(range(lo + 1, hi + 1)),
                [e.subject() for e in part],
                [0] * len(part),
                [encode_event(e) for e in part],
            )
            store.apply(stage(batch))


def test_the_node_and_reconciler_tables_hold_exact_rows(tmp_dir: Path) -> None:
    events = history()
    db = tmp_dir / "p.duckdb"
    project(db, events)
    t = events[7].occurred_at.replace(tzinfo=None)  # when t-1 ended

    assert rows(
        db,
        "SELECT instance_id, role, pid, started_seq, stopped_seq, heartbeats, "
        "last_heartbeat_seq, heartbeat_timeout_s, first_seq, last_seq, events "
        "FROM instances ORDER BY instance_id",
    ) == [
        ("boot-1", None, None, None, 18, 0, None, None, 1, 18, 9),
        ("boot-2", "serve", 42, 9, None, 2, 12, 3.0, 9, 17, 9),
    ]
    assert rows(
        db,
        "SELECT seq, instance_id, workspace_root, containers, workspaces "
        "FROM inventories ORDER BY seq",
    ) == [(11, "boot-2", ROOT, 2, 1), (13, "boot-2", ROOT, 1, 1)]
    assert rows(db, "SELECT * FROM observed_containers") == [
        (
            "n1",
            13,
            "c-t-1-1",
            "exited",
            datetime(2026, 1, 1),
            "t-1",
            1,
            "boot-1",
            datetime(2026, 1, 1, 0, 0, 10),
            True,
            "n1",
        )
    ]
    assert rows(db, "SELECT * FROM observed_workspaces") == [
        ("n1", 13, f"{ROOT}/t-1.1.x", datetime(2026, 1, 1), "t-1", 1)
    ]
    assert rows(
        db,
        "SELECT seq, rule, resource, evidence_seqs, command_id, dry_run, action, "
        "resource_task_id, resource_attempt, since FROM reconcile_decisions",
    ) == [
        (
            14,
            "orphan_container",
            "c-t-1-1",
            [4, 8, 13],
            "cmd-a",
            False,
            "remove_container",
            "t-1",
            1,
            t,
        ),
        (
            15,
            "leaked_workspace",
            f"{ROOT}/t-1.1.x",
            [13],
            "cmd-b",
            True,
            "remove_workspace",
            "_",
            0,
            None,
        ),
    ]
    assert rows(
        db, "SELECT seq, command_id, outcome, final, delivery, detail FROM reconcile_outcomes"
    ) == [(16, "cmd-a", "failed", False, 1, "docker down"), (17, "cmd-a", "succeeded", True, 2, "")]
    assert rows(
        db,
        "SELECT command_id, decision_seq, rule, action, resource, status, "
        "deliveries, outcome_seq FROM reconcile_commands",
    ) == [("cmd-a", 14, "orphan_container", "remove_container", "c-t-1-1", "succeeded", 2, 17)]


def test_the_rows_do_not_depend_on_where_batches_were_cut(tmp_dir: Path) -> None:
    events = history()
    whole, pieces, singles = tmp_dir / "a.duckdb", tmp_dir / "b.duckdb", tmp_dir / "c.duckdb"
    project(whole, events)
    project(pieces, events, cuts=(10, 12, 14, 16))
    project(singles, events, cuts=tuple(range(1, len(events))))
    snaps = []
    for db in (whole, pieces, singles):
        con = duckdb.connect(str(db), read_only=True)
        snaps.append({t: table_rows(con, t) for t in MINE})
        con.close()
    assert snaps[0] == snaps[1] == snaps[2]


def test_the_state_is_read_once_the_inventory_is_projected(tmp_dir: Path) -> None:
    events = history()
    db = tmp_dir / "p.duckdb"
    project(db, events[:10])
    con = duckdb.connect(str(db))
    try:
        assert read_state(con.cursor(), "n1", "r10") is None
    finally:
        con.close()
    db = tmp_dir / "later.duckdb"
    project(db, events)
    con = duckdb.connect(str(db))
    try:
        state = read_state(con.cursor(), "n1", "r10")
    finally:
        con.close()
    assert state is not None
    assert (state.inventory.seq, sorted(state.inventory.containers)) == (13, ["c-t-1-1"])
    assert sorted(state.containers) == ["c-t-1-1"]
    assert sorted(state.workspaces) == [f"{ROOT}/t-1.1.x"]
    assert [(k, a.finished_seq) for k, a in state.attempts.items()] == [(("t-1", 1), 7)]
    assert (state.tasks["t-1"].state, state.tasks["t-1"].correlation_id) == (
        "succeeded",
        "corr-t-1",
    )
    assert sorted(state.instances) == ["boot-1", "boot-2"]
    assert state.instances["boot-2"].heartbeat_timeout_s == 3.0
    assert state.open_commands == frozenset()
    assert dict(state.finals) == {("remove_container", "c-t-1-1"): 1}
    assert dict(state.finals_at) == {("remove_container", "c-t-1-1"): events[16].occurred_at}
    verdict = decide(state, datetime(2026, 1, 1, 0, 5, tzinfo=UTC), RuleConfig())
    assert [(d.rule, d.resource, d.evidence) for d in verdict] == [
        ("orphan_container", "c-t-1-1", (4, 8, 13)),
        ("leaked_workspace", f"{ROOT}/t-1.1.x", (3, 8, 13)),
    ]


async def test_duckdb_state_reads_through_a_cursor_runner(tmp_dir: Path) -> None:
    events = history()
    db = tmp_dir / "p.duckdb"
    project(db, events[:-3])
    with ProjectionStore(db) as store:
        on_cursor, close = cursor_runner(store.con)
        try:
            state = await DuckDBState(on_cursor).load("n1", "r12")
        finally:
            close()
    assert state is not None
    assert state.open_commands == frozenset({"cmd-a"})  # decided, no final outcome yet


def test_the_audit_wants_an_outcome_for_every_ordered_command(tmp_dir: Path) -> None:
    events = history()
    db = tmp_dir / "p.duckdb"
    project(db, events[:-2])  # cmd-a has only its failed, non-final delivery
    con = duckdb.connect(str(db), read_only=True)
    try:
        missing = [v for v in audit_db(con) if v.rule == "decision_without_outcome"]
    finally:
        con.close()
    assert [(v.rule, v.seqs, v.resource) for v in missing] == [
        ("decision_without_outcome", (14,), "c-t-1-1")
    ]
    records = records_of(events)
    assert not [v for v in audit_records(records) if v.rule == "decision_without_outcome"]


def test_a_decision_in_flight_is_spared_within_the_grace() -> None:
    at = datetime(2026, 1, 1, tzinfo=UTC)
    decision = Record(
        1, "reconcile.decision", "_", 0, at, resource="c1", command_id="cmd-x", dry_run=False
    )
    assert [v.rule for v in audit_records([decision], grace_s=10, now=at)] == []
    later = at + timedelta(seconds=11)
    assert [v.rule for v in audit_records([decision], grace_s=10, now=later)] == [
        "decision_without_outcome"
    ]
