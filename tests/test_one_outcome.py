"""One outcome per task under ordinary clients: a refused resubmission never ends a task
that exists, and a passing refusal (a full queue) never burns the id. Against a real
daemon, dockerd and nats-server; each test audits the stream's whole history."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import msgspec
import pytest

from projections.audit import audit_records, records_of
from schemas import (
    ContainerCreated,
    ErrorRaised,
    Event,
    PoolAdopted,
    PoolRetired,
    TaskRefused,
    TaskSpec,
    event_type,
)
from schemas.errors import ApiError
from schemas.http import TaskView
from supervisor.client import Client
from testing.daemon import SANDBOX_IMAGE, DaemonProc, task, wait_until
from testing.dockerd import PrivateDockerd
from testing.stream import stream_events

pytestmark = pytest.mark.usefixtures("docker_client")

TERMINAL = ("task.succeeded", "task.failed", "task.rejected")


def _history(nats_url: str, task_id: str = "*") -> list[Event]:
    return asyncio.run(stream_events(nats_url, f"sup.*.*.*.{task_id}"))


def _audit(nats_url: str) -> list[str]:
    """The audit of the whole history, once the removals that follow the last outcomes
    are in it (a container that exited on its own is removed after the task's end)."""
    deadline = time.monotonic() + 10
    while True:
        found = _audit_now(nats_url)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _audit_now(nats_url: str) -> list[str]:
    return [
        f"{v.rule} {v.task_id} {v.detail}" for v in audit_records(records_of(_history(nats_url)))
    ]


def _post(d: DaemonProc, doc: dict[str, object]) -> tuple[int, dict[str, object]]:
    status, body = d.request("POST", "/v1/tasks", json.dumps(doc).encode())
    return status, json.loads(body)


def _spec(script: str, **extra: object) -> TaskSpec:
    return msgspec.convert(task(script, **extra), TaskSpec)


def _row(client: Client, task_id: str) -> TaskView | None:
    """The task as the daemon's projection shows it (None until it is projected)."""
    try:
        return client.get(task_id)
    except ApiError as e:
        if e.status == 404:
            return None
        raise


def _terminals(events: list[Event]) -> list[str]:
    return [event_type(e) for e in events if event_type(e) in TERMINAL]


def test_a_refused_resubmission_is_an_error_about_it_and_the_task_keeps_its_outcome(
    tmp_dir: Path, nats_url: str, daemons, request: pytest.FixtureRequest
) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(tmp_dir / "data", nats_url).start()
    daemons.append(d)
    client = d.client()
    request.addfinalizer(client.close)
    done = client.run(_spec("echo once", task_id="t-once"), timeout_s=60)
    assert done.status == "succeeded"

    bad_status, bad = _post(d, {"task_id": "t-once", "image": "Not An Image", "command": ["x"]})
    other_status, other = _post(d, task("echo other", task_id="t-once"))
    policy_status, policy = _post(d, task("echo once", task_id="t-once", privileged=True))

    assert (bad_status, bad["error"]["code"]) == (400, "INVALID_SPEC")  # type: ignore[index]
    assert (other_status, other["error"]["code"]) == (409, "DUPLICATE_TASK_ID")  # type: ignore[index]
    assert (policy_status, policy["error"]["code"]) == (403, "POLICY_VIOLATION")  # type: ignore[index]
    events = _history(nats_url, "t-once")
    assert _terminals(events) == ["task.succeeded"]
    refusals = [(e.code, e.attempt) for e in events if isinstance(e, ErrorRaised)]
    assert refusals == [("INVALID_SPEC", 0), ("DUPLICATE_TASK_ID", 0), ("POLICY_VIOLATION", 0)]
    assert client.get("t-once").outcome == "succeeded"
    assert _audit(nats_url) == []


def test_a_task_refused_by_a_full_queue_runs_once_when_sent_again(
    tmp_dir: Path, nats_url: str, daemons, request: pytest.FixtureRequest
) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(
        tmp_dir / "data",
        nats_url,
        {"scheduling": {"concurrency": 1, "queue_bound_per_priority": 2, "shutdown_grace_s": 1}},
    ).start()
    daemons.append(d)
    client = d.client()
    request.addfinalizer(client.close)
    blocker = client.submit(_spec("sleep 30", task_id="t-blocker", limits={"timeout_s": 60}))
    wait_until(
        lambda: getattr(_row(client, blocker.task_id), "state", None) == "running",
        what="the blocker to run",
    )
    client.submit(_spec("true", task_id="t-queued"))
    spec = task("echo at last", task_id="t-later")

    refusals = [_post(d, spec) for _ in range(3)]
    client.cancel("t-blocker")
    wait_until(
        lambda: getattr(_row(client, "t-queued"), "outcome", None) is not None,
        what="the queue to drain",
        timeout=90,
    )
    status, accepted = _post(d, spec)
    again_status, again = _post(d, spec)
    result = client.wait("t-later", timeout_s=60)

    assert [(s, b["error"]["code"]) for s, b in refusals] == [(429, "QUEUE_FULL")] * 3  # type: ignore[index]
    assert (status, accepted["status"]) == (202, "queued")
    assert (again_status, again["status"]) == (200, "known")
    assert result.result is not None
    assert (result.outcome, result.result.stdout) == ("succeeded", "at last\n")
    events = _history(nats_url, "t-later")
    assert _terminals(events) == ["task.succeeded"]
    assert sum(isinstance(e, TaskRefused) for e in events) == 3
    assert [event_type(e) for e in events].count("attempt.started") == 1
    assert _audit(nats_url) == []


def _cancelled(client: Client, task_id: str) -> bool:
    row = _row(client, task_id)
    return row is not None and row.outcome == "failed" and row.error_code == "CANCELLED"


# A retryable first attempt (the deadline), then a long, fixed backoff.
_BACKING_OFF = {
    "limits": {"timeout_s": 0.5},
    "retry": {"max_attempts": 3, "base_delay_s": 120, "jitter": False},
}


def test_a_task_in_backoff_holds_no_slot_and_a_cancel_ends_it_at_once(
    tmp_dir: Path, nats_url: str, daemons, request: pytest.FixtureRequest
) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(tmp_dir / "data", nats_url, {"scheduling": {"concurrency": 1}}).start()
    daemons.append(d)
    client = d.client()
    request.addfinalizer(client.close)
    client.submit(_spec("sleep 5", task_id="t-backoff", **_BACKING_OFF))
    wait_until(
        lambda: getattr(_row(client, "t-backoff"), "state", None) == "retrying",
        what="the first attempt to time out",
    )

    other = client.run(_spec("echo free slot"), timeout_s=60)
    cancel_at = time.monotonic()
    assert client.cancel("t-backoff").status == "cancelling"
    wait_until(lambda: _cancelled(client, "t-backoff"), what="the cancel", timeout=30)
    took = time.monotonic() - cancel_at

    assert (other.status, other.stdout) == ("succeeded", "free slot\n")
    assert took < 20  # not the 120 s backoff
    view = client.get("t-backoff")
    assert (view.attempts, view.terminal_events) == (1, 1)
    events = _history(nats_url, "t-backoff")
    assert _terminals(events) == ["task.failed"]
    assert [(e.code, e.attempt) for e in events if isinstance(e, ErrorRaised)] == [
        ("EXECUTION_TIMEOUT", 1),
        ("CANCELLED", 0),
    ]
    assert _audit(nats_url) == []


def test_tasks_in_backoff_across_a_restart_end_at_once_when_cancelled(
    tmp_dir: Path, nats_url: str, daemons, request: pytest.FixtureRequest
) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(tmp_dir / "data", nats_url).start()
    daemons.append(d)
    ids = [f"t-park-{i}" for i in range(6)]
    with d.client() as client:
        for task_id in ids:
            client.submit(_spec("sleep 5", task_id=task_id, **_BACKING_OFF))
        wait_until(
            lambda: all(getattr(_row(client, t), "state", None) == "retrying" for t in ids),
            what="every first attempt to time out",
        )
    d.stop()
    d2 = DaemonProc(tmp_dir / "data", nats_url).start()
    daemons.append(d2)
    client = d2.client()
    request.addfinalizer(client.close)

    cancel_at = time.monotonic()
    for task_id in ids:
        client.cancel(task_id)
    wait_until(lambda: all(_cancelled(client, t) for t in ids), what="the cancels", timeout=60)

    assert time.monotonic() - cancel_at < 30
    for task_id in ids:
        events = _history(nats_url, task_id)
        assert _terminals(events) == ["task.failed"]
        assert [event_type(e) for e in events].count("attempt.started") == 1
    assert _audit(nats_url) == []


@pytest.fixture
def dockerd(tmp_dir: Path) -> Iterator[PrivateDockerd]:
    engine = PrivateDockerd(tmp_dir / "dk").start()
    try:
        engine.load_sandbox_image()
        yield engine
    finally:
        engine.destroy()


def test_a_dockerd_restart_costs_no_task_its_outcome(
    tmp_dir: Path, nats_url: str, daemons, dockerd: PrivateDockerd, request: pytest.FixtureRequest
) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(
        tmp_dir / "data",
        nats_url,
        {
            "docker_url": dockerd.url,
            "scheduling": {"concurrency": 4},
            "pool": {"size": 2, "shapes": [{"image": SANDBOX_IMAGE}]},
        },
    ).start()
    daemons.append(d)
    client = d.client()
    request.addfinalizer(client.close)
    engine = docker.DockerClient(base_url=dockerd.url, timeout=30)
    request.addfinalizer(engine.close)
    ids = [f"t-engine-{i}" for i in range(6)]
    for task_id in ids:
        client.submit(_spec("sleep 8; echo done", task_id=task_id, limits={"timeout_s": 60}))
    wait_until(
        lambda: sum(getattr(_row(client, t), "state", None) == "running" for t in ids) == 4,
        what="four tasks to run",
    )

    def parked() -> list[str]:
        """Running containers of the pool that no task adopted (an adopted one keeps the
        pool's label: the log says whose it is)."""
        flt = {"label": "supervisor.pool", "status": "running"}
        listed = [c.id for c in engine.containers.list(sparse=True, filters=flt)]
        ran = {
            e.container_id
            for e in asyncio.run(stream_events(nats_url, "sup.container.created.>"))
            if isinstance(e, ContainerCreated)
        }
        return [c for c in listed if c not in ran]

    wait_until(lambda: len(parked()) == 2, what="two parked containers")
    running = sorted(t for t in ids if getattr(_row(client, t), "state", None) == "running")
    were_parked = parked()
    dockerd.stop()  # SIGTERM: dockerd stops the running containers, then exits
    time.sleep(3)
    dockerd.start()
    views = [client.wait(t, timeout_s=120) for t in ids]

    assert [(v.outcome, v.terminal_events) for v in views] == [("succeeded", 1)] * 6
    assert all(v.result is not None and v.result.stdout == "done\n" for v in views)
    # The attempts the restart killed were infrastructure failures, retried once the
    # engine was back; no task used up its attempts.
    first_errors = {
        t: [e.error_type for e in _history(nats_url, t) if isinstance(e, ErrorRaised)] for t in ids
    }
    assert len(running) == 4
    assert {t: first_errors[t] for t in running} == {t: ["infrastructure"] for t in running}
    assert {v.task_id: v.attempts for v in views} == {t: 2 if t in running else 1 for t in ids}
    assert _audit(nats_url) == []
    # The parked containers the restart stopped were never handed to a task: retired as
    # vanished (and new ones parked once the engine answered).
    retired = [
        e
        for e in asyncio.run(stream_events(nats_url, "sup.pool.retired.>"))
        if isinstance(e, PoolRetired)
    ]
    assert {
        e.container_id: e.reason for e in retired if e.container_id in were_parked
    } == dict.fromkeys(were_parked, "vanished")
    adopted = {
        e.container_id for t in ids for e in _history(nats_url, t) if isinstance(e, PoolAdopted)
    }
    assert not adopted & set(were_parked)
    wait_until(lambda: len(parked()) == 2, what="the pool to refill")
    d.stop()
    assert d.wait() == 0
    assert not engine.containers.list(all=True, filters={"label": "supervisor.managed=true"})


def test_two_daemons_on_one_host_never_take_each_others_containers(
    tmp_dir: Path, daemons, docker_client
) -> None:  # type: ignore[no-untyped-def]
    fast = {"reconcile": {"interval_s": 1, "creation_grace_s": 1}}
    first = DaemonProc(tmp_dir / "one", None, {"node_id": "", **fast}).start()
    daemons.append(first)
    node_id = (tmp_dir / "one" / "node-id").read_text().strip()
    # A second data dir given the same id by mistake: its containers carry the same node
    # label, and still neither daemon may remove the other's.
    second = DaemonProc(tmp_dir / "two", None, {"node_id": node_id, **fast}).start()
    daemons.append(second)
    spec = _spec("sleep 6; echo kept")

    with first.client() as c1, second.client() as c2:
        s1, s2 = c1.submit(spec), c2.submit(spec)
        r1, r2 = c1.wait(s1.task_id, timeout_s=90), c2.wait(s2.task_id, timeout_s=90)
    dry = subprocess.run(
        [sys.executable, "-m", "supervisor", "reconcile", "--dry-run", "--json"],
        env={**os.environ, "SUPERVISOR_DATA_DIR": str(tmp_dir / "one")},
        capture_output=True,
        timeout=120,
        check=False,
    )

    assert re.fullmatch(r"n-[0-9a-f]{8}", node_id)
    assert [(r.outcome, r.attempts) for r in (r1, r2)] == [("succeeded", 1), ("succeeded", 1)]
    assert dry.returncode == 0, dry.stderr.decode()
    assert json.loads(dry.stdout)["node_id"] == node_id
    first.stop()
    again = DaemonProc(tmp_dir / "one", None, {"node_id": ""}).start()
    daemons.append(again)
    assert (tmp_dir / "one" / "node-id").read_text().strip() == node_id


@pytest.mark.parametrize("damage", ["zeroed", "truncated"])
def test_a_damaged_projection_is_set_aside_and_rebuilt_from_the_stream(
    tmp_dir: Path, nats_url: str, daemons, damage: str
) -> None:  # type: ignore[no-untyped-def]
    d = DaemonProc(tmp_dir / "data", nats_url).start()
    daemons.append(d)
    with d.client() as client:
        ids = [client.submit(_spec(f"echo {i}")).task_id for i in range(5)]
        for task_id in ids:
            client.wait(task_id, timeout_s=60)
    d.stop()
    db = tmp_dir / "data" / "projection.duckdb"
    size = db.stat().st_size
    with db.open("r+b") as f:
        if damage == "zeroed":  # every block past DuckDB's headers (some may be free)
            f.seek(12288)
            f.write(b"\0" * (size - 12288))
        else:
            f.truncate(size // 2)

    again = DaemonProc(tmp_dir / "data", nats_url).start()
    daemons.append(again)
    with again.client() as client:
        views = [client.get(task_id) for task_id in ids]

    assert [(v.outcome, v.terminal_events) for v in views] == [("succeeded", 1)] * 5
    aside = list((tmp_dir / "data").glob("projection.duckdb.damaged-*"))
    assert len([p for p in aside if not p.name.endswith(".wal")]) == 1
    assert "is damaged" in again.log() and "rebuilding it from the stream" in again.log()
