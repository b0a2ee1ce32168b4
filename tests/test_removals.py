"""Tasks waiting for a slot come first: a finished attempt's removal waits for them
(`RemovalGate`, `[scheduling] removal_wait_s`), and the warm pool parks nothing meanwhile.
The gate's rules on their own, then real daemons: a burst's removals follow its tasks, each
recorded once; one killed with SIGKILL while they wait, whose successor removes what it
left; a pool that refills only once the queue is drained."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest

from projections.audit import audit_records, records_of
from schemas import (
    AttemptStarted,
    CleanupSucceeded,
    ContainerCreated,
    Event,
    PoolAdopted,
    PoolParked,
    ReconcileDecision,
    TaskSpec,
    TaskSucceeded,
)
from schemas.config import Config
from schemas.events import TERMINAL_TASK_EVENTS
from supervisor.execution.removals import RemovalGate
from testing.daemon import SANDBOX_IMAGE, DaemonProc, node_containers, task, wait_until
from testing.reconcile import new_node_id
from testing.stream import stream_events

# --- the gate's rules (pure asyncio) ---------------------------------------------------------


class _Node:
    """What the daemon tells the gate: tasks waiting for a slot, tasks running, disk."""

    def __init__(self) -> None:
        self.waiting = True
        self.running = True
        self.disk_low = False


def _gate(node: _Node, **kw: Any) -> RemovalGate:
    kw = {"max_wait_s": 30.0, "max_waiting": 10, "poll_s": 0.01} | kw
    return RemovalGate(
        busy=lambda: node.waiting,
        active=lambda: node.running,
        low_disk=lambda: node.disk_low,
        **kw,
    )


async def _turns(gate: RemovalGate, n: int) -> tuple[list[asyncio.Task[None]], list[int]]:
    done: list[int] = []

    async def one(i: int) -> None:
        await gate.turn()
        done.append(i)

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    await asyncio.sleep(0.05)
    return tasks, done


def test_removals_wait_while_tasks_wait_and_go_together_once_none_runs() -> None:
    async def main() -> None:
        node = _Node()
        gate = _gate(node)
        tasks, done = await _turns(gate, 3)
        assert done == [] and gate.waiting == 3
        node.waiting = False  # the queue is drained, the last tasks still run
        await asyncio.sleep(0.05)
        assert done == [] and gate.waiting == 3
        late, done_late = await _turns(gate, 1)  # the burst's tail: it waits with them
        assert done_late == [] and gate.waiting == 4
        node.running = False
        await asyncio.gather(*tasks, *late)
        assert done == [0, 1, 2] and gate.waiting == 0

    asyncio.run(main())


def test_under_steady_load_after_a_burst_a_new_removal_goes_at_once() -> None:
    async def main() -> None:
        node = _Node()
        gate = _gate(node, tail_s=0.1)
        tasks, done = await _turns(gate, 2)
        node.waiting = False  # the burst is over; tasks keep coming and running
        await asyncio.sleep(0.15)
        late, done_late = await _turns(gate, 1)
        assert done_late == [0] and done == [] and gate.waiting == 2
        await gate.close()
        await asyncio.gather(*tasks, *late)

    asyncio.run(main())


@pytest.mark.parametrize(
    "case", ["no task waits", "max_wait_s 0", "max_waiting 0", "the disk brake on"]
)
def test_a_removal_goes_at_once_when_no_task_waits_when_off_or_while_the_disk_is_short(
    case: str,
) -> None:
    async def main() -> None:
        node = _Node()  # tasks run (and, but in the first case, others wait for a slot)
        node.waiting = case != "no task waits"
        node.disk_low = case == "the disk brake on"
        setting, _, value = case.partition(" ")
        kw = {setting: float(value)} if case.startswith("max_") else {}
        tasks, done = await _turns(_gate(node, **kw), 2)
        assert done == [0, 1]
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_the_oldest_goes_past_the_count_bound_and_each_past_the_time_bound() -> None:
    async def main() -> None:
        node = _Node()
        gate = _gate(node, max_waiting=2)
        tasks, done = await _turns(gate, 4)
        assert done == [0, 1] and gate.waiting == 2  # the two oldest went
        await gate.close()
        await asyncio.gather(*tasks)

        gate = _gate(node, max_wait_s=0.2)
        t0 = time.monotonic()
        tasks, done = await _turns(gate, 2)
        assert done == []
        await asyncio.gather(*tasks)
        assert done == [0, 1] and 0.15 < time.monotonic() - t0 < 2.0

    asyncio.run(main())


def test_shutdown_lets_every_waiting_removal_go_and_none_wait_afterwards() -> None:
    async def main() -> None:
        node = _Node()
        gate = _gate(node)
        tasks, done = await _turns(gate, 2)
        assert done == []
        await gate.close()
        await asyncio.gather(*tasks)
        late, done_late = await _turns(gate, 1)
        assert done == [0, 1] and done_late == [0]
        await asyncio.gather(*late)

    asyncio.run(main())


def test_the_daemon_keeps_the_wait_under_half_the_reconciler_s_grace() -> None:
    from supervisor.observability.metrics import Metrics

    cfg = msgspec.convert(
        {"scheduling": {"removal_wait_s": 60}, "reconcile": {"creation_grace_s": 30}}, Config
    )
    gate = RemovalGate.configured(cfg, Metrics())
    assert gate.max_wait_s == 15.0  # the reconciler spares an exited container 30 s


# --- a real daemon -----------------------------------------------------------------------------


def _node_events(url: str, node_id: str) -> list[Event]:
    return asyncio.run(stream_events(url, f"sup.*.*.{node_id}.>"))


def _exited(docker_client: Any, node_id: str) -> set[str]:
    return node_containers(docker_client, node_id, status="exited")


def _created(events: list[Event]) -> dict[str, str]:
    return {e.task_id: e.container_id for e in events if isinstance(e, ContainerCreated)}


@pytest.mark.docker
@pytest.mark.nats
def test_a_burst_s_removals_follow_its_tasks_each_recorded_once(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc], docker_client: Any
) -> None:
    node_id = new_node_id()
    config = {"node_id": node_id, "scheduling": {"concurrency": 1}, "pool": {"size": 0}}
    daemon = DaemonProc(tmp_dir / "data", nats_url, config).start()
    daemons.append(daemon)
    ids = [f"burst-{i}" for i in range(4)]
    specs = [
        msgspec.convert(task(f"echo {i}; sleep 0.3", task_id=t), TaskSpec)
        for i, t in enumerate(ids)
    ]
    with daemon.client() as c:
        subs = c.submit_many(specs)
        assert [getattr(s, "status", s) for s in subs] == ["queued"] * 4
        first = c.wait(ids[0], timeout_s=60)
        assert first.result is not None and first.result.status == "succeeded"
        # Its result is answered; its container waits for the three tasks behind it.
        kept = _created(_node_events(nats_url, node_id))[ids[0]]
        assert kept in _exited(docker_client, node_id)
        for t in ids[1:]:
            assert c.wait(t, timeout_s=60).result is not None
    wait_until(lambda: not _exited(docker_client, node_id), 20, "the removals after the burst")

    events = _node_events(nats_url, node_id)
    ends = Counter(e.task_id for e in events if isinstance(e, TERMINAL_TASK_EVENTS))
    assert ends == Counter({t: 1 for t in ids})
    assert sorted(e.task_id for e in events if isinstance(e, TaskSucceeded)) == ids
    containers = _created(events)
    removed = Counter(
        e.resource
        for e in events
        if isinstance(e, CleanupSucceeded) and e.step == "remove_container"
    )
    assert removed == Counter({containers[t]: 1 for t in ids})
    # Every removal came after the last task's end: none took the engine from a task.
    last_end = max(i for i, e in enumerate(events) if isinstance(e, TERMINAL_TASK_EVENTS))
    removals = [
        i
        for i, e in enumerate(events)
        if isinstance(e, CleanupSucceeded) and e.step == "remove_container"
    ]
    assert min(removals) > last_end
    assert [e for e in events if isinstance(e, ReconcileDecision)] == []  # none needed
    assert audit_records(records_of(events)) == []
    _, body = daemon.get("/metrics")
    assert "supervisor_removals_deferred_total 4.0" in body.decode()
    assert "supervisor_removals_waiting 0.0" in body.decode()
    daemon.stop()
    assert daemon.wait() == 0


@pytest.mark.docker
@pytest.mark.nats
def test_a_daemon_killed_while_removals_wait_leaves_nothing_once_it_is_back(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc], docker_client: Any
) -> None:
    node_id = new_node_id()
    config = {
        "node_id": node_id,
        # No redelivery within the test: only the successor's reconciler cleans up.
        "scheduling": {"concurrency": 1, "ack_wait_s": 300, "ack_progress_s": 1},
        "pool": {"size": 0},
    }
    data = tmp_dir / "data"
    first = DaemonProc(data, nats_url, config).start()
    daemons.append(first)
    specs = [
        task("echo done", task_id="killed-0"),
        task("sleep 300", task_id="killed-1", limits={"timeout_s": 600}),
        task("echo later", task_id="killed-2"),
    ]
    try:
        with first.client() as c:
            subs = c.submit_many([msgspec.convert(s, TaskSpec) for s in specs])
            assert [getattr(s, "status", s) for s in subs] == ["queued"] * 3
            assert c.wait("killed-0", timeout_s=60).result is not None
        wait_until(lambda: "killed-1" in _created(_node_events(nats_url, node_id)), 60, "killed-1")
        created = _created(_node_events(nats_url, node_id))
        left = {created["killed-0"], created["killed-1"]}
        assert created["killed-0"] in _exited(docker_client, node_id)  # waiting for killed-2
        first.kill()

        second = DaemonProc(data, nats_url, config)
        daemons.append(second)
        second.start()
        wait_until(
            lambda: not left & node_containers(docker_client, node_id),
            60,
            "the dead instance's containers to go",
        )
        events = _node_events(nats_url, node_id)
        decided = {(e.rule, e.resource) for e in events if isinstance(e, ReconcileDecision)}
        assert {("orphan_container", cid) for cid in left} <= decided
        ends = Counter(e.task_id for e in events if isinstance(e, TERMINAL_TASK_EVENTS))
        assert ends["killed-0"] == 1
        second.stop()
        assert second.wait() == 0
    finally:
        for cid in node_containers(docker_client, node_id):
            docker_client.api.remove_container(cid, force=True)


@pytest.mark.docker
@pytest.mark.nats
def test_the_pool_parks_nothing_while_tasks_wait_and_refills_after(
    tmp_dir: Path, nats_url: str, daemons: list[DaemonProc]
) -> None:
    node_id = new_node_id()
    config = {
        "node_id": node_id,
        "scheduling": {"concurrency": 1},
        "pool": {"size": 2, "shapes": [{"image": SANDBOX_IMAGE}]},
    }
    daemon = DaemonProc(tmp_dir / "data", nats_url, config).start()
    daemons.append(daemon)

    def parked() -> int:
        events = _node_events(nats_url, node_id)
        return sum(isinstance(e, PoolParked) for e in events)

    wait_until(lambda: parked() == 2, 60, "2 parked containers")
    ids = [f"wait-{i}" for i in range(5)]
    specs = [msgspec.convert(task("sleep 0.3", task_id=t), TaskSpec) for t in ids]
    with daemon.client() as c:
        c.submit_many(specs)
        for t in ids:
            assert c.wait(t, timeout_s=60).result is not None
    wait_until(lambda: parked() == 4, 60, "the pool to refill after the burst")

    events = _node_events(nats_url, node_id)
    started = {e.task_id: i for i, e in enumerate(events) if isinstance(e, AttemptStarted)}
    parks = [i for i, e in enumerate(events) if isinstance(e, PoolParked)]
    adopted = [e.task_id for e in events if isinstance(e, PoolAdopted)]
    assert adopted[:2] == ids[:2]  # the two parked before the burst
    # While wait-3 and wait-4 waited for the slot, nothing was parked: the two parks after
    # the first two came once the queue was drained (after wait-3 started, at least).
    assert all(i < started[ids[0]] or i > started[ids[3]] for i in parks), (parks, started)
    daemon.stop()
    assert daemon.wait() == 0
