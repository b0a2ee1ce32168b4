"""The execution path against a real dockerd and a real nats-server: every catalogue code
this issue can produce is caused for real, and every step is read back from JetStream."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from schemas import (
    CleanupCommand,
    ContainerCreated,
    ErrorRaised,
    Evidence,
    KillIssued,
    Limits,
    Result,
    RetryPolicy,
    RetryScheduled,
    TaskSpec,
    event_type,
)
from schemas.config import Config
from schemas.errors import DockerRequestRefused
from supervisor.daemon.node import Node, open_node
from supervisor.docker.runtime import ContainerRequest
from supervisor.eventlog.emitter import utcnow
from supervisor.execution import attempt as attempt_module
from supervisor.policy.breaker import counts
from supervisor.policy.classify import classify
from supervisor.reconcile.command_executor import CommandExecutor
from testing.daemon import FORKS_REFUSED
from testing.stream import stream_events, stream_messages
from tests.conftest import SANDBOX_IMAGE

pytestmark = pytest.mark.usefixtures("docker_client")


def _spec(script: str, *, retry: RetryPolicy | None = None, **limits: object) -> TaskSpec:
    return TaskSpec(
        image=SANDBOX_IMAGE,
        command=["sh", "/workspace/main.sh"],
        files={"main.sh": script},
        limits=Limits(**limits),  # type: ignore[arg-type]
        retry=retry or RetryPolicy(max_attempts=1),
    )


@pytest.fixture
async def node(tmp_dir: Path, nats_url: str) -> AsyncIterator[Node]:
    cfg = Config(data_dir=str(tmp_dir / "data"), node_id="n1")
    async with open_node(cfg, nats_url=nats_url) as n:
        yield n
    # Whatever the test did, every event the executor emitted followed the state machine.
    violations = n.metrics.registry.get_sample_value
    assert [
        violations("supervisor_lifecycle_violations_total", {"machine": m}) or 0.0
        for m in ("task", "container")
    ] == [0.0, 0.0]


async def _run(node: Node, spec: TaskSpec) -> Result:
    result = await node.executor.run(spec)
    await node.executor.attempts.drain()  # the removals that follow the outcome
    assert await node.events.flush(10)
    return result


def _workspaces(node: Node) -> list[Path]:
    return list((node.data_dir / "workspaces").glob("*"))


async def test_success_with_output_publishes_every_step(
    node: Node, nats_url: str, docker_client
) -> None:
    result = await _run(node, _spec("echo hello; echo oops >&2"))

    assert (result.status, result.exit_code, result.attempts) == ("succeeded", 0, 1)
    assert (result.stdout, result.stderr) == ("hello\n", "oops\n")
    assert result.error is None
    msgs = await stream_messages(nats_url, f"sup.*.*.n1.{result.task_id}")
    assert [event_type(e) for *_, e in msgs] == [
        "task.submitted",
        "attempt.started",
        "workspace.created",
        "container.created",
        "container.started",
        "container.exited",
        "attempt.finished",
        "task.succeeded",
        # A container that exited on its own is removed after the outcome is recorded.
        "cleanup.succeeded",
        "cleanup.succeeded",
    ]
    assert all(h["Nats-Msg-Id"] == e.event_id for _, _, h, e in msgs)
    assert all(subj == e.subject() for _, subj, _, e in msgs)
    assert len({e.correlation_id for *_, e in msgs}) == 1
    created = next(e for *_, e in msgs if isinstance(e, ContainerCreated))
    assert created.labels["supervisor.managed"] == "true"
    assert created.labels["supervisor.task"] == result.task_id
    assert docker_client.containers.list(all=True, filters={"id": created.container_id}) == []
    assert _workspaces(node) == []


async def test_a_tasks_docker_calls_reuse_kept_alive_connections(node: Node) -> None:
    """docker-py's Unix-socket adapter makes a pool, hence a connection, per request URL,
    and a container's URLs are its own; the runtime keeps one pool for every call."""
    api = node.runtime.api
    adapter = api._custom_adapter
    opened = 0
    pool = adapter.get_connection("http+docker://localhost/v1.41/containers/x/start")
    new_conn = pool._new_conn

    def counting_new_conn():  # type: ignore[no-untyped-def]
        nonlocal opened
        opened += 1
        return new_conn()

    pool._new_conn = counting_new_conn
    for _ in range(3):
        result = await _run(node, _spec("echo hello"))
        assert (result.status, result.stdout) == ("succeeded", "hello\n")

    # Each task makes seven calls (create, attach, start, wait, inspect, kill, remove):
    # with a pool per URL, about six of them connected anew. The attach socket is taken
    # over for the output, so a task opens at most one connection once the pool is warm.
    assert list(adapter.pools.keys()) == [adapter.socket_path]
    assert opened <= 3 + 2, opened
    assert api.trust_env is False


