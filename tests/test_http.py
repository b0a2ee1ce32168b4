"""The HTTP endpoint, served for real on a loopback port and asked with aiohttp's client.

Health, readiness and metrics. Readiness is wired to real parts: the Docker engine (and a
socket that hangs up, for an unreachable one), an event log on a real nats-server (stopped
and restarted to make NATS and the outbox fail), the breaker and the monitor services. The
`/v1` API's mapping is in `test_http_api`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from schemas import SupervisorStarted
from schemas.config import BreakerConfig, Thresholds
from schemas.errors import DockerUnavailable
from schemas.http import Check
from supervisor.daemon.api import create_app
from supervisor.daemon.checks import daemon_checks
from supervisor.daemon.http_server import HttpServer
from supervisor.daemon.monitor import HostSample, ResourceMonitor
from supervisor.docker.engine_breaker import DockerBreaker
from supervisor.docker.runtime import DockerRuntime
from supervisor.eventlog.emitter import Emitter
from supervisor.eventlog.log import EventLog
from supervisor.eventlog.nats_server import NatsServer
from supervisor.observability.metrics import Metrics
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
    monitor = ResourceMonitor(emitter, host, thresholds=Thresholds(cpu_pct=80.0), metrics=metrics)
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
