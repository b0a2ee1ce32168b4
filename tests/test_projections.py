"""The projector against a real nats-server and real DuckDB files: live equals replay,
replay as of a point equals the live projection at that point, resume after a kill, poison
messages, idempotence, and the exact rows of the tables and views."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pytest

from projections.audit import audit_records, load_records
from projections.errors import ProjectionStoreError
from projections.serve.projector import Projector
from projections.serve.replay import replay
from projections.store.ddl import DDL_VERSION, TABLES
from projections.store.store import ProjectionStore
from schemas import AttemptFinished, CleanupSucceeded, Evidence, TaskSubmitted, encode_event
from supervisor.cli.main import main as cli_main
from testing.loadgen import publish
from testing.snapshot import tables
from testing.synthetic import AttemptPlan, HistoryBuilder, mixed_history

pytestmark = pytest.mark.nats

TIMEOUT = AttemptPlan(error="EXECUTION_TIMEOUT", exit_code=137, kill_reason="timeout")


def query(path: Path, sql: str) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


async def follow_until(db: Path, url: str, seq: int, **kw: Any) -> None:
    """Run the live projector on `db` until it has applied `seq`, then stop it."""
    stop = asyncio.Event()
    reached = asyncio.Event()

    def on_progress(p: Any) -> None:
        if p.seq >= seq:
            reached.set()

    with Projector(db, url, batch_size=kw.pop("batch_size", 50), batch_age_s=0.02, **kw) as p:
        task = asyncio.create_task(p.run(stop, progress=on_progress))
        await asyncio.wait_for(reached.wait(), 30)
        stop.set()
        await task


def scenario_history() -> list[Any]:
    """Every kind of outcome, leaks included: 16 tasks, 185 events."""
    b = HistoryBuilder(id_prefix="sc")
    b.run_task("t-ok")
    b.run_task("t-retried", TIMEOUT, AttemptPlan())
    b.run_task("t-exhausted", TIMEOUT, TIMEOUT, TIMEOUT)
    b.run_task("t-user", AttemptPlan(error="NONZERO_EXIT", exit_code=1))
    b.run_task("t-oom", AttemptPlan(error="OOM_KILLED", exit_code=137))
    b.run_task("t-leak-c", AttemptPlan(leak_container=True))
    b.run_task("t-leak-w", AttemptPlan(leak_workspace=True))
    b.run_task("t-cfail", AttemptPlan(fail_cleanup=("remove_container",)))
    b.run_task(
        "t-cfixed", AttemptPlan(fail_cleanup=("remove_workspace",), resolve_failed_cleanup=True)
    )
    b.submit("t-rejected")
    b.reject("t-rejected", "POLICY_VIOLATION")
    for i in range(5):
        b.run_task(f"t-bulk-{i}")
    b.submit("t-running")
    b.attempt("t-running", 1, finish=False)
    return b.events


async def test_live_projection_equals_replay_and_replay_until_equals_live_then(
    nats_url: str, tmp_dir: Path
) -> None:
    history = scenario_history() + mixed_history(900, id_prefix="mx")
    first, second = history[:500], history[500:]
    s1 = await publish(nats_url, first)
    live = tmp_dir / "live.duckdb"
    await follow_until(live, nats_url, s1)
    at_s1 = tables(live)

    again = [(e.subject(), encode_event(e)) for e in first[100:110]]  # same events, new msg ids
    poison = [
        ("sup.task.submitted.n1.t-x", b"{oops"),
        ("sup.bogus.thing.n1._", b'{"type":"bogus"}'),
    ]
    last = await publish(nats_url, [*second[:300], *again, *poison, *second[300:]])
    await follow_until(live, nats_url, last)  # restarted: resumes after s1

    full = tmp_dir / "full.duckdb"
    result = await replay(full, nats_url)
    assert result.seq == last == len(history) + 12
    assert (result.applied, result.duplicates, result.dead) == (len(history), 10, 2)
    live_rows, full_rows = tables(live), tables(full)
    for table in TABLES:
        assert live_rows[table] == full_rows[table], table
    assert len(full_rows["events"]) == len(history)

    batched = tmp_dir / "batched.duckdb"  # many bulk batches, decoded side by side
    result = await replay(batched, nats_url, batch_size=97)
    assert (result.applied, result.duplicates, result.dead) == (len(history), 10, 2)
    assert result.batches >= len(history) // 97
    batched_rows = tables(batched)
    for table in TABLES:
        assert batched_rows[table] == full_rows[table], table

    middle = tmp_dir / "middle.duckdb"  # through the command line this time
    argv = ["replay", "--db", str(middle), "--until-seq", str(s1), "--nats", nats_url]
    assert await asyncio.to_thread(cli_main, argv) == 0
    middle_rows = tables(middle)
    for table in TABLES:
        assert middle_rows[table] == at_s1[table], table

    (stored_at,) = query(live, f"SELECT stored_at FROM events WHERE seq = {s1}")[0]
    by_time = tmp_dir / "by_time.duckdb"
    await replay(by_time, nats_url, until_time=stored_at)
    assert tables(by_time)["projector_state"] == at_s1["projector_state"]
    assert tables(by_time)["events"] == at_s1["events"]


async def test_applying_events_twice_changes_nothing(nats_url: str, tmp_dir: Path) -> None:
    history = scenario_history()
    last = await publish(nats_url, history)
    db = tmp_dir / "p.duckdb"
    with Projector(db, nats_url, batch_size=40) as p:
        await p.catch_up()
    before = tables(db)
    store = ProjectionStore(db)
    store.con.execute("UPDATE projector_state SET seq = 25")
    store.close()
    with Projector(db, nats_url, batch_size=1000) as p:
        again = await p.catch_up()
    assert (again.applied, again.duplicates, again.seq) == (0, last - 25, last)
    assert tables(db) == before


async def test_poison_messages_are_dead_lettered_and_later_events_applied(
    nats_url: str, tmp_dir: Path
) -> None:
    b = HistoryBuilder(id_prefix="pz")
    b.run_task("t-before")
    ok = b.events[:]
    submitted = msgspec.json.decode(encode_event(ok[0]))
    future = encode_event(ok[0]).replace(b'"schema_version":1', b'"schema_version":99')
    no_spec = msgspec.json.encode(
        {k: v for k, v in submitted.items() if k != "spec"} | {"event_id": "pz-x"}
    )
    poison = [
        ("sup.task.submitted.n1.t-a", b"{not json"),
        ("sup.resource.bogus.n1._", b'{"type":"resource.bogus","event_id":"e1"}'),
        ("sup.task.submitted.n1.t-b", future),
        ("sup.task.submitted.n1.t-c", no_spec),
        ("sup.task.submitted.n1.t-d", b"[1, 2]"),
        ("sup.task.submitted.n1.t-e", b"\xff\xfe"),
    ]
    after = HistoryBuilder(id_prefix="pa", start=b.now() + timedelta(seconds=1))
    after.run_task("t-after")
    last = await publish(nats_url, [*ok, *poison, *after.events])
    db = tmp_dir / "p.duckdb"
    await follow_until(db, nats_url, last)

    n = len(ok)
    assert query(db, "SELECT seq, subject, reason FROM dead_letters ORDER BY seq") == [
        (n + 1, "sup.task.submitted.n1.t-a", "undecodable"),
        (n + 2, "sup.resource.bogus.n1._", "unknown_type"),
        (n + 3, "sup.task.submitted.n1.t-b", "unsupported_schema_version"),
        (n + 4, "sup.task.submitted.n1.t-c", "invalid_event"),
        (n + 5, "sup.task.submitted.n1.t-d", "undecodable"),
        (n + 6, "sup.task.submitted.n1.t-e", "undecodable"),
    ]
    assert query(db, "SELECT data FROM dead_letters WHERE seq = ?".replace("?", str(n + 1))) == [
        (b"{not json",)
    ]
    assert query(db, "SELECT task_id, state FROM tasks ORDER BY task_id") == [
        ("t-after", "succeeded"),
        ("t-before", "succeeded"),
    ]
    assert query(db, "SELECT seq FROM projector_state") == [(last,)]


_KILLABLE = """
import asyncio, sys, time
from projections.serve.projector import Projector


