"""The Python fold of small batches (`projections.store.batch_fold`) against the set-based `MERGE`s.

The same history is projected twice into real DuckDB files: once in a single batch
through the `MERGE`s, once cut into small batches (some of them re-sent, so they hold
duplicates) through the fold. Every row of every table must be equal.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path
from typing import Any

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.store.store import ProjectionStore
from projections.stream.decode import decode_batch, stage
from schemas import AttemptFinished, Event, ResourceAlert, ResourceRecovered, encode_event
from testing.snapshot import snapshot
from testing.synthetic import AttemptPlan, HistoryBuilder
from tests.test_reconcile_projection import history as node_history

_PLANS = (
    AttemptPlan(),
    AttemptPlan(error="NONZERO_EXIT", exit_code=1),
    AttemptPlan(error="EXECUTION_TIMEOUT", exit_code=137, kill_reason="timeout"),
    AttemptPlan(error="OOM_KILLED", exit_code=137),
    AttemptPlan(leak_container=True),
    AttemptPlan(leak_workspace=True, error="NONZERO_EXIT", exit_code=2),
    AttemptPlan(fail_cleanup=("remove_container",)),
    AttemptPlan(fail_cleanup=("remove_container", "remove_workspace"), resolve_failed_cleanup=True),
)

_TASK = st.one_of(
    st.lists(st.sampled_from(_PLANS), min_size=1, max_size=3),  # a whole task
    st.just("rejected"),
    st.just("in_flight"),  # an attempt that has not finished
    st.just("forged"),  # another instance's end of a running attempt, then the real end
    st.just("lost"),  # an attempt left open, closed by another instance, the task failed
)


def forged(b: HistoryBuilder, tid: str) -> None:
    """A task whose running attempt gets a forged `attempt.finished` and `task.succeeded`
    from an instance that never ran it; then the real, failed, end."""
    b.submit(tid)
    b.attempt(tid, 1, _PLANS[1], finish=False)
    owner, b.instance_id = b.instance_id, "forger"
    b.emit(AttemptFinished, tid, 1, outcome="succeeded", exit_code=0, duration_s=0.1)
    b.succeed(tid, 1)
    b.instance_id = owner
    b.emit(
        AttemptFinished,
        tid,
        1,
        outcome="failed",
        exit_code=1,
        error_type="user_code",
        error_code="NONZERO_EXIT",
        duration_s=0.4,
    )
    b.fail(tid, 1, "NONZERO_EXIT", exit_code=1)


def lost(b: HistoryBuilder, tid: str) -> None:
    """A task whose attempt's owner died: another instance closes the attempt as lost and
    fails the task (both applied: the design lets it)."""
    b.submit(tid)
    b.attempt(tid, 1, finish=False)
    b.instance_id = "boot-2"
    b.emit(
        AttemptFinished,
        tid,
        1,
        outcome="failed",
        error_type="infrastructure",
        error_code="SUPERVISOR_LOST",
    )
    b.fail(tid, 1, "SUPERVISOR_LOST")


def build(tasks: list[Any], seed: int) -> list[Event]:
    """Each task from its own builder, the tasks interleaved (each keeps its order), then a
    second daemon's node and reconciler events."""
    per_task = []
    for i, plan in enumerate(tasks):
        b = HistoryBuilder(id_prefix=f"g{i}")
        tid = f"t-g{i}"
        if plan == "rejected":
            b.submit(tid)
            b.reject(tid)
        elif plan == "in_flight":
            b.submit(tid)
            b.attempt(tid, 1, finish=False)
        elif plan == "forged":
            forged(b, tid)
        elif plan == "lost":
            lost(b, tid)
        else:
            b.run_task(tid, *plan)
        per_task.append(b.events)
    rnd = random.Random(seed)
    out: list[Event] = []
    while any(per_task):
        events = rnd.choice([e for e in per_task if e])
        out.append(events.pop(0))
    node = node_history()
    at = node[-1].occurred_at
    alerts = [
        cls(
            event_id=f"a{i}",
            occurred_at=at,
            node_id="n1",
            instance_id="boot-2",
            metric="memory_pct",
            value=91.5 - 10 * i,
            threshold=85.0,
        )
        for i, cls in enumerate((ResourceAlert, ResourceRecovered))
    ]
    return out + node + alerts


