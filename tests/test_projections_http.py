"""The projection part behind the real HTTP app (`supervisor.daemon.api.create_app`, as the daemon
serves it), and `supervisor sql` without `--db` against it: rows, formats, refusals and
their exit codes, the token, an unreachable daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from projections.serve.live import ProjectionPart
from schemas import TaskSpec
from supervisor.cli.main import main
from supervisor.daemon.api import create_app
from supervisor.daemon.extension import DaemonContext
from supervisor.daemon.http_server import HttpServer
from supervisor.daemon.projection_process import ProjectionProcess
from testing.loadgen import publish
from tests.test_projection_process import running_process
from tests.test_projections import scenario_history
from tests.test_projections_live import running_part

pytestmark = pytest.mark.nats

TOKEN = "s3cret"


class ReadOnlyApi:
    """The daemon's `/v1` handlers, reduced to its read side."""

    def __init__(self, part: ProjectionPart | ProjectionProcess) -> None:
        self.part = part

    async def submit(self, spec: TaskSpec) -> Any:
        raise NotImplementedError

    async def task(self, task_id: str, wait_s: float = 0.0) -> Any:
        return await self.part.task(task_id)

    async def query(self, request: Any) -> Any:
        return await self.part.query(request)


@pytest.fixture(params=["in-process", "process"])
async def daemon(
    request: pytest.FixtureRequest, nats_url: str, tmp_dir: Path
) -> AsyncIterator[tuple[str, DaemonContext]]:
    """The read side on the scenario history, served over HTTP with a token; its URL is in
    `<tmp_dir>/http.url`, as a daemon writes it. Both read sides: the part in this process
    (tests, `--no-projection`'s reconciler) and the projection process `serve` runs."""
    await publish(nats_url, scenario_history())
    running = running_part if request.param == "in-process" else running_process
    async with running(tmp_dir, nats_url) as (part, ctx):

        async def before_scrape() -> None:
            await asyncio.gather(*(hook() for hook in ctx.scrape_hooks))

        app = create_app(
            metrics=ctx.node.metrics,
            readiness=ctx.checks,
            handlers=ReadOnlyApi(part),  # type: ignore[arg-type]
            token=TOKEN,
            on_scrape=before_scrape,
        )
        server = HttpServer(app, "127.0.0.1:0")
        await server.start()
        (tmp_dir / "http.url").write_text(server.url + "\n")
        try:
            yield server.url, ctx
        finally:
            await server.stop()


def config_file(tmp_dir: Path, body: str) -> str:
    path = tmp_dir / "supervisor.toml"
    path.write_text(body)
    return str(path)


async def sql(tmp_dir: Path, *argv: str, token: str | None = TOKEN) -> int:
    """`supervisor sql ...` in a thread (the server runs in this loop)."""
    conf = config_file(tmp_dir, f'[http]\ntoken = "{token}"\n' if token else "")
    args = ["sql", *argv, "--data-dir", str(tmp_dir), "--config", conf]
    return await asyncio.to_thread(main, args)


async def test_the_http_api_maps_the_part_and_its_errors(
    daemon: tuple[str, DaemonContext],
) -> None:
    url, _ = daemon
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.post(
            f"{url}/v1/query", json={"sql": "SELECT count(*) AS n FROM tasks"}
        ) as r:
            assert r.status == 200
            doc = await r.json()
            assert (doc["columns"], doc["rows"], doc["seq"]) == (["n"], [[16]], 185)
        async with http.post(f"{url}/v1/query", json={"sql": "COPY tasks TO 'x.csv'"}) as r:
            assert (r.status, await r.json()) == (
                400,
                {
                    "error": {
                        "type": "validation",
                        "code": "QUERY_REFUSED",
                        "message": "query refused: COPY statements are not allowed: read-only SELECT only",
                    }
                },
            )
        slow = {"sql": "SELECT count(*) FROM range(10000000000000)", "timeout_s": 0.3}
        async with http.post(f"{url}/v1/query", json=slow) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (504, "QUERY_TIMEOUT")
        async with http.post(f"{url}/v1/query", json={"sql": "SELECT * FROM nowhere"}) as r:
            assert (r.status, (await r.json())["error"]["code"]) == (400, "QUERY_FAILED")
        async with http.get(f"{url}/v1/tasks/t-retried") as r:
            task = await r.json()
            assert (r.status, task["state"], len(task["attempt_details"])) == (200, "succeeded", 2)
        async with http.get(f"{url}/v1/tasks/t-nobody") as r:
            assert (r.status, (await r.json())["error"]["code"]) == (404, "TASK_NOT_FOUND")
        async with http.get(f"{url}/readyz") as r:
            checks = (await r.json())["checks"]
            assert checks["projection"] == {
                "ok": True,
                "reason": "applied up to seq 185, 0 behind (0.00s)",
                "seq": 185,
                "stream_seq": 185,
                "behind": 0,
                "lag_s": 0.0,
            }
        async with http.get(f"{url}/metrics") as r:
            assert "supervisor_projection_seq 185.0" in await r.text()


