"""The daemon's projection part, without the daemon: a real nats-server, events published
through the project's event log, the live DuckDB file, its query endpoint, task lookups,
readiness and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import nats
import pytest

from projections.errors import QueryFailed, QueryRefused, QueryTimeout
from projections.serve.live import LiveSettings, ProjectionPart
from projections.serve.replay import replay
from projections.store.ddl import DDL_VERSION, TABLES
from projections.store.store import ProjectionStore
from schemas import Event, TaskFailed, TaskRejected, TaskSucceeded
from schemas.config import Config, load_config
from schemas.errors import ApiError, ConfigError
from supervisor.daemon.extension import DaemonContext
from supervisor.eventlog.log import EventLog
from supervisor.eventlog.nats_server import NatsServer
from supervisor.observability.metrics import Metrics
from testing.loadgen import publish
from testing.snapshot import tables
from testing.synthetic import AttemptPlan, HistoryBuilder, mixed_history
from tests.test_projections import TIMEOUT, scenario_history

pytestmark = pytest.mark.nats


@contextlib.asynccontextmanager
async def running_part(
    data_dir: Path, url: str, **settings: Any
) -> AsyncIterator[tuple[ProjectionPart, DaemonContext]]:
    """A started part on a minimal daemon context (the node's data dir, NATS URL and
    metrics; a connection of its own), torn down by its exit stack as the daemon does."""
    nc = await nats.connect(url)
    node = SimpleNamespace(data_dir=data_dir, nats_url=url, metrics=Metrics())
    ctx = DaemonContext(
        node=node,  # type: ignore[arg-type]
        nc=nc,
        js=nc.jetstream(),
        breaker=None,  # type: ignore[arg-type]
        monitor=None,  # type: ignore[arg-type]
        scheduler=None,  # type: ignore[arg-type]
    )
    part = ProjectionPart(Config(), settings=LiveSettings(**settings))
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(nc.close)
        await part.start(ctx, stack)
        yield part, ctx


async def emit_through_event_log(data_dir: Path, url: str, events: list[Event]) -> None:
    """Publish as the executor does: outbox on disk, relay to SUP_EVENTS, flushed."""
    async with EventLog(data_dir / "node", url, instance_id="boot-2") as log:
        for event in events:
            log.emit(event)
        assert await log.flush(10)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> float:
    """Wait until `condition()` holds; the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


def live_history() -> list[Event]:
    """Two tasks that happen while the daemon runs: 32 events."""
    b = HistoryBuilder(id_prefix="lv")
    b.run_task("t-live", TIMEOUT, AttemptPlan())
    b.run_task("t-live-oom", AttemptPlan(error="OOM_KILLED", exit_code=137))
    return b.events