async def test_the_container_is_hardened(node: Node) -> None:
    script = (
        "id -u; cat /proc/self/status | grep CapEff; touch /root-write 2>/dev/null && echo rw || echo ro;"
        " ls /sys/class/net; echo x > /workspace/w 2>/dev/null || echo ws-ro; echo t > /tmp/t && echo tmp-ok"
    )
    result = await _run(node, _spec(script))

    assert result.stdout.split("\n") == [
        "65534",
        "CapEff:\t0000000000000000",
        "ro",
        "lo",
        "ws-ro",
        "tmp-ok",
        "",
    ]


@pytest.mark.parametrize(
    ("script", "limits", "code", "etype", "exit_code"),
    [
        ("exit 3", {}, "NONZERO_EXIT", "user_code", 3),
        ("kill -SEGV $$", {}, "SIGNALED", "user_code", 139),
        ("x=a; while true; do x=$x$x; done", {"memory_mb": 16}, "OOM_KILLED", "resource", 137),
        ("sleep 30", {"timeout_s": 1}, "EXECUTION_TIMEOUT", "timeout", 137),
        (
            "while true; do echo flood; done",
            {"output_bytes": 1000},
            "OUTPUT_LIMIT",
            "resource",
            137,
        ),
        (FORKS_REFUSED, {"pids": 8}, "PIDS_LIMIT", "resource", 2),
    ],
)
async def test_each_failure_is_classified_from_evidence(
    node: Node,
    nats_url: str,
    script: str,
    limits: dict[str, Any],
    code: str,
    etype: str,
    exit_code: int,
) -> None:
    result = await _run(node, _spec(script, **limits))

    assert result.status == "failed"
    assert result.error is not None
    assert (result.error.type, result.error.code, result.exit_code) == (etype, code, exit_code)
    errors = await stream_events(nats_url, f"sup.error.{etype}.n1.{result.task_id}")
    assert [(e.code, e.retryable) for e in errors] == [(code, result.error.retryable)]  # type: ignore[attr-defined]
    assert _workspaces(node) == []


async def test_signal_details_name_the_signal(node: Node) -> None:
    result = await _run(node, _spec("kill -SEGV $$"))

    assert result.error is not None and result.error.details["signal"] == "SIGSEGV"


async def test_output_flood_keeps_exactly_the_cap_and_marks_truncation(node: Node) -> None:
    result = await _run(node, _spec("while true; do echo 0123456789; done", output_bytes=1000))

    assert len(result.stdout.encode()) == 1000
    assert (result.stdout_truncated, result.stderr_truncated) == (True, False)


async def test_a_timeout_records_the_supervisors_own_kill(node: Node, nats_url: str) -> None:
    result = await _run(node, _spec("sleep 30", timeout_s=1))

    kills = await stream_events(nats_url, f"sup.container.kill_issued.n1.{result.task_id}")
    assert [k.reason for k in kills] == ["timeout"]  # type: ignore[attr-defined]


async def test_a_missing_image_is_rejected(node: Node, nats_url: str) -> None:
    spec = TaskSpec(image="supervisor-sandbox:does-not-exist", command=["true"])

    result = await _run(node, spec)

    assert (result.status, result.attempts) == ("rejected", 0)
    assert result.error is not None
    assert (result.error.type, result.error.code, result.error.retryable) == (
        "validation",
        "IMAGE_NOT_FOUND",
        False,
    )
    events = await stream_events(nats_url, f"sup.*.*.n1.{result.task_id}")
    assert [event_type(e) for e in events] == ["task.submitted", "error.raised", "task.rejected"]


@pytest.mark.parametrize(
    "request_fields",
    [
        {"privileged": True},
        {"cap_add": ["SYS_ADMIN"]},
        {"network": "host"},
        {"network": "bridge"},
        {"mounts": [{"source": "/", "target": "/host"}]},
    ],
)
async def test_each_forbidden_security_request_is_refused(
    node: Node, request_fields: dict[str, object], docker_client
) -> None:
    spec = TaskSpec(image=SANDBOX_IMAGE, command=["true"], **request_fields)  # type: ignore[arg-type]

    result = await _run(node, spec)

    assert result.status == "rejected"
    assert result.error is not None
    assert (result.error.type, result.error.code) == ("security", "POLICY_VIOLATION")
    assert (
        docker_client.containers.list(
            all=True, filters={"label": f"supervisor.task={result.task_id}"}
        )
        == []
    )


