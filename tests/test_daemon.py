"""The daemon as users run it: `supervisor serve` and `supervisor submit` subprocesses,
against a real dockerd and a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import time
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from schemas import (
    AttemptStarted,
    ContainerExited,
    ContainerStarted,
    ErrorRaised,
    Event,
    TaskFailed,
    TaskSucceeded,
)
from testing.daemon import DaemonProc, submit, task, wait_until
from testing.stream import stream_events

pytestmark = pytest.mark.usefixtures("docker_client")


def _daemon(
    daemons: list[DaemonProc], tmp_dir: Path, nats_url: str, **config: object
) -> DaemonProc:
    # These tests count the node's task containers by label: no warm pool parks others
    # (the pool has tests of its own, and the chaos test runs with it).
    config.setdefault("pool", {"size": 0})
    d = DaemonProc(tmp_dir / "data", nats_url, config).start()
    daemons.append(d)
    return d


def _managed(docker_client) -> list[str]:  # type: ignore[no-untyped-def]
    # The low-level list: no inspect per container, which would race with the reconciler.
    return [
        c["Id"]
        for c in docker_client.api.containers(
            all=True, filters={"label": ["supervisor.managed=true", "supervisor.node=n1"]}
        )
    ]


def test_submit_wait_runs_the_task_and_prints_its_result(
    tmp_dir: Path, nats_url: str, daemons
) -> None:  # type: ignore[no-untyped-def]
    _daemon(daemons, tmp_dir, nats_url)

    proc = submit(
        nats_url,
        tmp_dir / "client",
        task("echo via daemon", correlation_id="corr-1"),
        "--wait",
        "--json",
    )

    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert (result["status"], result["stdout"]) == ("succeeded", "via daemon\n")
    events = asyncio.run(stream_events(nats_url, f"sup.*.*.*.{result['task_id']}"))
    assert {e.correlation_id for e in events} == {"corr-1"}


def test_a_full_queue_is_refused_with_queue_full(
    tmp_dir: Path, nats_url: str, daemons, docker_client
) -> None:  # type: ignore[no-untyped-def]
    d = _daemon(
        daemons,
        tmp_dir,
        nats_url,
        scheduling={"concurrency": 1, "queue_bound_per_priority": 2, "shutdown_grace_s": 1},
    )
    client = tmp_dir / "client"
    assert submit(nats_url, client, task("sleep 30", limits={"timeout_s": 60})).returncode == 0
    wait_until(lambda: len(_managed(docker_client)) == 1, what="the blocker to run")
    assert submit(nats_url, client, task("true")).returncode == 0

    proc = submit(nats_url, client, task("true"), "--json")

    assert proc.returncode == 2
    result = json.loads(proc.stdout)
    assert result["status"] == "rejected"
    assert (result["error"]["type"], result["error"]["code"], result["error"]["retryable"]) == (
        "resource",
        "QUEUE_FULL",
        True,
    )
    # The same refusal from a `supervisor submit` on the daemon's own data dir is an error
    # of the node, counted by the daemon as its own are (the one above came from another
    # data dir, so another node).
    again = submit(nats_url, tmp_dir / "data", task("true"), "--json")
    assert again.returncode == 2
    wait_until(
        lambda: (
            'supervisor_errors_total{code="QUEUE_FULL",type="resource"} 1.0'
            in d.get("/metrics")[1].decode()
        ),
        what="the node's refusal to be counted",
    )
    # A passing refusal: recorded once, and the id stays free (tests/test_one_outcome.py).
    refused = asyncio.run(stream_events(nats_url, f"sup.task.refused.*.{result['task_id']}"))
    assert len(refused) == 1


def test_priority_order_holds_under_a_backlog(
    tmp_dir: Path, nats_url: str, daemons, docker_client
) -> None:  # type: ignore[no-untyped-def]
    _daemon(daemons, tmp_dir, nats_url, scheduling={"concurrency": 1})
    client = tmp_dir / "client"
    blocker = task(
        "sleep 120", limits={"timeout_s": 300}, task_id="blocker", retry={"max_attempts": 1}
    )
    assert submit(nats_url, client, blocker).returncode == 0
    wait_until(lambda: len(_managed(docker_client)) == 1, what="the blocker to run")
    for name, prio in [
        ("low-1", "low"),
        ("normal-1", "normal"),
        ("high-1", "high"),
        ("low-2", "low"),
        ("high-2", "high"),
        ("normal-2", "normal"),
    ]:
        assert submit(nats_url, client, task("true", task_id=name, priority=prio)).returncode == 0

    docker_client.api.kill(_managed(docker_client)[0])  # the backlog is complete: unblock
    wait_until(
        lambda: len(asyncio.run(stream_events(nats_url, "sup.task.succeeded.>"))) == 6,
        what="all tasks",
    )

    started = [
        e.task_id
        for e in asyncio.run(stream_events(nats_url, "sup.attempt.started.>"))
        if isinstance(e, AttemptStarted)
    ]
    assert started == ["blocker", "high-1", "high-2", "normal-1", "normal-2", "low-1", "low-2"]


def test_a_memory_budget_smaller_than_two_tasks_runs_them_one_at_a_time(
    tmp_dir: Path, nats_url: str, daemons
) -> None:  # type: ignore[no-untyped-def]
    _daemon(daemons, tmp_dir, nats_url, scheduling={"concurrency": 8, "memory_budget_mb": 200})
    client = tmp_dir / "client"
    for i in range(3):
        spec = task("sleep 1", task_id=f"mem-{i}", limits={"memory_mb": 128, "timeout_s": 30})
        assert submit(nats_url, client, spec).returncode == 0

    wait_until(
        lambda: len(asyncio.run(stream_events(nats_url, "sup.task.succeeded.>"))) == 3,
        what="all tasks",
    )

    spans: dict[str, list[Any]] = {}
    for e in asyncio.run(stream_events(nats_url, "sup.container.>")):
        if isinstance(e, ContainerStarted):
            spans[e.task_id] = [e.occurred_at, None]
        elif isinstance(e, ContainerExited):
            spans[e.task_id][1] = e.occurred_at
    ordered = sorted(spans.values())
    assert len(ordered) == 3
    for (_, end), (start, _) in itertools.pairwise(ordered):
        assert start >= end, "two 128 MB tasks overlapped under a 200 MB budget"


def test_sigterm_drains_and_exits_0_with_no_container_left(
    tmp_dir: Path, nats_url: str, daemons, docker_client
) -> None:  # type: ignore[no-untyped-def]
    d = _daemon(daemons, tmp_dir, nats_url, scheduling={"shutdown_grace_s": 20})
    assert (
        submit(
            nats_url,
            tmp_dir / "client",
            task("sleep 2; echo finished", task_id="drained", limits={"timeout_s": 30}),
        ).returncode
        == 0
    )
    wait_until(lambda: len(_managed(docker_client)) == 1, what="the task to run")

    d.signal(signal.SIGTERM)

    assert d.wait(60) == 0, d.log()
    assert _managed(docker_client) == []
    done = asyncio.run(stream_events(nats_url, "sup.task.succeeded.*.drained"))
    assert [e.result.stdout for e in done if isinstance(e, TaskSucceeded)] == ["finished\n"]
    stopped = asyncio.run(stream_events(nats_url, "sup.supervisor.stopped.>"))
    assert len(stopped) == 1


def test_a_second_signal_stops_at_once_and_still_cleans_up(
    tmp_dir: Path, nats_url: str, daemons, docker_client
) -> None:  # type: ignore[no-untyped-def]
    d = _daemon(daemons, tmp_dir, nats_url, scheduling={"shutdown_grace_s": 120})
    assert (
        submit(
            nats_url,
            tmp_dir / "client",
            task("sleep 100", task_id="interrupted", limits={"timeout_s": 300}),
        ).returncode
        == 0
    )
    wait_until(lambda: len(_managed(docker_client)) == 1, what="the task to run")

    d.signal(signal.SIGTERM)
    time.sleep(0.5)
    d.signal(signal.SIGTERM)

    assert d.wait(30) == 0, d.log()
    assert _managed(docker_client) == []
    assert list((tmp_dir / "data" / "workspaces").glob("*")) == []
    assert (
        asyncio.run(stream_events(nats_url, "sup.task.*.*.interrupted"))[-1].__class__.__name__
        == "TaskSubmitted"
    )


def _kill_mid_task_and_replace(
    daemons: list[DaemonProc],
    tmp_dir: Path,
    nats_url: str,
    docker_client,  # type: ignore[no-untyped-def]
    spec: dict[str, Any],
    terminal: str,
) -> list[Event]:
    """Submit `spec` to a daemon, SIGKILL it once the task's container runs, start another,
    and return the events on the `terminal` subject once there are some."""
    sched = {"ack_wait_s": 2, "ack_progress_s": 0.5}
    first = _daemon(daemons, tmp_dir, nats_url, scheduling=sched)
    assert submit(nats_url, tmp_dir / "client", spec).returncode == 0
    wait_until(lambda: len(_managed(docker_client)) == 1, what="the task to run")

    first.kill()
    _daemon(daemons, tmp_dir, nats_url, scheduling=sched)
    wait_until(
        lambda: asyncio.run(stream_events(nats_url, terminal)),
        timeout=90,
        what="the task's terminal event",
    )
    return asyncio.run(stream_events(nats_url, terminal))


def test_a_daemon_killed_mid_task_is_replaced_and_the_lost_attempt_recorded(
    tmp_dir: Path, nats_url: str, daemons, docker_client
) -> None:  # type: ignore[no-untyped-def]
    spec = task(
        '[ "$SUPERVISOR_ATTEMPT" -ge 2 ] || sleep 60; echo "attempt $SUPERVISOR_ATTEMPT"',
        task_id="survivor",
        limits={"timeout_s": 120},
        retry={"max_attempts": 3, "base_delay_s": 0.1},
    )
    done = _kill_mid_task_and_replace(
        daemons, tmp_dir, nats_url, docker_client, spec, "sup.task.succeeded.*.survivor"
    )
    assert [(e.result.stdout, e.result.attempts) for e in done if isinstance(e, TaskSucceeded)] == [
        ("attempt 2\n", 2)
    ]
    lost = asyncio.run(stream_events(nats_url, "sup.error.infrastructure.*.survivor"))
    assert [(e.code, e.attempt) for e in lost if isinstance(e, ErrorRaised)] == [
        ("SUPERVISOR_LOST", 1)
    ]
    wait_until(
        lambda: _managed(docker_client) == [], timeout=30, what="the lost container to be removed"
    )


def test_a_lost_last_attempt_fails_the_task_with_one_error(
    tmp_dir: Path, nats_url: str, daemons, docker_client
) -> None:  # type: ignore[no-untyped-def]
    spec = task("sleep 60", task_id="last", limits={"timeout_s": 120}, retry={"max_attempts": 1})
    failed = _kill_mid_task_and_replace(
        daemons, tmp_dir, nats_url, docker_client, spec, "sup.task.failed.*.last"
    )
    assert [
        (e.result.error.code, e.result.attempts)
        for e in failed
        if isinstance(e, TaskFailed) and e.result.error
    ] == [("SUPERVISOR_LOST", 1)]
    # The closing of the attempt records the error; the task's failure repeats it in its
    # result only, so error counts see one lost attempt.
    errors = asyncio.run(stream_events(nats_url, "sup.error.*.*.last"))
    assert [(e.code, e.attempt) for e in errors if isinstance(e, ErrorRaised)] == [
        ("SUPERVISOR_LOST", 1)
    ]
    wait_until(
        lambda: _managed(docker_client) == [], timeout=30, what="the lost container to be removed"
    )


def test_a_task_whose_daemon_dies_on_every_delivery_ends_as_redelivery_limit(
    tmp_dir: Path, nats_url: str, daemons, docker_client
) -> None:  # type: ignore[no-untyped-def]
    sched = {"ack_wait_s": 2, "ack_progress_s": 0.5, "max_deliver": 2}
    spec = task(
        "sleep 60",
        task_id="poison",
        limits={"timeout_s": 120},
        retry={"max_attempts": 5, "base_delay_s": 0.1},
    )
    d = _daemon(daemons, tmp_dir, nats_url, scheduling=sched)
    assert submit(nats_url, tmp_dir / "client", spec).returncode == 0
    for _ in range(2):
        wait_until(lambda: len(_managed(docker_client)) >= 1, timeout=60, what="the task to run")
        d.kill()
        for cid in _managed(docker_client):  # the new daemon's reconciler may be first
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.api.remove_container(cid, force=True)
        d = _daemon(daemons, tmp_dir, nats_url, scheduling=sched)

    wait_until(
        lambda: asyncio.run(stream_events(nats_url, "sup.task.failed.*.poison")),
        timeout=60,
        what="the poison verdict",
    )

    failed = asyncio.run(stream_events(nats_url, "sup.task.failed.*.poison"))
    assert [
        e.result.error.code for e in failed if isinstance(e, TaskFailed) and e.result.error
    ] == ["REDELIVERY_LIMIT"]
    errors = asyncio.run(stream_events(nats_url, "sup.error.infrastructure.*.poison"))
    assert [(e.code, e.attempt) for e in errors if isinstance(e, ErrorRaised)] == [
        ("SUPERVISOR_LOST", 1),
        ("SUPERVISOR_LOST", 2),
        ("REDELIVERY_LIMIT", 0),  # the task's own: attempt 2 had been closed
    ]


def test_a_poison_message_on_the_queue_is_recorded_and_work_goes_on(
    tmp_dir: Path, nats_url: str, daemons
) -> None:  # type: ignore[no-untyped-def]
    _daemon(daemons, tmp_dir, nats_url)

    async def publish_garbage() -> None:
        import nats

        nc = await nats.connect(nats_url)
        await nc.jetstream().publish("suptask.normal", b"{not a spec")
        await nc.close()

    asyncio.run(publish_garbage())
    proc = submit(nats_url, tmp_dir / "client", task("echo after"), "--wait", "--json")

    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["stdout"] == "after\n"
    errors = asyncio.run(stream_events(nats_url, "sup.error.validation.>"))
    assert [
        (e.code, e.task_id, e.details["priority"]) for e in errors if isinstance(e, ErrorRaised)
    ] == [("INVALID_SPEC", "_", "normal")]


def test_a_task_from_a_newer_node_is_handed_back_and_never_run_without_its_fields(
    tmp_dir: Path, nats_url: str, daemons
) -> None:  # type: ignore[no-untyped-def]
    """A spec on the queue with a field this node does not know (a newer node's intake
    took it) is a task, not garbage: handed back for a node that knows the field, and,
    when none takes it, ended once at its last delivery without a container."""
    d = _daemon(daemons, tmp_dir, nats_url, scheduling={"max_deliver": 1})
    spec = {**task("echo never", task_id="t-newer"), "added_in_v2": {"x": 1}}

    async def publish() -> None:
        import nats

        nc = await nats.connect(nats_url)
        await nc.jetstream().publish("suptask.normal", json.dumps(spec).encode())
        await nc.close()

    asyncio.run(publish())
    wait_until(
        lambda: asyncio.run(stream_events(nats_url, "sup.task.*.*.t-newer")),
        timeout=60,
        what="the task's end",
    )

    events = asyncio.run(stream_events(nats_url, "sup.*.*.*.t-newer"))
    assert [(type(e).__name__, getattr(e, "code", None)) for e in events] == [
        ("ErrorRaised", "REDELIVERY_LIMIT"),
        ("TaskFailed", None),
    ]
    assert "fields this node does not know (added_in_v2)" in d.log()
    (error,) = [e for e in events if isinstance(e, ErrorRaised)]
    assert error.details["unknown_fields"] == ["added_in_v2"]
    assert "no node that knows its spec's fields (added_in_v2) took it" in error.message
    assert "undecodable task message" not in d.log()


def test_a_task_id_submitted_twice_is_one_task_and_another_spec_under_it_is_refused(
    tmp_dir: Path, nats_url: str, daemons
) -> None:  # type: ignore[no-untyped-def]
    d = _daemon(daemons, tmp_dir, nats_url)
    spec = task("echo once", task_id="t-dup")

    first = submit(nats_url, tmp_dir / "client", spec, "--wait", "--json")
    again = submit(nats_url, tmp_dir / "client", spec, "--wait", "--json")
    status, body = d.request("POST", "/v1/tasks", json.dumps(spec).encode())
    other = submit(nats_url, tmp_dir / "client", task("echo other", task_id="t-dup"), "--json")
    http_status, http_body = d.request(
        "POST", "/v1/tasks", json.dumps(task("echo other", task_id="t-dup")).encode()
    )

    assert (first.returncode, again.returncode) == (0, 0), again.stderr
    assert json.loads(first.stdout) == json.loads(again.stdout)  # the same Result
    assert (status, json.loads(body)["status"]) == (200, "known")
    assert other.returncode == 2
    refused = json.loads(other.stdout)
    assert (refused["status"], refused["error"]["code"]) == ("rejected", "DUPLICATE_TASK_ID")
    assert (http_status, json.loads(http_body)["error"]["code"]) == (409, "DUPLICATE_TASK_ID")

    def dups_in_log() -> int:
        found = asyncio.run(stream_events(nats_url, "sup.error.*.*.t-dup"))
        return sum(isinstance(e, ErrorRaised) and e.code == "DUPLICATE_TASK_ID" for e in found)

    # The daemon records its refusal through its outbox: in the log soon after the 409,
    # not necessarily before it (the CLI's own, above, is durable before it exits).
    wait_until(lambda: dups_in_log() >= 2, timeout=30, what="the daemon's refusal in the log")
    events = asyncio.run(stream_events(nats_url, "sup.*.*.*.t-dup"))
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("TaskSubmitted") == 1
    assert kinds.count("AttemptStarted") == 1
    assert kinds.count("TaskSucceeded") == 1 and kinds.count("TaskRejected") == 0
    dups = [e for e in events if isinstance(e, ErrorRaised) and e.code == "DUPLICATE_TASK_ID"]
    assert len(dups) == 2
    # The daemon's own intake counted its refusal.
    _, metrics = d.get("/metrics")
    assert (
        'supervisor_errors_total{code="DUPLICATE_TASK_ID",type="validation"} 1.0'
        in metrics.decode()
    )


def test_intake_refusals_are_counted_in_the_metrics(tmp_dir: Path, nats_url: str, daemons) -> None:  # type: ignore[no-untyped-def]
    d = _daemon(daemons, tmp_dir, nats_url)
    for doc in (task("true", privileged=True), task("true", env={"SUPERVISOR_X": "1"})):
        status, _ = d.request("POST", "/v1/tasks", json.dumps(doc).encode())
        assert status in (400, 403)

    _, body = d.get("/metrics")
    text = body.decode()
    assert 'supervisor_errors_total{code="POLICY_VIOLATION",type="security"} 1.0' in text
    assert 'supervisor_errors_total{code="INVALID_SPEC",type="validation"} 1.0' in text
    assert 'supervisor_tasks_total{outcome="rejected"} 2.0' in text
