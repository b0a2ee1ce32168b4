"""The daemon under trouble and under watch: the Docker breaker with a dockerd that really
stops, readiness that follows each cause, pressure that holds work back, Prometheus
metrics, the HTTP API and the JSON logs. Real dockerd, real nats-server, `supervisor
serve` as a subprocess."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from schemas import (
    AttemptStarted,
    BreakerTransition,
    ResourceAlert,
    ResourceRecovered,
    TaskFailed,
    TaskSucceeded,
)
from supervisor.eventlog.nats_server import NatsServer
from testing.daemon import HOST_BRAKES, DaemonProc, submit, task
from testing.dockerd import PrivateDockerd
from testing.stream import count_messages, stream_events

pytestmark = pytest.mark.usefixtures("docker_client")


@pytest.fixture
def dockerd(tmp_dir: Path) -> Iterator[PrivateDockerd]:
    engine = PrivateDockerd(tmp_dir / "dk").start()
    try:
        engine.load_sandbox_image()
        yield engine
    finally:
        engine.destroy()


def _start(daemons: list[DaemonProc], tmp_dir: Path, nats_url: str, **config: Any) -> DaemonProc:
    d = DaemonProc(tmp_dir / "data", nats_url, config).start()
    daemons.append(d)
    return d


def _wait_until(cond: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _checks(d: DaemonProc) -> tuple[int, dict[str, dict[str, Any]]]:
    status, body = d.get("/readyz")
    return status, json.loads(body)["checks"]


def _failing(d: DaemonProc) -> set[str]:
    _, checks = _checks(d)
    return {name for name, c in checks.items() if not c["ok"]}


def _metrics(d: DaemonProc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by Prometheus' own text parser."""
    status, body = d.get("/metrics")
    assert status == 200
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _events(nats_url: str, subject: str) -> list[Any]:
    return asyncio.run(stream_events(nats_url, subject))


def _count(nats_url: str, subject: str) -> int:
    return asyncio.run(count_messages(nats_url, subject))


def _result(nats_url: str, client: Path, spec: dict[str, Any]) -> dict[str, Any]:
    proc = submit(nats_url, client, spec, "--wait", "--json", "--timeout", "120")
    assert proc.returncode in (0, 1), proc.stderr.decode()
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def _terminal(nats_url: str, task_id: str) -> Any:
    """The task's terminal event, once it is in the stream."""
    found = _wait_until(
        lambda: [
            e
            for e in _events(nats_url, f"sup.task.*.*.{task_id}")
            if isinstance(e, TaskSucceeded | TaskFailed)
        ],
        what=f"{task_id} to finish",
    )
    assert len(found) == 1
    return found[0]


def test_the_breaker_opens_when_dockerd_stops_tasks_wait_and_drain_after_it_returns(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc], dockerd: PrivateDockerd
) -> None:
    d = _start(
        daemons,
        tmp_dir,
        nats_url,
        docker_url=dockerd.url,
        breaker={"failure_threshold": 2, "open_interval_s": 1.0, "max_open_interval_s": 2.0},
        monitor={"interval_s": 0.2},
    )
    client = tmp_dir / "client"
    assert _result(nats_url, client, task("echo before"))["status"] == "succeeded"

    dockerd.stop()
    _wait_until(lambda: {"docker", "breaker"} <= _failing(d), what="readiness to see Docker go")
    assert d.get("/readyz")[0] == 503
    assert _metrics(d)[("supervisor_breaker_state", (("state", "open"),))] == 1.0
    waiting = [f"t-wait-{i}" for i in range(3)]
    for task_id in waiting:
        assert submit(nats_url, client, task("echo after", task_id=task_id)).returncode == 0
    time.sleep(2.0)  # several probe intervals: nothing may start while Docker is away
    for task_id in waiting:
        assert _count(nats_url, f"sup.attempt.started.*.{task_id}") == 0
    depth = _wait_until(
        lambda: _metrics(d)[("supervisor_queue_depth", (("priority", "normal"),))] or None,
        what="the queue depth gauge",
    )
    assert depth == 3.0

    dockerd.start()
    results = [_terminal(nats_url, t) for t in waiting]
    assert [type(r).__name__ for r in results] == ["TaskSucceeded"] * 3
    assert [r.result.attempts for r in results] == [1, 1, 1]
    _wait_until(lambda: "breaker" not in _failing(d), what="the breaker to close")
    moves = [
        (e.from_state, e.to_state)
        for e in _events(nats_url, "sup.breaker.>")
        if isinstance(e, BreakerTransition)
    ]
    assert moves[0] == ("closed", "open")
    assert moves[-1] == ("half_open", "closed")
    assert set(moves) <= {
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("half_open", "closed"),
    }


