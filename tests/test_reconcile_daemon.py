"""The reconciler in a real daemon process: killed with SIGKILL while 5 long tasks run, then
started again on the same data dir, the daemon removes every container and workspace the
dead one left (its warm pool's parked containers included) at once (it took the data dir's lock, so the dead instance is superseded:
no waiting for its heartbeat timeout), each removal explained by a decision event whose
evidence is the `supervisor.superseded` event. The daemon is `supervisor serve`, as users
start it, on the default reconcile settings."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from schemas import ContainerCreated, PoolParked, ReconcileDecision, SupervisorSuperseded
from schemas.config import Config
from schemas.streams import TASKS_STREAM
from testing.daemon import SANDBOX_IMAGE, DaemonProc, node_containers, submit, task
from testing.reconcile import new_node_id
from testing.stream import stream_events

pytestmark = [pytest.mark.docker, pytest.mark.nats]


def _wait(cond, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("runtime", ["runc", "runsc"])
def test_a_daemon_killed_mid_task_leaves_nothing_once_it_is_back(
    tmp_dir: Path, nats_url: str, daemons, docker_client, runtime: str
) -> None:  # type: ignore[no-untyped-def]
    """Under runc and under gVisor alike: the reconciler works from labels and the log."""
    node_id = new_node_id()
    config = {
        "node_id": node_id,
        "sandbox": {"runtime": runtime},
        # No redelivery within the test: only the reconciler can clean up.
        "scheduling": {"ack_wait_s": 300, "ack_progress_s": 1, "concurrency": 8},
        # Two containers parked for the tasks' shape: the dead instance's are leftovers too.
        "pool": {"size": 2, "shapes": [{"image": SANDBOX_IMAGE}]},
    }
    heartbeat_timeout = Config().reconcile.heartbeat_timeout_s
    data = tmp_dir / "data"
    try:
        first = DaemonProc(data, nats_url, config).start()
        daemons.append(first)
        for i in range(5):
            spec = task(
                "sleep 300",
                task_id=f"long-{i}",
                limits={"timeout_s": 600},
                retry={"max_attempts": 1},
            )
            assert submit(nats_url, tmp_dir / "client", spec).returncode == 0

        def settled() -> bool:
            """5 tasks run and 2 containers are parked, each one in the log (an adopted
            container keeps the pool's label: whose it is, the log says). A daemon killed
            while it parks one leaves a workspace the log does not know yet: that one goes
            only after `creation_grace_s` (docs/running.md)."""
            seen = node_containers(docker_client, node_id)
            events = asyncio.run(stream_events(nats_url, f"sup.*.*.{node_id}.>"))
            ran = {e.container_id for e in events if isinstance(e, ContainerCreated)}
            parked = {e.container_id for e in events if isinstance(e, PoolParked)} - ran
            return (
                len(seen) == 7
                and len(seen & ran) == 5
                and len(seen & parked) == 2
                and len(list((data / "workspaces").iterdir())) == 7
            )

        _wait(settled, 90, "5 running tasks and 2 parked containers")
        left = node_containers(docker_client, node_id)
        workspaces = sorted(str(p) for p in (data / "workspaces").iterdir())

        first.kill()
        second = DaemonProc(data, nats_url, config)
        daemons.append(second)
        t0 = time.monotonic()
        second.start()
        # (The successor parks containers of its own meanwhile.)
        _wait(
            lambda: (
                not left & node_containers(docker_client, node_id)
                and not set(workspaces) & {str(p) for p in (data / "workspaces").iterdir()}
            ),
            60,
            "the leftovers to go",
        )
        took = time.monotonic() - t0

        events = asyncio.run(stream_events(nats_url, f"sup.*.*.{node_id}._"))
        superseded = [e for e in events if isinstance(e, SupervisorSuperseded)]
        assert len(superseded) == 1
        assert superseded[0].instance_id != superseded[0].superseded_instance
        decisions = [e for e in events if isinstance(e, ReconcileDecision)]
        decided = {(e.rule, e.resource) for e in decisions}
        assert decided == {("orphan_container", c) for c in left} | {
            ("leaked_workspace", w) for w in workspaces
        }
        # Without the superseded instance as evidence, nothing could go before the dead
        # instance's heartbeat timeout.
        assert took < heartbeat_timeout, took
        second.stop()
        assert second.wait() == 0
    finally:
        for cid in node_containers(docker_client, node_id):
            docker_client.api.remove_container(cid, force=True)


def test_a_second_daemon_on_a_data_dir_in_use_exits_2_and_touches_nothing(
    tmp_dir: Path, nats_url: str, daemons
) -> None:  # type: ignore[no-untyped-def]
    data = tmp_dir / "data"
    first = DaemonProc(data, nats_url, {"scheduling": {"queue_bound_per_priority": 3}}).start()
    daemons.append(first)
    url_before = (data / "nats.url").read_text()

    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor",
            "serve",
            "--nats",
            nats_url,
            "--data-dir",
            str(data),
            "--http",
            "not-an-address",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )

    assert second.returncode == 2
    assert second.stderr.decode().strip() == (
        f"supervisor: data dir {data.resolve()} is in use by pid {first.proc.pid}"  # type: ignore[union-attr]
    )
    assert (data / "nats.url").read_text() == url_before
    bound = asyncio.run(_tasks_bound(nats_url))
    assert bound == 3
    status, _ = first.get("/readyz")
    assert status == 200


async def _tasks_bound(url: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info(TASKS_STREAM)
        return int(info.config.max_msgs_per_subject or 0)
    finally:
        await nc.close()
