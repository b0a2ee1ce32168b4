"""The reconciler in a real daemon process: killed with SIGKILL while 5 long tasks run, then
started again, the daemon removes every container and workspace the dead one left, within
the heartbeat timeout plus one interval, each removal explained by a decision event. The
daemon is `supervisor serve`, as users start it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from schemas import ReconcileDecision
from tests.daemonutil import DaemonProc, submit, task
from tests.reconcileutil import new_node_id
from tests.streamutil import stream_events

pytestmark = [pytest.mark.docker, pytest.mark.nats]


@pytest.fixture
def daemons() -> Iterator[list[DaemonProc]]:
    started: list[DaemonProc] = []
    yield started
    for d in started:
        d.stop()


def _containers(docker_client, node_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    flt = {"label": ["supervisor.managed=true", f"supervisor.node={node_id}"]}
    return [c["Id"] for c in docker_client.api.containers(all=True, filters=flt)]


def _wait(cond, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_daemon_killed_mid_task_leaves_nothing_once_it_is_back(
    tmp_dir: Path, nats_url: str, daemons, docker_client
) -> None:  # type: ignore[no-untyped-def]
    node_id = new_node_id()
    interval, timeout = 1.0, 3.0
    config = {
        "node_id": node_id,
        "reconcile": {"interval_s": interval, "heartbeat_s": 0.5, "heartbeat_timeout_s": timeout},
        # No redelivery within the test: only the reconciler can clean up.
        "scheduling": {"ack_wait_s": 300, "ack_progress_s": 1, "concurrency": 8},
    }
    data = tmp_dir / "data"
    try:
        first = DaemonProc(data, nats_url, config).start()
        daemons.append(first)
        for i in range(5):
            spec = task("sleep 300", task_id=f"long-{i}", limits={"timeout_s": 600},
                        retry={"max_attempts": 1})  # fmt: skip
            assert submit(nats_url, tmp_dir / "client", spec).returncode == 0
        _wait(lambda: len(_containers(docker_client, node_id)) == 5, 90, "5 running tasks")
        left = _containers(docker_client, node_id)
        workspaces = sorted(str(p) for p in (data / "workspaces").iterdir())

        first.kill()
        second = DaemonProc(data, nats_url, config)
        daemons.append(second)
        t0 = time.monotonic()
        second.start()
        assert len(_containers(docker_client, node_id)) == 5  # nothing cleaned them meanwhile
        _wait(lambda: not _containers(docker_client, node_id)
              and not any((data / "workspaces").iterdir()), 60, "the leftovers to go")  # fmt: skip
        took = time.monotonic() - t0

        events = asyncio.run(stream_events(nats_url, f"sup.reconcile.decision.{node_id}._"))
        decided = {(e.rule, e.resource) for e in events if isinstance(e, ReconcileDecision)}
        assert decided == {("orphan_container", c) for c in left} | {
            ("leaked_workspace", w) for w in workspaces
        }
        # start-up + heartbeat timeout + one interval, and room for a busy host to do 10
        # removals: it took `took` s from the restart (start-up included).
        assert took < timeout + interval + 15, took
        second.stop()
        assert second.wait() == 0
    finally:
        for cid in _containers(docker_client, node_id):
            docker_client.api.remove_container(cid, force=True)
