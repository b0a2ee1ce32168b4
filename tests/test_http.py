"""The HTTP endpoint, served for real on a loopback port and asked with aiohttp's client.

Readiness is wired to real parts: the Docker engine (and a socket that hangs up, for an
unreachable one), an event log on a real nats-server (stopped and restarted to make NATS
and the outbox fail), the breaker and the monitor services. The `/v1` handlers are stubs:
the intake and the query engine are tested where they live; here only the HTTP mapping is.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from projections.errors import QueryRefused, QueryTimeout
from schemas import ExecutionError, SupervisorStarted, TaskSpec
from schemas.config import BreakerConfig, HttpConfig
from schemas.errors import ApiError, ConfigError, DockerUnavailable, NatsUnavailable
from schemas.health import Check
from supervisor.daemon.checks import daemon_checks
from supervisor.daemon.http import (
    HttpServer,
    HttpServerError,
    create_app,
    http_token,
    parse_listen,
)
from supervisor.daemon.metrics import Metrics
from supervisor.daemon.monitor import HostSample, ResourceMonitor
from supervisor.docker.breaker import DockerBreaker
from supervisor.docker.runtime import DockerRuntime
from supervisor.eventlog.emitter import Emitter
from supervisor.eventlog.log import EventLog
from supervisor.eventlog.nats_server import NatsServer
from supervisor.intake.submit import Submission
from tests.fakes import ListSink
from tests.test_breaker import hangup_engine

SPEC = {"image": "supervisor-sandbox:busybox", "command": ["true"]}


class Host:
    """Scripted CPU/memory/disk readings for the monitor (its threshold logic is pure)."""

    def __init__(self) -> None:
        self.cpu = 10.0

    def sample(self) -> HostSample:
        return HostSample(cpu_pct=self.cpu, memory_pct=20.0, disk_pct=30.0)


@dataclass
class Parts:
    runtime: DockerRuntime
    events: EventLog
    breaker: DockerBreaker
    monitor: ResourceMonitor
    host: Host
    metrics: Metrics


@contextlib.asynccontextmanager
async def parts_for(
    tmp_dir: Path, nats_url: str, docker_url: str | None = None
) -> AsyncIterator[Parts]:
    emitter = Emitter(ListSink(), "n1", "i1", clock=lambda: datetime(2026, 1, 1, tzinfo=UTC))
    runtime = DockerRuntime(docker_url, timeout=2)
    events = EventLog(tmp_dir / "data", nats_url, instance_id="i1", reconnect_wait=0.1)
    await events.start()
    host, metrics = Host(), Metrics()
    breaker = DockerBreaker(emitter, BreakerConfig(failure_threshold=2), metrics=metrics)
    monitor = ResourceMonitor(emitter, host, metrics=metrics)
    try:
        yield Parts(runtime, events, breaker, monitor, host, metrics)
    finally:
        await events.close(0.5)
        runtime.close()


@contextlib.asynccontextmanager
async def serving(app: Any) -> AsyncIterator[aiohttp.ClientSession]:
    server = HttpServer(app, "127.0.0.1:0")
    await server.start()
    try:
        async with aiohttp.ClientSession(server.url) as client:
            yield client
    finally:
        await server.stop()


def _app(p: Parts, *, max_backlog: int = 10, **kw: Any) -> Any:
    checks = daemon_checks(
        runtime=p.runtime,
        connected=lambda: p.events.connected,
        backlog=lambda: p.events.backlog,
        breaker=p.breaker,
        monitor=p.monitor,
        max_backlog=max_backlog,
    )
    return create_app(metrics=p.metrics, readiness=checks, **kw)


async def _ready(client: aiohttp.ClientSession) -> tuple[int, dict[str, Any]]:
    async with client.get("/readyz") as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()


READY = {
    "docker": {"ok": True, "reason": "Docker answered ping"},
    "nats": {"ok": True, "reason": "connected to NATS"},
    "breaker": {
        "ok": True,
        "reason": "the Docker breaker is closed",
        "state": "closed",
        "failures": 0,
    },
    "outbox": {
        "ok": True,
        "reason": "0 events waiting to be published",
        "backlog": 0,
        "max_backlog": 10,
    },
    "pressure": {"ok": True, "reason": "the host is under every threshold"},
}


# --- health and readiness ------------------------------------------------------------------


async def test_healthz_answers_while_the_loop_does(tmp_dir: Path, nats_url: str) -> None:
    async with (
        parts_for(tmp_dir, nats_url) as p,
        serving(_app(p)) as client,
        client.get("/healthz") as r,
    ):
        assert (r.status, await r.json()) == (200, {"status": "ok"})


async def test_readyz_is_200_with_every_reason_when_all_is_well(
    tmp_dir: Path, nats_url: str, docker_client: object
) -> None:
    async with parts_for(tmp_dir, nats_url) as p, serving(_app(p)) as client:
        assert await p.events.wait_connected(10)

        status, body = await _ready(client)

        assert (status, body) == (200, {"ready": True, "checks": READY})
        assert p.metrics.registry.get_sample_value("supervisor_ready") == 1.0


async def test_readyz_follows_an_unreachable_docker(tmp_dir: Path, nats_url: str) -> None:
    async with (
        hangup_engine(tmp_dir) as url,
        parts_for(tmp_dir, nats_url, url) as p,
        serving(_app(p)) as client,
    ):
        assert await p.events.wait_connected(10)

        status, body = await _ready(client)

    assert status == 503
    assert body == {
        "ready": False,
        "checks": {
            **READY,
            "docker": {
                "ok": False,
                "reason": "docker ping failed: ConnectionError",
                "error": "docker_unavailable",
            },
        },
    }
    assert p.metrics.registry.get_sample_value("supervisor_ready") == 0.0
    assert p.metrics.registry.get_sample_value("supervisor_ready_check", {"check": "docker"}) == 0.0
    assert p.metrics.registry.get_sample_value("supervisor_ready_check", {"check": "nats"}) == 1.0


async def test_readyz_follows_the_breaker(
    tmp_dir: Path, nats_url: str, docker_client: object
) -> None:
    async with parts_for(tmp_dir, nats_url) as p, serving(_app(p)) as client:
        assert await p.events.wait_connected(10)
        p.breaker.record(DockerUnavailable("create"))
        p.breaker.record(DockerUnavailable("create"))

        status, body = await _ready(client)
        p.breaker.record(None)  # open: a late success does not close it
        still = await _ready(client)

    assert status == 503
    assert body["checks"] == {
        **READY,
        "breaker": {
            "ok": False,
            "reason": "the Docker breaker is open after 2 engine failures",
            "state": "open",
            "failures": 2,
        },
    }
    assert still == (status, body)


async def test_readyz_follows_host_pressure(
    tmp_dir: Path, nats_url: str, docker_client: object
) -> None:
    async with parts_for(tmp_dir, nats_url) as p, serving(_app(p)) as client:
        assert await p.events.wait_connected(10)
        p.host.cpu = 95.0
        await p.monitor.tick()
        under = await _ready(client)
        p.host.cpu = 50.0
        await p.monitor.tick()
        recovered = await _ready(client)

    assert under == (
        503,
        {
            "ready": False,
            "checks": {
                **READY,
                "pressure": {
                    "ok": False,
                    "reason": "host under pressure: cpu_pct 95 >= 80",
                    "metrics": ["cpu_pct"],
                },
            },
        },
    )
    assert recovered == (200, {"ready": True, "checks": READY})


async def test_readyz_follows_nats_and_the_outbox(
    tmp_dir: Path, nats_server: NatsServer, docker_client: object
) -> None:
    async with parts_for(tmp_dir, nats_server.url) as p, serving(_app(p, max_backlog=2)) as client:
        assert await p.events.wait_connected(10)
        nats_server.stop()
        async with asyncio.timeout(10):
            while p.events.connected:
                await asyncio.sleep(0.05)
        em = Emitter(p.events, "n1", "i1")
        for _ in range(3):
            em.emit(SupervisorStarted)

        down = await _ready(client)
        nats_server.restart()
        assert await p.events.flush(15)
        back = await _ready(client)

    assert down == (
        503,
        {
            "ready": False,
            "checks": {
                **READY,
                "nats": {"ok": False, "reason": "not connected to NATS"},
                "outbox": {
                    "ok": False,
                    "reason": "3 events waiting to be published, more than 2",
                    "backlog": 3,
                    "max_backlog": 2,
                },
            },
        },
    )
    assert back == (
        200,
        {"ready": True, "checks": {**READY, "outbox": {**READY["outbox"], "max_backlog": 2}}},
    )


async def test_a_check_that_hangs_or_raises_fails_with_that_reason() -> None:
    async def slow() -> Check:
        await asyncio.sleep(10)
        raise AssertionError("unreachable")

    async def broken() -> Check:
        raise RuntimeError("no luck")

    async def fine() -> Check:
        return Check(ok=True, reason="fine", details={"n": 1})

    app = create_app(
        metrics=Metrics(),
        readiness={"slow": slow, "broken": broken, "fine": fine},
        check_timeout_s=0.2,
    )
    async with serving(app) as client:
        status, body = await _ready(client)

    assert (status, body) == (
        503,
        {
            "ready": False,
            "checks": {
                "slow": {"ok": False, "reason": "no answer within 0.2s"},
                "broken": {"ok": False, "reason": "the check raised RuntimeError: no luck"},
                "fine": {"ok": True, "reason": "fine", "n": 1},
            },
        },
    )


# --- metrics ---------------------------------------------------------------------------------


async def test_metrics_parse_and_the_counters_move() -> None:
    metrics = Metrics()
    # `on_scrape` refreshes gauges just before each scrape; here it counts the scrapes.
    app = create_app(
        metrics=metrics, readiness={}, on_scrape=metrics.queue_depth.labels("high").inc
    )

    async def scrape(
        client: aiohttp.ClientSession,
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with client.get("/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == CONTENT_TYPE_PLAIN_0_0_4  # negotiated: no Accept
            text = await r.text()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    async with serving(app) as client:
        before = await scrape(client)
        metrics.tasks.labels("succeeded").inc()
        metrics.tasks.labels("succeeded").inc()
        metrics.errors.labels("timeout", "EXECUTION_TIMEOUT").inc()
        metrics.cleanup_duration.labels("kill").observe(0.02)
        metrics.outbox_backlog.set(7)
        after = await scrape(client)
        async with client.get("/readyz") as r:
            assert r.status == 200
        ready = await scrape(client)

    assert ("supervisor_tasks_total", (("outcome", "succeeded"),)) not in before
    assert after[("supervisor_tasks_total", (("outcome", "succeeded"),))] == 2.0
    assert (
        after[("supervisor_errors_total", (("code", "EXECUTION_TIMEOUT"), ("type", "timeout")))]
        == 1.0
    )
    assert after[("supervisor_cleanup_duration_seconds_count", (("step", "kill"),))] == 1.0
    assert after[("supervisor_outbox_backlog", ())] == 7.0
    assert (
        before[("supervisor_queue_depth", (("priority", "high"),))],
        after[("supervisor_queue_depth", (("priority", "high"),))],
    ) == (1.0, 2.0)
    assert before[("supervisor_ready", ())] == 0.0
    assert ready[("supervisor_ready", ())] == 1.0
    build = [labels for (name, labels), v in ready.items() if name == "supervisor_build_info"]
    assert len(build) == 1 and dict(build[0])["version"] != ""
    assert ready[("process_resident_memory_bytes", ())] > 0


async def test_metrics_speak_openmetrics_when_asked() -> None:
    async with (
        serving(create_app(metrics=Metrics(), readiness={})) as client,
        client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        ) as r,
    ):
        body = await r.text()

    assert r.headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")


# --- the v1 API ------------------------------------------------------------------------------


class Api:
    """Stub handlers: answer what each test sets, record what they were given."""

    def __init__(self) -> None:
        self.specs: list[TaskSpec] = []
        self.reply: Submission | Exception = Submission("t-1", "c-1", True, stream_seq=1)
        self.tasks: dict[str, Mapping[str, Any]] = {"t-1": {"task_id": "t-1", "state": "running"}}
        self.query_error: Exception | None = None

    async def submit(self, spec: TaskSpec) -> Submission:
        self.specs.append(spec)
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply

    async def task(self, task_id: str) -> Mapping[str, Any] | None:
        return self.tasks.get(task_id)

    async def query(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.query_error is not None:
            raise self.query_error
        return {"columns": ["n"], "rows": [[len(request["sql"])]]}


def _rejection(code: str, type_: str, retryable: bool) -> Submission:
    err = ExecutionError(
        type=type_,  # type: ignore[arg-type]
        code=code,
        message=f"refused: {code}",
        retryable=retryable,
        details={"k": 1},
        task_id="t-1",
    )
    return Submission("t-1", "c-1", False, error=err)


@contextlib.asynccontextmanager
async def api(
    token: str | None = None, **kw: Any
) -> AsyncIterator[tuple[Api, aiohttp.ClientSession]]:
    handlers = Api()
    async with serving(
        create_app(metrics=Metrics(), readiness={}, handlers=handlers, token=token, **kw)  # type: ignore[arg-type]
    ) as client:
        yield handlers, client


async def _call(
    client: aiohttp.ClientSession, method: str, path: str, **kw: Any
) -> tuple[int, Any]:
    async with client.request(method, path, **kw) as r:
        assert r.content_type == "application/json"
        return r.status, await r.json()


async def test_an_accepted_task_is_202_with_its_ids() -> None:
    async with api() as (handlers, client):
        reply = await _call(client, "POST", "/v1/tasks", json={**SPEC, "priority": "high"})

    assert reply == (202, {"task_id": "t-1", "correlation_id": "c-1", "status": "queued"})
    assert [(s.image, s.priority) for s in handlers.specs] == [
        ("supervisor-sandbox:busybox", "high")
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "spec"),
        (b'{"command": ["true"]}', "spec"),
        (
            b'{"image": "x", "command": ["true"], "limits": {"memory_mb": "lots"}}',
            "limits.memory_mb",
        ),
    ],
)
async def test_an_invalid_spec_is_400_and_never_reaches_the_intake(body: bytes, field: str) -> None:
    async with api() as (handlers, client):
        status, doc = await _call(client, "POST", "/v1/tasks", data=body)

    assert status == 400
    assert (doc["error"]["type"], doc["error"]["code"], doc["error"]["field"]) == (
        "validation",
        "INVALID_SPEC",
        field,
    )
    assert doc["error"]["message"].startswith(f"invalid spec: {field}: ")
    assert handlers.specs == []


@pytest.mark.parametrize(
    ("code", "type_", "retryable", "status"),
    [
        ("QUEUE_FULL", "resource", True, 429),
        ("INVALID_SPEC", "validation", False, 400),
        ("POLICY_VIOLATION", "security", False, 403),
        ("HOST_PRESSURE", "resource", True, 503),
    ],
)
async def test_a_refused_task_answers_with_the_catalogue_error(
    code: str, type_: str, retryable: bool, status: int
) -> None:
    async with api() as (handlers, client):
        handlers.reply = _rejection(code, type_, retryable)
        async with client.post("/v1/tasks", json=SPEC) as r:
            got = (r.status, await r.json(), r.headers.get("Retry-After"))

    assert got == (
        status,
        {
            "error": {
                "type": type_,
                "code": code,
                "message": f"refused: {code}",
                "details": {"k": 1},
                "retryable": retryable,
                "task_id": "t-1",
            }
        },
        "1" if code == "QUEUE_FULL" else None,
    )


async def test_nats_down_at_submit_is_503() -> None:
    async with api() as (handlers, client):
        handlers.reply = NatsUnavailable("jetstream", "task.submitted could not be made durable")
        reply = await _call(client, "POST", "/v1/tasks", json=SPEC)

    assert reply == (
        503,
        {
            "error": {
                "type": "infrastructure",
                "code": "NATS_UNAVAILABLE",
                "retryable": True,
                "message": "NATS at jetstream is unreachable: task.submitted could not be made durable",
            }
        },
    )


async def test_a_task_is_found_or_404() -> None:
    async with api() as (_, client):
        found = await _call(client, "GET", "/v1/tasks/t-1")
        missing = await _call(client, "GET", "/v1/tasks/t-404")

    assert found == (200, {"task_id": "t-1", "state": "running"})
    assert missing == (
        404,
        {"error": {"type": "validation", "code": "TASK_NOT_FOUND", "message": "no task 't-404'"}},
    )


async def test_query_passes_the_body_and_maps_the_read_sides_errors() -> None:
    async with api() as (handlers, client):
        ok = await _call(client, "POST", "/v1/query", json={"sql": "SELECT 1"})
        not_object = await _call(client, "POST", "/v1/query", json=["SELECT 1"])
        handlers.query_error = QueryRefused("only one SELECT is allowed")
        refused = await _call(client, "POST", "/v1/query", json={"sql": "DROP TABLE tasks"})
        handlers.query_error = QueryTimeout(5.0)
        slow = await _call(client, "POST", "/v1/query", json={"sql": "SELECT 1"})
        handlers.query_error = ApiError(409, "validation", "CONFLICT", "try later", hint="x")
        precise = await _call(client, "POST", "/v1/query", json={"sql": "SELECT 1"})
        handlers.query_error = KeyError("bug")
        bug = await _call(client, "POST", "/v1/query", json={"sql": "SELECT 1"})

    assert ok == (200, {"columns": ["n"], "rows": [[8]]})
    assert not_object == (
        400,
        {
            "error": {
                "type": "validation",
                "code": "INVALID_QUERY",
                "message": "the body must be a JSON object",
            }
        },
    )
    assert refused == (
        400,
        {
            "error": {
                "type": "validation",
                "code": "QUERY_REFUSED",
                "message": "query refused: only one SELECT is allowed",
            }
        },
    )
    assert slow == (
        504,
        {
            "error": {
                "type": "timeout",
                "code": "QUERY_TIMEOUT",
                "message": "query interrupted after its time limit of 5s",
            }
        },
    )
    assert precise == (
        409,
        {"error": {"type": "validation", "code": "CONFLICT", "message": "try later", "hint": "x"}},
    )
    assert bug == (
        500,
        {"error": {"type": "infrastructure", "code": "INTERNAL", "message": "internal error"}},
    )


async def test_routing_errors_are_json_too() -> None:
    async with api(max_body_bytes=1024) as (_, client):
        nowhere = await _call(client, "GET", "/v2/nothing")
        async with client.get("/v1/query") as r:
            wrong_method = (r.status, await r.json(), r.headers.get("Allow"))
        too_big = await _call(client, "POST", "/v1/tasks", data=b"x" * 4096)

    assert nowhere == (
        404,
        {"error": {"type": "validation", "code": "NOT_FOUND", "message": "Not Found"}},
    )
    assert wrong_method == (
        405,
        {
            "error": {
                "type": "validation",
                "code": "METHOD_NOT_ALLOWED",
                "message": "Method Not Allowed",
            }
        },
        "POST",
    )
    assert too_big[0] == 413
    assert too_big[1]["error"]["code"] == "BODY_TOO_LARGE"


# --- the token ---------------------------------------------------------------------------------


async def test_the_token_guards_v1_only() -> None:
    async with api(token="s3cret") as (handlers, client):
        missing = await _call(client, "POST", "/v1/tasks", json=SPEC)
        async with client.get("/v1/tasks/t-1", headers={"Authorization": "Bearer wrong"}) as r:
            wrong = (r.status, r.headers["WWW-Authenticate"])
        good = await _call(
            client, "POST", "/v1/tasks", json=SPEC, headers={"Authorization": "Bearer s3cret"}
        )
        async with client.get("/healthz") as r:
            health = r.status
        async with client.get("/metrics") as r:
            scrape = r.status

    assert missing == (
        401,
        {
            "error": {
                "type": "security",
                "code": "UNAUTHORIZED",
                "message": "a valid bearer token is required for /v1",
            }
        },
    )
    assert wrong == (401, 'Bearer realm="supervisor"')
    assert good[0] == 202
    assert len(handlers.specs) == 1
    assert (health, scrape) == (200, 200)


# --- serving ---------------------------------------------------------------------------------


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8787") == ("127.0.0.1", 8787)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8787", "localhost", ":80", "host:port"):
        with pytest.raises(Exception, match="is not HOST:PORT"):
            parse_listen(bad)


async def test_a_taken_port_is_a_clear_error() -> None:
    first = HttpServer(create_app(metrics=Metrics(), readiness={}), "127.0.0.1:0")
    await first.start()
    try:
        second = HttpServer(create_app(metrics=Metrics(), readiness={}), f"127.0.0.1:{first.port}")
        with pytest.raises(HttpServerError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            await second.start()
    finally:
        await first.stop()


async def test_readyz_shows_no_file_path_in_its_reasons() -> None:
    async def failing() -> Check:
        return Check(
            ok=False,
            reason="cannot open /srv/supervisor/data/projection.duckdb: busy",
            details={"where": "/srv/supervisor/data/outbox/abc.log"},
        )

    app = create_app(metrics=Metrics(), readiness={"projection": failing}, token="t0k")
    async with serving(app) as client:
        async with client.get("/readyz") as r:
            doc = await r.json()
        async with client.get("/v1/readyz") as anonymous:
            refused = anonymous.status
        async with client.get("/v1/readyz", headers={"Authorization": "Bearer t0k"}) as full:
            whole = await full.json()

    assert (r.status, doc["checks"]["projection"]) == (
        503,
        {
            "ok": False,
            "reason": "cannot open <path>: busy",
            "where": "<path>",
        },
    )
    # The reasons whole, for whoever holds the token.
    assert refused == 401
    assert (full.status, whole["checks"]["projection"]) == (
        503,
        {
            "ok": False,
            "reason": "cannot open /srv/supervisor/data/projection.duckdb: busy",
            "where": "/srv/supervisor/data/outbox/abc.log",
        },
    )


def test_the_token_may_come_from_a_file(tmp_dir: Path) -> None:
    path = tmp_dir / "token"
    path.write_text("s3cret\n")
    assert http_token(HttpConfig(token_file=str(path))) == "s3cret"
    assert http_token(HttpConfig(token="inline")) == "inline"
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        http_token(HttpConfig(token_file=str(path)))
    with pytest.raises(ConfigError, match="not both"):
        http_token(HttpConfig(token="a", token_file=str(path)))
    with pytest.raises(ConfigError, match="No such file"):
        http_token(HttpConfig(token_file=str(tmp_dir / "missing")))