async def _wait_running(docker_client, node: Node) -> str:  # type: ignore[no-untyped-def]
    for _ in range(200):
        found = docker_client.containers.list(
            filters={"label": ["supervisor.managed=true", "supervisor.node=n1"]}
        )
        if found:
            return str(found[0].id)
        await asyncio.sleep(0.05)
    raise AssertionError("the task's container never ran")


async def test_a_container_killed_from_outside_is_killed_externally(
    node: Node, docker_client
) -> None:
    task = asyncio.ensure_future(_run(node, _spec("sleep 30", timeout_s=20)))
    cid = await _wait_running(docker_client, node)

    await asyncio.to_thread(docker_client.api.kill, cid)
    result = await task

    assert result.error is not None
    assert (result.error.type, result.error.code, result.error.retryable) == (
        "infrastructure",
        "KILLED_EXTERNALLY",
        True,
    )
    assert result.error.details == {"signals": ["SIGKILL"]}


async def test_a_container_removed_from_outside_has_vanished(node: Node, docker_client) -> None:
    task = asyncio.ensure_future(_run(node, _spec("sleep 30", timeout_s=20)))
    cid = await _wait_running(docker_client, node)

    await asyncio.to_thread(docker_client.api.remove_container, cid, force=True)
    result = await task

    assert result.error is not None
    assert (result.error.type, result.error.code, result.error.retryable) == (
        "infrastructure",
        "CONTAINER_VANISHED",
        True,
    )
    assert _workspaces(node) == []


async def test_two_removals_at_once_both_end_with_the_container_gone(
    node: Node, docker_client
) -> None:  # type: ignore[no-untyped-def]
    """dockerd refuses a forced removal (409) while another one holds the container: the
    attempt's cleanup racing a cleanup command or a `docker rm -f` must not record a
    `cleanup.failed` that nothing resolves."""
    for _ in range(5):
        c = await asyncio.to_thread(
            docker_client.containers.run,
            SANDBOX_IMAGE,
            "sleep 60",
            detach=True,
            init=True,
            labels={"supervisor.managed": "true", "supervisor.node": "n1"},
        )

        gone = await asyncio.gather(node.runtime.remove(c.id), node.runtime.remove(c.id))

        assert sorted(gone) == [False, True]
        assert docker_client.containers.list(all=True, filters={"id": c.id}) == []


async def test_a_retryable_failure_succeeds_on_a_later_attempt(node: Node, nats_url: str) -> None:
    script = '[ "$SUPERVISOR_ATTEMPT" -ge 2 ] || sleep 30; echo "attempt $SUPERVISOR_ATTEMPT"'
    retry = RetryPolicy(max_attempts=3, base_delay_s=0.05, jitter=False)

    result = await _run(node, _spec(script, retry=retry, timeout_s=1))

    assert (result.status, result.attempts, result.stdout) == ("succeeded", 2, "attempt 2\n")
    retries = await stream_events(nats_url, f"sup.task.retry_scheduled.n1.{result.task_id}")
    assert [
        (r.attempt, r.next_attempt, r.delay_s, r.error_code)
        for r in retries
        if isinstance(r, RetryScheduled)
    ] == [(1, 2, 0.05, "EXECUTION_TIMEOUT")]


async def test_retries_give_up_after_max_attempts(node: Node, nats_url: str) -> None:
    retry = RetryPolicy(max_attempts=2, base_delay_s=0.05, jitter=False)

    result = await _run(node, _spec("sleep 30", retry=retry, timeout_s=1))

    assert (result.status, result.attempts) == ("failed", 2)
    assert result.error is not None and result.error.code == "EXECUTION_TIMEOUT"
    errors = await stream_events(nats_url, f"sup.error.timeout.n1.{result.task_id}")
    assert [e.attempt for e in errors] == [1, 2]


async def test_a_non_retryable_failure_is_not_retried(node: Node) -> None:
    result = await _run(node, _spec("exit 1", retry=RetryPolicy(max_attempts=3, base_delay_s=0.01)))

    assert (result.status, result.attempts) == ("failed", 1)