def project(
    db: Path,
    events: list[Event],
    batches: list[tuple[int, int]],
    fold_max: int,
    reopen_every: int = 0,
) -> Any:
    """Apply the batches; `reopen_every` n batches, close and reopen the file (the writer
    then knows none of the stored rows and reads them)."""
    payloads = [encode_event(e) for e in events]
    store = ProjectionStore(db, fold_max=fold_max)
    try:
        for i, (lo, hi) in enumerate(batches, start=1):
            seqs = list(range(lo + 1, hi + 1))
            store.apply(
                stage(
                    decode_batch(
                        seqs,
                        [events[s - 1].subject() for s in seqs],
                        [0] * len(seqs),
                        payloads[lo:hi],
                    )
                )
            )
            if reopen_every and i % reopen_every == 0:
                store.close()
                store = ProjectionStore(db, fold_max=fold_max)
    finally:
        store.close()
    con = duckdb.connect(str(db), read_only=True)
    try:
        return snapshot(con)
    finally:
        con.close()


def small_batches(n: int, seed: int) -> list[tuple[int, int]]:
    """Cuts of 1 to 8 events; one batch in three also re-sends up to 5 events before it."""
    rnd = random.Random(seed)
    out, pos = [], 0
    while pos < n:
        hi = min(n, pos + rnd.randint(1, 8))
        lo = max(0, pos - rnd.randint(1, 5)) if rnd.random() < 1 / 3 else pos
        out.append((lo, hi))
        pos = hi
    return out


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(tasks=st.lists(_TASK, min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_the_fold_of_small_batches_equals_the_merge_of_the_whole(
    tmp_dir: Path, tasks: list[Any], seed: int
) -> None:
    events = build(tasks, seed)
    dbs = [tmp_dir / f"{seed}-{len(events)}-{kind}.duckdb" for kind in ("merge", "fold")]
    for db in dbs:
        db.unlink(missing_ok=True)
    merged = project(dbs[0], events, [(0, len(events))], fold_max=0)
    folded = project(
        dbs[1], events, small_batches(len(events), seed), fold_max=10**6, reopen_every=seed % 4
    )

    assert all(merged[t] for t in ("tasks", "attempts", "instances", "alerts"))
    assert folded == merged


def test_an_end_from_an_instance_that_does_not_own_the_attempt_is_not_applied(
    tmp_dir: Path,
) -> None:
    """The forged ends arrive first and change nothing, in one batch and event by event;
    the lost attempt's closing by another instance is applied."""
    events = build(["forged", "lost"], seed=1)
    for name, batches, fold_max in (
        ("merge", [(0, len(events))], 0),
        ("fold", [(i, i + 1) for i in range(len(events))], 10**6),
    ):
        project(tmp_dir / f"{name}.duckdb", events, batches, fold_max=fold_max)
        con = duckdb.connect(str(tmp_dir / f"{name}.duckdb"), read_only=True)
        try:
            tasks = con.execute(
                "SELECT task_id, state, error_code, terminal_events FROM tasks WHERE task_id LIKE 't-g%' "
                "ORDER BY task_id"
            ).fetchall()
            attempts = con.execute(
                "SELECT task_id, outcome, exit_code, error_code, instance_id "
                "FROM attempts WHERE task_id LIKE 't-g%' ORDER BY task_id"
            ).fetchall()
            conflicts = con.execute(
                "SELECT task_id, scope, conflict_outcome, reason, instance_id, first_outcome "
                "FROM terminal_conflicts"
            ).fetchall()
        finally:
            con.close()
        assert tasks == [
            ("t-g0", "failed", "NONZERO_EXIT", 2),
            ("t-g1", "failed", "SUPERVISOR_LOST", 1),
        ], name
        assert attempts == [
            ("t-g0", "failed", 1, "NONZERO_EXIT", "boot-1"),
            ("t-g1", "failed", None, "SUPERVISOR_LOST", "boot-1"),
        ], name
        assert conflicts == [
            ("t-g0", "attempt", "succeeded", "not_owner", "forger", "failed"),
            ("t-g0", "task", "succeeded", "not_owner", "forger", "failed"),
        ], name


def test_a_batch_above_the_bound_is_merged_and_gives_the_same_rows(tmp_dir: Path) -> None:
    events = build([[_PLANS[0]], [_PLANS[2], _PLANS[6]], "in_flight"], seed=3)
    cut = list(itertools.pairwise([0, 9, 10, len(events)]))
    merged = project(tmp_dir / "m.duckdb", events, cut, fold_max=0)
    mixed = project(tmp_dir / "x.duckdb", events, cut, fold_max=5)  # 9 and the rest merge
    assert mixed == merged