async def test_start_catches_up_then_follows_the_event_log_and_equals_a_replay(
    nats_url: str, tmp_dir: Path
) -> None:
    before = await publish(nats_url, scenario_history())
    later = live_history()
    async with running_part(tmp_dir, nats_url) as (part, ctx):
        assert part.last_seq == before == 185  # caught up before start returned
        answer = await part.query({"sql": "SELECT count(*) AS n, max(seq) AS top FROM events"})
        assert answer["rows"] == [[185, 185]]

        await emit_through_event_log(tmp_dir, nats_url, later)
        last = before + len(later)
        took = await until(lambda: part.last_seq == last)
        assert (last, took < 2.0) == (217, True)  # ~0.4s here; the bench measures it

        answer = await part.query(
            {
                "sql": "SELECT task_id, state, attempts, error_code "
                "FROM tasks WHERE task_id IN ('t-live', 't-live-oom') "
                "ORDER BY task_id"
            }
        )
        assert answer == {
            "columns": ["task_id", "state", "attempts", "error_code"],
            "types": ["VARCHAR", "VARCHAR", "INTEGER", "VARCHAR"],
            "rows": [["t-live", "succeeded", 2, None], ["t-live-oom", "failed", 1, "OOM_KILLED"]],
            "row_count": 2,
            "truncated": False,
            "elapsed_s": answer["elapsed_s"],
            "seq": 217,
        }

        doc = await part.task("t-live")
        assert doc is not None
        assert (doc["task_id"], doc["state"], doc["outcome"], doc["attempts"]) == (
            "t-live",
            "succeeded",
            "succeeded",
            2,
        )
        assert [
            (a["attempt"], a["outcome"], a["error_code"], a["kill_reason"])
            for a in doc["attempt_details"]
        ] == [(1, "failed", "EXECUTION_TIMEOUT", "timeout"), (2, "succeeded", None, None)]
        assert [(e["attempt"], e["code"], e["retryable"]) for e in doc["errors"]] == [
            (1, "EXECUTION_TIMEOUT", True)
        ]
        assert doc["projection_seq"] == 217
        assert doc["submitted_at"] == "2026-01-01T00:00:00"
        assert await part.task("t-never") is None

        check = await ctx.checks["projection"]()
        assert (check.ok, check.details) == (
            True,
            {"seq": 217, "stream_seq": 217, "behind": 0, "lag_s": 0.0},
        )

        registry = ctx.node.metrics.registry
        assert registry.get_sample_value("supervisor_projection_seq") == 217
        assert registry.get_sample_value("supervisor_projection_lag_seconds_count") == 32
        p99 = registry.get_sample_value(
            "supervisor_projection_lag_recent_seconds", {"quantile": "0.99"}
        )
        assert p99 is not None and 0 < p99 < 1.0
    assert (await part.check()).reason == "the projector is not running"
    with pytest.raises(ApiError) as closed:
        await part.query({"sql": "SELECT 1"})
    assert (closed.value.status, closed.value.code) == (503, "PROJECTION_UNAVAILABLE")

    full = tmp_dir / "full.duckdb"
    await replay(full, nats_url)
    live_rows, full_rows = tables(tmp_dir / "projection.duckdb"), tables(full)
    for table in TABLES:
        assert live_rows[table] == full_rows[table], table


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("DELETE FROM tasks", "DELETE statements are not allowed: read-only SELECT only"),
        (
            "UPDATE tasks SET state = 'x'",
            "UPDATE statements are not allowed: read-only SELECT only",
        ),
        ("COPY tasks TO '/tmp/out.csv'", "COPY statements are not allowed: read-only SELECT only"),
        ("ATTACH '/tmp/x.duckdb' AS x", "ATTACH statements are not allowed: read-only SELECT only"),
        ("SELECT 1; DROP TABLE events", "exactly one statement is allowed, got 2"),
        ("SELECT 1; DELETE FROM tasks", "exactly one statement is allowed, got 2"),
    ],
)
async def test_the_query_endpoint_refuses_all_but_one_select(
    nats_url: str, tmp_dir: Path, sql: str, reason: str
) -> None:
    await publish(nats_url, scenario_history())
    async with running_part(tmp_dir, nats_url) as (part, _):
        with pytest.raises(QueryRefused) as refused:
            await part.query({"sql": sql})
        assert (refused.value.tag, refused.value.reason) == ("query_refused", reason)
        counts = await part.query(
            {"sql": "SELECT (SELECT count(*) FROM tasks), (SELECT count(*) FROM events)"}
        )
        assert counts["rows"] == [[16, 185]]


async def test_query_limits_formats_and_bad_requests(nats_url: str, tmp_dir: Path) -> None:
    await publish(nats_url, scenario_history())
    async with running_part(tmp_dir, nats_url) as (part, _):
        capped = await part.query({"sql": "SELECT * FROM range(1000000000)", "max_rows": 3})
        assert (capped["rows"], capped["truncated"]) == ([[0], [1], [2]], True)
        with pytest.raises(QueryTimeout) as slow:
            await part.query(
                {"sql": "SELECT count(*) FROM range(10000000000000)", "timeout_s": 0.3}
            )
        assert slow.value.tag == "query_timeout"
        with pytest.raises(QueryFailed, match="file system operations are disabled"):
            await part.query({"sql": "SELECT * FROM read_csv('/etc/passwd')"})

        sql = "SELECT step, attempts, failed FROM cleanup_success_rate"
        table = await part.query({"sql": sql, "format": "table"})
        assert table["text"] == (
            "step             | attempts | failed\n"
            "-----------------+----------+-------\n"
            "remove_container |       16 |      1\n"
            "remove_workspace |       17 |      1\n"
            "(2 rows)\n"
        )
        csv = await part.query({"sql": sql, "format": "csv"})
        assert csv["text"] == "step,attempts,failed\nremove_container,16,1\nremove_workspace,17,1\n"

        for bad, reason in [
            ({"sql": 42}, "bad request: Expected `str`, got `int` - at `$.sql`"),
            ({}, "bad request: Object missing required field `sql`"),
            ({"sql": "SELECT 1", "rows": 3}, "bad request: Object contains unknown field `rows`"),
            ({"sql": "SELECT 1", "max_rows": 0}, "max_rows must be between 1 and 100000"),
            ({"sql": "SELECT 1", "timeout_s": 0}, "timeout_s must be above 0 and at most 300"),
            (
                {"sql": "SELECT 1", "format": "xml"},
                "bad request: Invalid enum value 'xml' - at `$.format`",
            ),
        ]:
            with pytest.raises(QueryRefused) as refused:
                await part.query(bad)  # type: ignore[arg-type]
            assert refused.value.reason == reason