async def test_cancellation_cleans_up_and_records_the_task(
    node: Node, nats_url: str, docker_client
) -> None:
    task = asyncio.ensure_future(node.executor.run(_spec("sleep 30", timeout_s=20)))
    cid = await _wait_running(docker_client, node)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await node.events.flush(10)

    assert docker_client.containers.list(all=True, filters={"id": cid}) == []
    assert _workspaces(node) == []
    events = await stream_events(nats_url, "sup.task.failed.n1.>")
    assert [e.result.error.code for e in events] == ["CANCELLED"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("step", ["create_workspace", "create", "attach", "start"])
async def test_a_cancellation_during_a_creating_step_leaks_nothing(
    node: Node, nats_url: str, docker_client, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    # The step is held inside its call while the attempt is cancelled: what it creates
    # (a workspace, a container, an attach socket) must still be known to cleanup.
    entered, release = threading.Event(), threading.Event()
    runtime = node.executor.runtime
    if step in ("create", "attach", "start") and runtime.calls is not None:  # on the loop
        calls, real_call, real_attach = runtime.calls, runtime.calls.call, runtime.calls.attach
        ending = {"create": "/containers/create", "start": "/start"}.get(step, "-")

        async def held_call(method: str, path: str, **kw: Any) -> Any:
            if path.endswith(ending):
                entered.set()
                await asyncio.to_thread(release.wait, 10)
            return await real_call(method, path, **kw)

        async def held_attach(path: str, params: dict[str, str]) -> Any:
            entered.set()
            await asyncio.to_thread(release.wait, 10)
            return await real_attach(path, params)

        monkeypatch.setattr(calls, "call", held_call)
        if step == "attach":
            monkeypatch.setattr(calls, "attach", held_attach)
    else:
        if step == "create_workspace":
            target, name = attempt_module, "create_workspace"
        else:
            names = {"create": "create_container", "attach": "attach_socket", "start": "start"}
            target, name = runtime.api, names[step]
        real = getattr(target, name)

        def held(*args: object, **kw: object) -> object:
            entered.set()
            release.wait(10)
            return real(*args, **kw)

        monkeypatch.setattr(target, name, held)
    task = asyncio.ensure_future(node.executor.run(_spec("sleep 30", timeout_s=20)))
    assert await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await node.events.flush(10)
    gc.collect()  # an attach socket dropped unclosed would warn here, failing the test

    events = await stream_events(nats_url, "sup.task.failed.n1.>")
    assert [e.result.error.code for e in events] == ["CANCELLED"]  # type: ignore[attr-defined]
    filters = {"label": f"supervisor.task={events[0].task_id}"}
    assert docker_client.containers.list(all=True, filters=filters) == []
    assert _workspaces(node) == []
    history = await stream_events(nats_url, "sup.*.*.n1.>")
    created = [e.container_id for e in history if isinstance(e, ContainerCreated)]
    removed = [
        e.resource  # type: ignore[attr-defined]
        for e in history
        if event_type(e) == "cleanup.succeeded" and e.step == "remove_container"  # type: ignore[attr-defined]
    ]
    assert created == removed
    assert len(created) == (0 if step == "create_workspace" else 1)
    # A container that did start is recorded as started, then killed as cancelled.
    started = [e for e in history if event_type(e) == "container.started"]
    kills = [e.reason for e in history if isinstance(e, KillIssued)]
    assert (len(started), kills) == ((1, ["cancelled"]) if step == "start" else (0, []))


async def test_a_cleanup_failure_is_recorded_without_hiding_the_outcome(
    node: Node, nats_url: str
) -> None:
    ws_root = node.data_dir / "workspaces"
    script = "echo done"
    task = asyncio.ensure_future(_run(node, _spec(script + "; sleep 1")))
    for _ in range(200):
        dirs = list(ws_root.glob("*"))
        if dirs:
            break
        await asyncio.sleep(0.02)
    # An immutable file cannot be unlinked, not even by root: the workspace stays behind.
    stuck = dirs[0] / "main.sh"
    rc = os.system(f"chattr +i {stuck} 2>/dev/null")
    if rc != 0:
        await task
        pytest.skip("this filesystem does not support the immutable attribute")
    try:
        result = await task
    finally:
        os.system(f"chattr -i {stuck}")
    assert result.status == "succeeded"
    failed = await stream_events(nats_url, f"sup.cleanup.failed.n1.{result.task_id}")
    assert [(f.step, f.resource) for f in failed] == [("remove_workspace", str(dirs[0]))]  # type: ignore[attr-defined]
    import shutil

    shutil.rmtree(dirs[0])


async def test_an_error_event_is_published_for_every_failed_attempt(
    node: Node, nats_url: str
) -> None:
    result = await _run(node, _spec("exit 7"))

    errors = await stream_events(nats_url, "sup.error.>")
    assert [(e.code, e.task_id) for e in errors if isinstance(e, ErrorRaised)] == [
        ("NONZERO_EXIT", result.task_id)
    ]


async def test_a_request_the_engine_refuses_is_the_specs_fault_not_the_engines(
    node: Node,
) -> None:
    """The engine answers HTTP 400 to a request it refuses (here a memory limit under its
    6 MB minimum, which admission would have caught): that is the spec's fault, an
    `INVALID_SPEC` that is not retried, never an engine failure the breaker counts."""
    request = ContainerRequest(
        image=SANDBOX_IMAGE,
        command=["true"],
        labels={"supervisor.managed": "false"},
        env={},
        workspace=str(node.data_dir),
        workspace_mount="/workspace",
        user="65534:65534",
        memory_mb=1,
        cpus=1.0,
        pids=16,
        tmpfs_size="1m",
        network="none",
        privileged=False,
        cap_add=[],
        mounts=[],
    )
    with pytest.raises(DockerRequestRefused) as refused:
        await node.runtime.create(request)
    assert refused.value.status == 400

    c = classify(Evidence(adapter_error=refused.value.tag))
    assert c is not None
    assert (c.type, c.code, c.retryable) == ("validation", "INVALID_SPEC", False)
    assert not counts(c)


def _remove_command(node: Node, cid: str, task_id: str) -> CleanupCommand:
    return CleanupCommand(
        command_id=f"cmd-{cid[:8]}",
        node_id=node.config.node_id,
        action="remove_container",
        resource_kind="container",
        resource=cid,
        rule="orphan_container",
        decision_id="d-1",
        issued_at=utcnow(),
        task_id=task_id,
        attempt=1,
    )


async def _live_container(node: Node, task: asyncio.Task[Result]) -> str:
    for _ in range(300):
        if node.executor.live:
            return next(iter(node.executor.live))
        assert not task.done(), task
        await asyncio.sleep(0.05)
    raise AssertionError("no container came up")


def _commands(node: Node) -> CommandExecutor:
    return CommandExecutor(
        js=node.events.js,
        runtime=node.runtime,
        cleaner=node.executor.cleaner,
        emitter=node.emitter,
        data_dir=node.data_dir,
        config=node.config.reconcile,
        metrics=node.metrics,
        claim_kill=node.executor.claim_kill,
    )


async def test_a_cleanup_command_never_kills_a_live_attempt_before_its_deadline(
    node: Node, docker_client
) -> None:  # type: ignore[no-untyped-def]
    assert await node.events.wait_connected(10)
    run = asyncio.ensure_future(node.executor.run(_spec("sleep 3; echo survived", timeout_s=60)))
    cid = await _live_container(node, run)

    outcome, detail = await _commands(node).execute(_remove_command(node, cid, "t"))

    assert outcome == "refused"
    assert detail.endswith("on this instance, before its deadline")
    assert docker_client.containers.get(cid).status == "running"
    result = await run
    assert (result.status, result.stdout) == ("succeeded", "survived\n")


async def test_a_cleanup_command_that_kills_a_live_attempt_is_recorded_as_its_kill(
    node: Node, nats_url: str
) -> None:
    """Past its deadline (the attempt's own timeout did not act yet), a reconciler's kill is
    the attempt's `kill_issued{reconcile}`: infrastructure, not the script's SIGKILL."""
    assert await node.events.wait_connected(10)
    run = asyncio.ensure_future(node.executor.run(_spec("sleep 60", timeout_s=60)))
    cid = await _live_container(node, run)
    node.executor.live[cid].deadline = time.time() - 1  # as if its deadline had passed

    outcome, _ = await _commands(node).execute(_remove_command(node, cid, "t"))

    assert outcome == "succeeded"
    result = await run
    assert result.error is not None
    assert (result.error.type, result.error.code) == ("infrastructure", "KILLED_EXTERNALLY")
    assert result.error.details == {"by": "reconcile"}
    assert await node.events.flush(10)
    kills = [
        e
        for e in await stream_events(nats_url, f"sup.container.kill_issued.*.{result.task_id}")
        if isinstance(e, KillIssued)
    ]
    assert [(k.reason, k.attempt) for k in kills] == [("reconcile", 1)]