def test_readiness_follows_nats_and_the_outbox(
    tmp_dir: Path, nats_server: NatsServer, daemons: list[DaemonProc]
) -> None:
    d = _start(
        daemons,
        tmp_dir,
        nats_server.url,
        monitor={"interval_s": 0.2, "sample_event_every": 1},
        http={"max_outbox_backlog": 0},
    )
    _wait_until(lambda: d.get("/readyz")[0] == 200, what="ready")

    nats_server.stop()
    failing = _wait_until(
        lambda: _failing(d) >= {"nats", "outbox"} and _failing(d), what="readiness to see NATS go"
    )
    # The projection follows the stream, and the work queue's consumers live there, so
    # they are not ready either; nothing else fails.
    assert {"nats", "outbox"} <= failing <= {"nats", "outbox", "projection", "consumers"}
    assert d.get("/healthz") == (200, b'{"status":"ok"}')

    nats_server.restart()
    _wait_until(lambda: d.get("/readyz")[0] == 200, what="ready again", timeout=60)
    assert _failing(d) == set()


def test_pressure_holds_work_back_alerts_once_and_recovers(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    # One managed container is the threshold: a running task puts the host under pressure.
    # (A node id of its own: the count is of this node's containers only.)
    d = _start(
        daemons,
        tmp_dir,
        nats_url,
        node_id="n-pressure",
        thresholds={**dict.fromkeys(HOST_BRAKES, 0.0), "containers": 1},
        monitor={"interval_s": 0.2},
        scheduling={"shutdown_grace_s": 1},
    )
    client = tmp_dir / "client"
    assert submit(nats_url, client, task("sleep 6", task_id="t-hog")).returncode == 0
    _wait_until(lambda: "pressure" in _failing(d), what="the container count alert")
    assert submit(nats_url, client, task("true", task_id="t-later")).returncode == 0
    time.sleep(1.0)
    assert _count(nats_url, "sup.attempt.started.*.t-later") == 0

    later = _terminal(nats_url, "t-later")

    assert isinstance(later, TaskSucceeded)
    hog_end = max(e.occurred_at for e in _events(nats_url, "sup.container.exited.*.t-hog"))
    later_start = min(e.occurred_at for e in _events(nats_url, "sup.attempt.started.*.t-later"))
    assert later_start > hog_end
    alerts = [e for e in _events(nats_url, "sup.resource.>") if isinstance(e, ResourceAlert)]
    recovered = [e for e in _events(nats_url, "sup.resource.>") if isinstance(e, ResourceRecovered)]
    assert [(a.metric, a.threshold) for a in alerts][:1] == [("containers", 1.0)]
    assert len(recovered) >= 1
    # Crossings alternate: never two alerts of one metric without a recovery between.
    assert len([a for a in alerts if a.metric == "containers"]) <= len(recovered) + 1


def test_metrics_parse_and_move_as_tasks_run(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    d = _start(daemons, tmp_dir, nats_url)
    client = tmp_dir / "client"
    before = _metrics(d)
    assert before.get(("supervisor_tasks_total", (("outcome", "succeeded"),)), 0.0) == 0.0

    assert _result(nats_url, client, task("echo ok"))["status"] == "succeeded"
    failed = _result(nats_url, client, task("exit 3", retry={"max_attempts": 1}))
    assert failed["error"]["code"] == "NONZERO_EXIT"

    m = _metrics(d)
    assert m[("supervisor_tasks_total", (("outcome", "succeeded"),))] == 1.0
    assert m[("supervisor_tasks_total", (("outcome", "failed"),))] == 1.0
    assert m[("supervisor_errors_total", (("code", "NONZERO_EXIT"), ("type", "user_code")))] == 1.0
    assert m[("supervisor_cleanup_successes_total", (("step", "remove_container"),))] == 2.0
    assert m[("supervisor_cleanup_duration_seconds_count", (("step", "remove_container"),))] == 2.0
    assert m[("supervisor_task_duration_seconds_count", (("outcome", "succeeded"),))] == 1.0
    assert m[("supervisor_running_containers", ())] == 0.0
    assert m[("supervisor_breaker_state", (("state", "closed"),))] == 1.0
    assert m[("supervisor_breaker_state", (("state", "open"),))] == 0.0
    assert m[("supervisor_outbox_backlog", ())] >= 0.0
    assert 0 < m[("supervisor_host_memory_ratio", ())] <= 1  # a ratio, not a percentage
    assert {
        ("supervisor_queue_depth", (("priority", p),)) for p in ("high", "normal", "low")
    } <= set(m)


def test_the_http_api_submits_reports_and_refuses(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    d = _start(daemons, tmp_dir, nats_url, http={"token": "s3cret"})
    spec = json.dumps(task("echo via-http", task_id="t-http")).encode()

    assert d.request("POST", "/v1/tasks", spec, token="")[0] == 401
    status, body = d.request("POST", "/v1/tasks", spec, token="s3cret")
    assert status == 202, body
    assert json.loads(body)["task_id"] == "t-http"
    state = _wait_until(
        lambda: (
            (s := json.loads(d.get("/v1/tasks/t-http", token="s3cret")[1])).get("state")
            in ("succeeded", "failed")
            and s
        ),
        what="the task to finish",
    )
    assert state["state"] == "succeeded"
    assert d.get("/v1/tasks/t-nope", token="s3cret")[0] == 404

    status, body = d.request("POST", "/v1/tasks", b'{"image": 5}', token="s3cret")
    assert status == 400
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("validation", "INVALID_SPEC")
    assert "image" in error["message"]
    privileged = json.dumps(task("true", privileged=True)).encode()
    status, body = d.request("POST", "/v1/tasks", privileged, token="s3cret")
    assert (status, json.loads(body)["error"]["code"]) == (403, "POLICY_VIOLATION")


def test_logs_are_json_lines_with_the_task_context(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    d = _start(daemons, tmp_dir, nats_url)
    client = tmp_dir / "client"
    result = _result(
        nats_url,
        client,
        task("exit 3", task_id="t-logged", retry={"max_attempts": 2, "base_delay_s": 0.1}),
    )
    assert result["status"] == "failed"
    d.stop()

    lines = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    assert lines, d.log()
    assert all({"timestamp", "level", "event", "node_id"} <= set(line) for line in lines)
    assert {line["node_id"] for line in lines} == {"n1"}
    mine = [line for line in lines if line.get("task_id") == "t-logged"]
    assert mine, "no log line carries the task id"
    assert all(line.get("correlation_id") for line in mine)
    started = [
        e
        for e in _events(nats_url, "sup.attempt.started.*.t-logged")
        if isinstance(e, AttemptStarted)
    ]
    assert {line["correlation_id"] for line in mine} == {started[0].correlation_id}


def test_the_error_stream_is_served_over_http_as_json_lines(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    d = _start(daemons, tmp_dir, nats_url)
    assert d.get("/v1/errors?type=no.such")[0] == 400
    assert d.get("/v1/errors?colour=red")[0] == 400
    client = tmp_dir / "client"
    assert _result(nats_url, client, task("exit 4", task_id="t-before"))["status"] == "failed"

    got: list[dict[str, Any]] = []

    def follow() -> None:
        url = d.base_url + "/v1/errors?type=user_code&since=10m&limit=2"
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {d.token}"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.headers["Content-Type"].startswith("application/x-ndjson")
            got.extend(json.loads(line) for line in resp)

    reader = threading.Thread(target=follow)
    reader.start()
    assert _result(nats_url, client, task("exit 5", task_id="t-live"))["status"] == "failed"
    reader.join(60)

    assert [(e["task_id"], e["code"], e["details"]["exit_code"]) for e in got] == [
        ("t-before", "NONZERO_EXIT", 4),
        ("t-live", "NONZERO_EXIT", 5),
    ]
