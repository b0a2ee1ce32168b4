"""The daemon's projection in a process of its own (`supervisor.daemon.projection_process` and
`supervisor.compose.projection_service`), on a real nats-server and DuckDB file: it is restarted when it
dies, it never outlives its daemon (even one killed with SIGKILL), a daemon started right
after finds the file free, a service that cannot open its file fails the start with the
reason, and the daemon's own process never loads DuckDB. Its read API (queries, task
lookups, errors, readiness, metrics) is tested through HTTP in `test_projections_http`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import nats
import psutil
import pytest

from schemas.config import Config, ProjectionConfig
from schemas.errors import ApiError
from supervisor.compose.projection_service import Setup
from supervisor.daemon.extension import DaemonContext
from supervisor.daemon.projection_process import ProjectionProcess, ProjectionProcessError
from supervisor.observability.metrics import Metrics
from testing.daemon import DaemonProc
from testing.loadgen import publish
from testing.synthetic import HistoryBuilder
from tests.test_projections import scenario_history
from tests.test_projections_live import until

pytestmark = pytest.mark.nats

COUNT_TASKS = {"sql": "SELECT count(*) AS n FROM tasks"}


@contextlib.asynccontextmanager
async def running_process(
    data_dir: Path, url: str, **options: Any
) -> AsyncIterator[tuple[ProjectionProcess, DaemonContext]]:
    """A started projection process on a minimal daemon context (the node's data dir, NATS
    URL and metrics), torn down by its exit stack as the daemon does."""
    nc = await nats.connect(url)
    node = SimpleNamespace(data_dir=data_dir, nats_url=url, metrics=Metrics())
    ctx = DaemonContext(
        node=node,  # type: ignore[arg-type]
        nc=nc,
        js=nc.jetstream(),
        breaker=None,  # type: ignore[arg-type]
        monitor=None,  # type: ignore[arg-type]
        scheduler=None,  # type: ignore[arg-type]
    )  # type: ignore[arg-type]
    part = ProjectionProcess(Config(), **options)
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(nc.close)
        await part.start(ctx, stack)
        yield part, ctx


def _service_pids() -> set[int]:
    return {
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "supervisor.compose.projection_service" in (p.info["cmdline"] or [])
    }


async def test_a_killed_service_is_restarted_and_reads_resume(nats_url: str, tmp_dir: Path) -> None:
    await publish(nats_url, scenario_history())
    async with running_process(tmp_dir, nats_url, restart_min_s=1.0) as (part, _):
        assert (await part.query(COUNT_TASKS))["rows"] == [[16]]
        first = part.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await until(lambda: part.pid is None)

        check = await part.check()
        assert (check.ok, check.reason) == (
            False,
            "the projection process exited with status -9; restarting",
        )
        with pytest.raises(ApiError) as refused:
            await part.query(COUNT_TASKS)
        assert (refused.value.status, refused.value.code) == (503, "PROJECTION_UNAVAILABLE")

        await until(lambda: part.pid is not None, timeout=30)
        assert (await part.check()).ok
        assert (await part.query(COUNT_TASKS))["rows"] == [[16]]
        assert (part.restarts, part.pid != first) == (1, True)
    assert part.pid is None
    assert not psutil.pid_exists(first)


async def test_a_service_that_cannot_open_its_file_fails_the_start(
    nats_url: str, tmp_dir: Path
) -> None:
    # A directory where the file should be: nothing to set aside and rebuild (a damaged
    # file is: tests/test_one_outcome.py).
    (tmp_dir / "projection.duckdb").mkdir()
    with pytest.raises(ProjectionProcessError) as failed:
        async with running_process(tmp_dir, nats_url, open_timeout_s=0.5):
            pass
    assert failed.value.returncode == 1
    assert not _service_pids() & {p.pid for p in psutil.Process().children(recursive=True)}


def _maps(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_service_dies_with_its_daemon_and_frees_the_file(nats_url: str, tmp_dir: Path) -> None:
    config = {"reconcile": {"enabled": False}}
    daemon = DaemonProc(tmp_dir / "data", nats_url, config).start()
    try:
        assert daemon.proc is not None
        (service,) = psutil.Process(daemon.proc.pid).children()
        assert "supervisor.compose.projection_service" in service.cmdline()
        # DuckDB is loaded in the service only: that is what keeps the daemon small.
        assert "duckdb" in _maps(service.pid)
        assert "duckdb" not in _maps(daemon.proc.pid)

        daemon.kill()
        service.wait(timeout=30)  # stdin closed: it stops on its own

        again = DaemonProc(tmp_dir / "data", nats_url, config).start()
        assert again.proc is not None
        (second,) = psutil.Process(again.proc.pid).children()
        status, body = again.request("POST", "/v1/query", b'{"sql": "SELECT 42 AS n"}')
        assert (status, json.loads(body)["rows"]) == (200, [[42]])
        again.stop()
        assert again.wait() == 0
        assert not psutil.pid_exists(second.pid)  # stopped, and waited for, by its daemon
    finally:
        daemon.stop()


async def test_a_long_query_never_stalls_the_writer(nats_url: str, tmp_dir: Path) -> None:
    """A 10 s query (twice `max_lag_s`, interrupted at its time limit) runs while events
    keep arriving: the projection keeps applying them, its lag staying under `max_lag_s`
    the whole time."""
    await publish(nats_url, scenario_history())
    async with running_process(tmp_dir, nats_url) as (part, _):
        await until(lambda: part.pid is not None)
        slow = {"sql": "SELECT count(*) FROM range(1000000000000)", "timeout_s": 10}
        query = asyncio.ensure_future(part.query(slow))
        b = HistoryBuilder(id_prefix="lag")
        lags: list[float] = []
        started = asyncio.get_running_loop().time()
        i = 0
        while not query.done():
            b.run_task(f"t-lag-{i}")
            i += 1
            await publish(nats_url, b.events[-12:])
            check = await part.check()
            assert check.ok, check.reason
            lags.append(float(check.details["lag_s"]))
            await asyncio.sleep(0.5)
        with pytest.raises(ApiError) as timed_out:
            await query
        assert (timed_out.value.status, timed_out.value.code) == (504, "QUERY_TIMEOUT")
        took = asyncio.get_running_loop().time() - started
        applied = (
            await part.query({"sql": "SELECT count(*) FROM tasks WHERE task_id LIKE 't-lag-%'"})
        )["rows"]
    print(f"max lag during a {took:.1f} s query: {max(lags):.2f} s over {len(lags)} samples")
    assert took >= 9.5
    assert max(lags) < ProjectionConfig().max_lag_s
    assert applied[0][0] >= i - 1  # all but perhaps the last batch, still in flight


def test_the_service_stopped_while_it_opens_exits_at_once(tmp_dir: Path) -> None:
    """Its daemon gone (stdin closed) while the service still opens, here waiting for a
    NATS that is not there: it exits within seconds, never outliving its daemon nor
    holding the projection's file."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    setup = Setup(
        config=Config(data_dir=str(tmp_dir / "data")),
        nats_url=f"nats://127.0.0.1:{port}",
        token="t",
        open_timeout_s=120.0,
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.compose.projection_service"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(msgspec.json.encode(setup) + b"\n")
        proc.stdin.flush()
        time.sleep(2.0)  # opening: it keeps trying to reach NATS
        assert proc.poll() is None
        closed = time.monotonic()
        proc.stdin.close()
        proc.wait(timeout=20)
        assert time.monotonic() - closed < 10
        assert b"stopping while it opens" in (proc.stderr.read() if proc.stderr else b"")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