class StallingConnection:
    # The store's DuckDB connection, except that the commit of the first batch reaching
    # seq 1500 says so and stalls: the test kills the process there, inside the
    # transaction that has written the batch's rows and watermark.

    def __init__(self, con):
        self.con, self.seq = con, 0

    def __getattr__(self, name):
        return getattr(self.con, name)

    def execute(self, sql, params=None):
        if isinstance(params, dict) and "seq" in params:
            self.seq = params["seq"]
        return self.con.execute(sql, params)

    def commit(self):
        if self.seq >= 1500:
            print("committing", self.seq, flush=True)
            time.sleep(60)
        return self.con.commit()


async def main():
    with Projector(sys.argv[1], sys.argv[2], batch_size=int(sys.argv[3])) as p:
        p.store.con = StallingConnection(p.store.con)
        await p.catch_up(progress=lambda s: print("applied", s.seq, flush=True))

asyncio.run(main())
"""


async def test_killed_projector_resumes_with_no_gap_and_no_double_count(
    nats_url: str, tmp_dir: Path
) -> None:
    history = mixed_history(6000, id_prefix="kl")
    last = await publish(nats_url, history)
    db = tmp_dir / "killed.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE, str(db), nats_url, "150"],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None
    applied = 0
    while True:
        line = (await asyncio.to_thread(proc.stdout.readline)).decode().split()
        assert line, "the projector ended before it could be killed"
        if line[0] == "committing":
            killed_batch_end = int(line[1])
            break
        applied = int(line[1])
    os.kill(proc.pid, signal.SIGKILL)  # mid-batch: its rows are written, not committed
    proc.wait()
    proc.stdout.close()

    with Projector(db, nats_url, batch_size=1000) as p:
        resumed_from = p.last_seq
        assert applied <= resumed_from < killed_batch_end
        assert query_con(p.store.con, "SELECT count(*) FROM events") == resumed_from
        assert query_con(p.store.con, "SELECT max(seq) FROM events") == resumed_from
        result = await p.catch_up()
    assert (result.from_seq, result.applied, result.duplicates) == (
        resumed_from,
        last - resumed_from,
        0,
    )
    fresh = tmp_dir / "fresh.duckdb"
    await replay(fresh, nats_url)
    assert tables(db) == tables(fresh)
    assert query(db, "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM events") == [
        (last, last, 1, last)
    ]


async def test_cancelled_catch_up_rolls_back_its_batch_and_resumes(
    nats_url: str, tmp_dir: Path
) -> None:
    last = await publish(nats_url, mixed_history(4000, id_prefix="cc"))
    db = tmp_dir / "p.duckdb"
    tasks: list[asyncio.Task[Any]] = []

    def cancel_at_500(p: Any) -> None:
        if p.seq >= 500:
            tasks[0].cancel()

    with Projector(db, nats_url, batch_size=100) as p:
        tasks.append(asyncio.create_task(p.catch_up(progress=cancel_at_500)))
        task = tasks[0]
        with pytest.raises(asyncio.CancelledError):
            await task
        stopped = p.last_seq
        assert 500 <= stopped < last
        assert query_con(p.store.con, "SELECT count(*) FROM events") == stopped
        result = await p.catch_up()
    assert (result.from_seq, result.seq, result.applied) == (stopped, last, last - stopped)
    fresh = tmp_dir / "fresh.duckdb"
    await replay(fresh, nats_url)
    assert tables(db) == tables(fresh)


def query_con(con: duckdb.DuckDBPyConnection, sql: str) -> Any:
    return con.execute(sql).fetchall()[0][0]


async def test_leak_view_lists_exactly_the_resources_leaked_on_purpose(
    nats_url: str, tmp_dir: Path
) -> None:
    last = await publish(nats_url, scenario_history())
    db = tmp_dir / "p.duckdb"
    await follow_until(db, nats_url, last)
    rows = query(
        db,
        "SELECT kind, resource, state, task_id, attempt, task_state, cleanup_failures, "
        "last_cleanup_error, age_s > 0 FROM leaked_resources ORDER BY kind, resource",
    )
    assert rows == [
        (
            "container",
            "c-t-cfail-1",
            "exited",
            "t-cfail",
            1,
            "succeeded",
            1,
            "device or resource busy",
            True,
        ),
        ("container", "c-t-leak-c-1", "exited", "t-leak-c", 1, "succeeded", 0, None, True),
        (
            "workspace",
            "/data/workspaces/t-leak-w.1.x",
            "present",
            "t-leak-w",
            1,
            "succeeded",
            0,
            None,
            True,
        ),
    ]


async def test_state_tables_and_views_hold_exact_values(nats_url: str, tmp_dir: Path) -> None:
    last = await publish(nats_url, scenario_history())
    db = tmp_dir / "p.duckdb"
    await follow_until(db, nats_url, last, batch_size=7)

    assert query(
        db,
        "SELECT task_id, state, outcome, attempts, max_attempts, error_code, "
        "exit_code, terminal_events, events FROM tasks "
        "WHERE task_id IN ('t-retried', 't-rejected', 't-running') ORDER BY task_id",
    ) == [
        ("t-rejected", "rejected", "rejected", 0, 3, "POLICY_VIOLATION", None, 1, 3),
        ("t-retried", "succeeded", "succeeded", 2, 3, None, 0, 1, 21),
        ("t-running", "running", None, 1, 3, None, None, 0, 6),
    ]
    assert query(
        db,
        "SELECT attempt, state, outcome, error_code, exit_code, container_id, "
        "kill_reason, events FROM attempts WHERE task_id = 't-retried' "
        "ORDER BY attempt",
    ) == [
        (1, "finished", "failed", "EXECUTION_TIMEOUT", 137, "c-t-retried-1", "timeout", 10),
        (2, "finished", "succeeded", None, 0, "c-t-retried-2", None, 8),
    ]
    assert query(
        db,
        "SELECT container_id, state, exit_code, oom_killed, kill_reason, "
        "cleanup_failures FROM containers WHERE task_id IN ('t-oom', 't-running') "
        "ORDER BY container_id",
    ) == [
        ("c-t-oom-1", "removed", 137, True, None, 0),
        ("c-t-running-1", "exited", 0, False, None, 0),
    ]
    assert query(
        db,
        "SELECT path, state, cleanup_failures, last_cleanup_error FROM workspaces "
        "WHERE task_id = 't-cfixed'",
    ) == [("/data/workspaces/t-cfixed.1.x", "removed", 1, "device or resource busy")]

    assert query(db, "SELECT error_type, code, errors FROM error_rates ORDER BY code") == [
        ("timeout", "EXECUTION_TIMEOUT", 4),
        ("user_code", "NONZERO_EXIT", 1),
        ("resource", "OOM_KILLED", 1),
        ("security", "POLICY_VIOLATION", 1),
    ]
    assert query(
        db, "SELECT step, attempts, succeeded, failed, success_rate FROM cleanup_success_rate"
    ) == [
        ("remove_container", 16, 15, 1, 0.9375),
        ("remove_workspace", 17, 16, 1, 0.941176),
    ]
    # One event every 10 ms: a clean one-attempt task spans 9 ticks, t-retried 20,
    # t-exhausted 33, a user error or OOM 10, a rejection 2.
    assert query(db, "SELECT outcome, tasks, p50_s, max_s FROM task_latency") == [
        ("failed", 3, 0.1, 0.33),
        ("rejected", 1, 0.02, 0.02),
        ("succeeded", 11, 0.09, 0.2),
    ]
    assert query(db, "SELECT task_id, state, attempts, container_id FROM open_tasks") == [
        ("t-running", "running", 1, "c-t-running-1")
    ]


async def test_catch_up_on_a_missing_or_empty_stream_is_a_no_op(
    nats_url: str, tmp_dir: Path
) -> None:
    db = tmp_dir / "p.duckdb"
    with Projector(db, nats_url) as p:
        result = await p.catch_up()
    assert (result.seq, result.target, result.applied) == (0, 0, 0)
    assert tables(db)["projector_state"] == [("SUP_EVENTS", 0, DDL_VERSION)]


def test_a_file_of_another_ddl_version_is_refused(tmp_dir: Path) -> None:
    db = tmp_dir / "old.duckdb"
    ProjectionStore(db).close()
    con = duckdb.connect(str(db))
    con.execute("UPDATE projector_state SET ddl_version = 0")
    con.close()
    with pytest.raises(ProjectionStoreError, match="DDL version 0"):
        ProjectionStore(db)


def test_replay_target_used_by_another_process_is_refused(tmp_dir: Path) -> None:
    from projections.serve.replay import ensure_not_in_use

    db = tmp_dir / "held.duckdb"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('ok', flush=True); "
            "time.sleep(30)",
            str(db),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"ok\n"
        with pytest.raises(ProjectionStoreError, match="in use by another process"):
            ensure_not_in_use(db)
    finally:
        holder.kill()
        holder.wait()
        assert holder.stdout is not None
        holder.stdout.close()


def test_submitted_event_fields_land_in_tasks(tmp_dir: Path) -> None:
    """The store alone (no NATS): one batch straight from the decoder."""
    from projections.stream.decode import decode_batch, stage

    b = HistoryBuilder(id_prefix="st")
    b.submit("t-1", priority="high", max_attempts=5)
    events = b.events
    assert isinstance(events[0], TaskSubmitted)
    staged = stage(decode_batch([1], [events[0].subject()], [0], [encode_event(events[0])]))
    with ProjectionStore(tmp_dir / "p.duckdb") as store:
        result = store.apply(staged)
        row = store.con.execute(
            "SELECT task_id, state, priority, image, max_attempts, submitted_seq FROM tasks"
        ).fetchall()
    assert (result.applied, result.seq) == (1, 1)
    assert row == [("t-1", "submitted", "high", "supervisor-sandbox:busybox", 5, 1)]


async def test_a_writer_capped_to_a_share_of_time_rests_between_batches_and_loses_nothing(
    nats_url: str, tmp_dir: Path
) -> None:
    """`max_busy` spaces live batches (each starts at least apply * (1/share - 1) after
    the one before ended) and still applies every event, as a replay does."""
    history = mixed_history(1500, id_prefix="busy")
    db, stop, batches, applied = tmp_dir / "live.duckdb", asyncio.Event(), [], [0]
    with Projector(db, nats_url, batch_size=10_000, batch_age_s=0.01, max_busy=0.25) as p:

        def on_progress(state: Any) -> None:
            batches.append((time.monotonic(), state.last.apply_s))
            applied[0] = state.seq

        task = asyncio.create_task(p.run(stop, progress=on_progress))
        last = 0
        for i in range(0, len(history), 100):  # events keep coming while it rests
            last = await publish(nats_url, history[i : i + 100])
            await asyncio.sleep(0.05)
        while applied[0] < last:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 30)
    full = tmp_dir / "full.duckdb"
    await replay(full, nats_url)
    live_rows, full_rows = tables(db), tables(full)
    for table in TABLES:
        assert live_rows[table] == full_rows[table], table
    assert len(batches) >= 2
    for (ended, took), (seen, applied) in itertools.pairwise(batches):
        # `seen` is when the next batch was settled: it started `applied` before that.
        assert seen - applied >= ended + 3 * took - 0.02


def test_the_rest_never_holds_a_batch_past_rest_lag_s(tmp_dir: Path) -> None:
    """After a long batch the rest would be as long; a batch whose first message has
    already waited `rest_lag_s` does not wait for it."""
    with Projector(tmp_dir / "x.duckdb", "nats://127.0.0.1:1", max_busy=0.5, rest_lag_s=0.3) as p:
        p._rest_until = 100.0  # a 2 s batch ended at 98.0
        assert p._rested(born=99.5) == 99.8  # born during the rest: waits 0.3 s at most
        assert p._rested(born=97.0) == 97.3  # born during the batch: goes once applied
        p._rest_until = 99.6
        assert p._rested(born=99.5) == 99.6  # a short rest is kept whole
    with Projector(tmp_dir / "y.duckdb", "nats://127.0.0.1:1", max_busy=0.5) as p:
        p._rest_until = 100.0
        assert p._rested(born=10.0) == 100.0  # no bound unless asked


def test_max_busy_outside_its_range_is_refused(tmp_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_busy"):
        Projector(tmp_dir / "x.duckdb", "nats://127.0.0.1:1", max_busy=0)
    assert not (tmp_dir / "x.duckdb").exists()


@pytest.mark.parametrize("batch_size", [1, 200])
async def test_a_second_terminal_event_is_a_conflict_never_the_outcome(
    nats_url: str, tmp_dir: Path, batch_size: int
) -> None:
    """The first terminal event of a task is its outcome, whether the second arrives in the
    same batch or a later one; the second is kept, with both sequences."""
    b = HistoryBuilder(id_prefix="cf")
    b.run_task("t-twice")
    b.fail("t-twice", 1, "SUPERVISOR_LOST")
    last = await publish(nats_url, b.events)
    db = tmp_dir / "p.duckdb"
    await follow_until(db, nats_url, last, batch_size=batch_size)

    assert query(
        db,
        "SELECT state, outcome, terminal_events, finished_seq FROM tasks WHERE task_id = 't-twice'",
    ) == [("succeeded", "succeeded", 2, last - 1)]
    assert query(
        db,
        "SELECT task_id, first_seq, first_outcome, conflict_seq, conflict_outcome "
        "FROM terminal_conflicts",
    ) == [("t-twice", last - 1, "succeeded", last, "failed")]


@pytest.mark.parametrize("batch_size", [1, 200])
async def test_a_forged_success_before_the_real_end_is_a_conflict_never_the_outcome(
    nats_url: str, tmp_dir: Path, batch_size: int
) -> None:
    """A copied `task.succeeded` (new event id) from an instance that does not run the
    attempt, published while the task runs: the live projection keeps the task running,
    takes the real end when it comes, and shows the forgery in `terminal_conflicts`; the
    audit reports it. The same whether they share a batch or not."""
    b = HistoryBuilder(id_prefix="fg")
    b.submit("t-run")
    b.attempt("t-run", 1, AttemptPlan(error="NONZERO_EXIT", exit_code=3), finish=False)
    b.instance_id = "intruder"
    b.succeed("t-run", 1)
    b.instance_id = "boot-1"
    running = await publish(nats_url, b.events)
    db = tmp_dir / "p.duckdb"
    await follow_until(db, nats_url, running, batch_size=batch_size)
    assert query(db, "SELECT state, outcome, finished_seq FROM tasks") == [("running", None, None)]

    b.events.clear()
    for step, resource in (
        ("remove_container", b.container_id("t-run", 1)),
        ("remove_workspace", b.workspace_path("t-run", 1)),
    ):
        b.emit(CleanupSucceeded, "t-run", 1, step=step, resource=resource, duration_s=0.02)
    b.emit(
        AttemptFinished,
        "t-run",
        1,
        outcome="failed",
        exit_code=3,
        error_type="user_code",
        error_code="NONZERO_EXIT",
        duration_s=0.4,
        evidence=Evidence(exit_code=3),
    )
    b.fail("t-run", 1, "NONZERO_EXIT", exit_code=3)
    last = await publish(nats_url, b.events)
    await follow_until(db, nats_url, last, batch_size=batch_size)
    assert query(
        db, "SELECT state, outcome, exit_code, finished_seq, terminal_events FROM tasks"
    ) == [("failed", "failed", 3, last, 2)]
    assert query(
        db,
        "SELECT scope, conflict_seq, conflict_outcome, reason, instance_id, "
        "first_seq FROM terminal_conflicts",
    ) == [("task", running, "succeeded", "not_owner", "intruder", last)]
    con = duckdb.connect(str(db), read_only=True)
    try:
        found = [(v.rule, v.seqs) for v in audit_records(load_records(con))]
    finally:
        con.close()
    assert found == [("not_owner", (running,))]