async def test_sql_without_db_asks_the_running_daemon(
    daemon: tuple[str, DaemonContext], tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    statement = "SELECT step, attempts, failed FROM cleanup_success_rate"
    assert await sql(tmp_dir, statement) == 0
    assert capsys.readouterr().out == (
        "step             | attempts | failed\n"
        "-----------------+----------+-------\n"
        "remove_container |       16 |      1\n"
        "remove_workspace |       17 |      1\n"
        "(2 rows)\n"
    )
    assert await sql(tmp_dir, statement, "--format", "csv") == 0
    assert capsys.readouterr().out == (
        "step,attempts,failed\nremove_container,16,1\nremove_workspace,17,1\n"
    )
    assert (
        await sql(
            tmp_dir,
            "SELECT task_id, submitted_at FROM tasks WHERE task_id = 't-ok'",
            "--format",
            "json",
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out) == [
        {"task_id": "t-ok", "submitted_at": "2026-01-01T00:00:00"}
    ]
    assert await sql(tmp_dir, "SELECT * FROM range(10)", "--max-rows", "2") == 0
    assert capsys.readouterr().out.endswith("(2 rows) (truncated: more rows than the row limit)\n")


@pytest.mark.parametrize(
    ("statement", "code", "message"),
    [
        (
            "SELECT 1; DROP TABLE tasks",
            2,
            "supervisor: query refused: exactly one statement is allowed, got 2\n",
        ),
        (
            "DELETE FROM tasks",
            2,
            "supervisor: query refused: DELETE statements are not allowed: read-only SELECT only\n",
        ),
        (
            "ATTACH 'x.duckdb' AS x",
            2,
            "supervisor: query refused: ATTACH statements are not allowed: read-only SELECT only\n",
        ),
        ("SELECT * FROM nowhere", 1, None),
    ],
)
async def test_sql_without_db_exits_2_on_a_refusal_and_1_on_a_failure(
    daemon: tuple[str, DaemonContext],
    tmp_dir: Path,
    capsys: pytest.CaptureFixture[str],
    statement: str,
    code: int,
    message: str | None,
) -> None:
    assert await sql(tmp_dir, statement) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    if message is not None:
        assert captured.err == message
    else:
        assert captured.err.startswith(
            "supervisor: query failed: Catalog Error: Table with name nowhere"
        )


async def test_sql_without_db_and_the_wrong_token_exits_2(
    daemon: tuple[str, DaemonContext], tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await sql(tmp_dir, "SELECT 1", token="wrong") == 2
    assert capsys.readouterr().err == "supervisor: a valid bearer token is required for /v1\n"
    assert await sql(tmp_dir, "SELECT 1", token=None) == 2


async def test_sql_without_a_daemon_exits_3(
    tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = config_file(tmp_dir, f'[http]\nlisten = "0.0.0.0:{port}"\n')
    args = ["sql", "SELECT 1", "--data-dir", str(tmp_dir), "--config", conf]
    assert await asyncio.to_thread(main, args) == 3
    err = capsys.readouterr().err
    assert err.startswith(f"supervisor: no daemon answered at http://127.0.0.1:{port}: ")
    assert err.endswith("(is `supervisor serve` running? --url, or --db FILE for a file)\n")


async def test_sql_cannot_write_through_a_cte_nor_exhaust_the_projections_memory(
    daemon: tuple[str, DaemonContext],
) -> None:
    """The attacks tried on `/v1/query`: a write hidden in a CTE, a checkpoint, SQL run from
    a string, and a GROUP BY far past the projection's memory limit (512 MB). Each is
    refused or fails cleanly, nothing changes, and the projection keeps answering."""
    url, _ = daemon
    auth = {"Authorization": f"Bearer {TOKEN}"}
    attacks = {
        "WITH x AS (UPDATE tasks SET state = 'hacked' RETURNING task_id, state) SELECT * FROM x": "UPDATE inside a query is not allowed: read-only SELECT only",
        "SELECT * FROM (WITH y AS (DELETE FROM tasks RETURNING *) SELECT * FROM y)": "DELETE inside a query is not allowed: read-only SELECT only",
        "WITH z AS (INSERT INTO tasks (task_id) VALUES ('x') RETURNING *) SELECT 1": "INSERT inside a query is not allowed: read-only SELECT only",
        "SELECT * FROM checkpoint()": "the function checkpoint() is not allowed in a query",
        "SELECT * FROM query('UPDATE tasks SET state = ''hacked''')": "the function query() is not allowed in a query",
    }
    service = _projection_service()
    peak = 0
    async with aiohttp.ClientSession(headers=auth) as http:
        for attack, reason in attacks.items():
            async with http.post(f"{url}/v1/query", json={"sql": attack}) as r:
                assert (r.status, (await r.json())["error"]) == (
                    400,
                    {
                        "type": "validation",
                        "code": "QUERY_REFUSED",
                        "message": f"query refused: {reason}",
                    },
                ), attack
        big = {
            "sql": "SELECT count(*) FROM (SELECT i, count(*) FROM range(200000000) t(i) "
            "GROUP BY i)",
            "timeout_s": 120,
        }
        query = asyncio.ensure_future(http.post(f"{url}/v1/query", json=big))
        while not query.done():
            if service is not None:
                peak = max(peak, service.memory_info().rss)
            await asyncio.sleep(0.05)
        async with await query as r:
            error = (await r.json())["error"]
            assert (r.status, error["type"], error["code"]) == (507, "resource", "QUERY_MEMORY")
        check = "SELECT count(*) FILTER (WHERE state = 'hacked'), count(*) FROM tasks"
        async with http.post(f"{url}/v1/query", json={"sql": check}) as r:
            assert (r.status, (await r.json())["rows"]) == (200, [[0, 16]])
    if service is not None:
        print(f"projection process peak RSS under the memory test: {peak / 2**20:.0f} MiB")
        assert peak < 1.5 * 2**30, peak


def _projection_service() -> psutil.Process | None:
    """The projection process of this test's daemon part, if it runs in one."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "supervisor.compose.projection_service" in " ".join(child.cmdline()):
                return child
    return None