async def test_readiness_fails_while_the_projector_fails_and_recovers_after(
    nats_url: str, tmp_dir: Path
) -> None:
    first = await publish(nats_url, scenario_history())
    async with running_part(tmp_dir, nats_url, retry_min_s=0.05, retry_max_s=0.2) as (part, ctx):
        store = part._projector.store  # type: ignore[union-attr]  # to break it on purpose
        store.con.execute("ALTER TABLE errors RENAME TO errors_away")
        last = await publish(nats_url, live_history())
        await until(lambda: part.failure is not None)
        check = await ctx.checks["projection"]()
        assert not check.ok
        assert check.reason.startswith("the projector failed, restarting: projection ")
        assert "errors" in check.reason
        assert part.last_seq == first
        lag = await part.lag()
        assert (lag.seq, lag.stream_seq, lag.behind) == (first, last, last - first)
        assert lag.seconds > 0

        store.con.execute("ALTER TABLE errors_away RENAME TO errors")
        await until(lambda: part.last_seq == last)
        check = await ctx.checks["projection"]()
        assert (check.ok, check.details["behind"], part.failure) == (True, 0, None)
        answer = await part.query({"sql": "SELECT count(*) FROM errors"})
        assert answer["rows"] == [[9]]  # 7 before, 2 after the failure


async def test_readiness_fails_when_the_lag_passes_its_bound(nats_url: str, tmp_dir: Path) -> None:
    await publish(nats_url, scenario_history())
    # No task ends in them: a batch holding a task's end would not wait for its age.
    ends = (TaskSucceeded, TaskFailed, TaskRejected)
    unfinished = [e for e in live_history() if not isinstance(e, ends)]
    async with running_part(tmp_dir, nats_url, max_lag_s=0.0, batch_age_s=1.5) as (part, ctx):
        last = await publish(nats_url, unfinished)
        await asyncio.sleep(0.2)  # the batch waits for its age bound
        check = await ctx.checks["projection"]()
        assert not check.ok
        assert check.reason.startswith(f"applied up to seq 185, {len(unfinished)} behind (")
        assert check.reason.endswith("s): more than 0s")
        await until(lambda: part.last_seq == last)
        assert (await ctx.checks["projection"]()).ok


async def test_a_start_far_behind_catches_up_in_bulk_then_follows(
    nats_url: str, tmp_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = await publish(nats_url, mixed_history(3000, id_prefix="bk"))
    caplog.set_level(logging.INFO, logger="projections.serve.live")
    async with running_part(tmp_dir, nats_url, bulk_backlog=1000) as (part, _):
        assert part.last_seq == first
        assert f"projection: {first} messages behind, catching up in bulk mode" in caplog.messages
        last = await publish(nats_url, live_history())
        await until(lambda: part.last_seq == last)
    full = tmp_dir / "full.duckdb"
    await replay(full, nats_url)
    assert tables(tmp_dir / "projection.duckdb") == tables(full)


async def test_the_projection_follows_on_after_nats_restarts(
    nats_server: NatsServer, tmp_dir: Path
) -> None:
    first = await publish(nats_server.url, scenario_history())
    async with running_part(tmp_dir, nats_server.url) as (part, _):
        await asyncio.to_thread(nats_server.restart)  # file storage: the stream survives
        last = await publish(nats_server.url, live_history())
        await until(lambda: part.last_seq == last, timeout=30)
        assert (first, last) == (185, 217)
        answer = await part.query({"sql": "SELECT count(*), max(seq) FROM events"})
        assert answer["rows"] == [[217, 217]]


async def test_a_file_of_another_ddl_version_is_rebuilt_from_the_stream(
    nats_url: str, tmp_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    last = await publish(nats_url, scenario_history())
    ProjectionStore(tmp_dir / "projection.duckdb").close()
    con = duckdb.connect(str(tmp_dir / "projection.duckdb"))
    con.execute("UPDATE projector_state SET ddl_version = 0")
    con.close()
    async with running_part(tmp_dir, nats_url) as (part, _):
        assert part.last_seq == last
        answer = await part.query({"sql": "SELECT count(*) FROM tasks"})
        assert answer["rows"] == [[16]]
    assert any(
        "built by DDL version 0" in m and m.endswith("rebuilding it from the stream")
        for m in caplog.messages
    )
    assert tables(tmp_dir / "projection.duckdb")["projector_state"] == [
        ("SUP_EVENTS", last, DDL_VERSION)
    ]


def test_the_projection_section_of_the_config_sets_the_live_projection(tmp_dir: Path) -> None:
    path = tmp_dir / "c.toml"
    path.write_text(
        "[projection]\nbatch_age_s = 0.3\nmax_busy = 0.2\nrest_lag_s = 0.4\nmax_lag_s = 7\n"
    )
    s = ProjectionPart(load_config(path)).settings
    assert (s.batch_age_s, s.max_busy, s.rest_lag_s, s.max_lag_s) == (0.3, 0.2, 0.4, 7.0)
    path.write_text("[projection]\nmax_busy = 1.5\n")
    with pytest.raises(ConfigError, match=r"projection\.max_busy"):
        load_config(path)
