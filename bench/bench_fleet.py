"""Side by side on a real three-server JetStream cluster on loopback, started the way
`scripts/cluster up` starts one (in a temp dir, stopped and removed afterwards).

    .venv/bin/python bench/bench_fleet.py replication [--events N] [--rounds R]
    .venv/bin/python bench/bench_fleet.py recovery [--runs R]
    .venv/bin/python bench/bench_fleet.py nodes [--tasks N]
    .venv/bin/python bench/bench_fleet.py node-loss [--runs R]

* replication: N events through the outbox (`EventLog.emit` + `flush`) to `SUP_EVENTS`
  with 3 replicas, against raw `publish_async` of the same events to the same stream
  (alternating which goes first), then both again with the stream at 1 replica on the
  same servers: the ratio outbox/raw at R3 (target >= 0.8), and R3/R1, what replication
  costs each.
* recovery: events published one after another (each awaited) while the stream's leader
  is killed with SIGKILL; the time from the kill to the first event acked again
  (the cluster electing a new leader, the client reconnecting), median over R runs, each
  on a fresh cluster.
* nodes: N trivial tasks (`true`) submitted at once to one `supervisor serve` node
  (concurrency 8), then N more with a second node beside it on this host's one Docker
  engine: tasks/s from the first submission to the last terminal event, and two/one.
* node-loss: two nodes (heartbeat timeout 2 s, task ack wait 3 s) run `sleep 1` tasks; one
  is killed with SIGKILL; the time from the kill to the first of its tasks finished by
  the other, median over R runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import tomllib
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not installed

import docker
import nats.errors

from bench.bench_outbox import make_events, run_outbox, run_raw
from schemas import encode_event
from schemas.connection import NatsConfig
from schemas.streams import EVENTS_STREAM
from supervisor.eventlog import cluster
from supervisor.eventlog.nats_client import (
    MSG_ID_HEADER,
    close_quietly,
    connect_nats,
    ensure_streams,
)
from supervisor.eventlog.streams import events_stream_config
from testing.daemon import DaemonProc, task, wait_until
from testing.stream import stream_events


def _node_url(root: Path) -> str:
    with (root / "node.toml").open("rb") as f:
        url = NatsConfig(**tomllib.load(f)["nats"]).url()
    assert url is not None
    return url


async def _stored(url: str) -> int:
    nc = await connect_nats(url, reconnect=False)
    try:
        return int((await nc.jetstream().stream_info(EVENTS_STREAM)).state.messages)
    finally:
        await nc.close()


async def _measured(url: str, run: Coroutine[Any, Any, float], n: int) -> float:
    """One measurement, checking that exactly `n` more messages are in the stream (the node
    user may not purge `SUP_EVENTS`, so the stream grows instead)."""
    before = await _stored(url)
    elapsed = await run
    grown = await _stored(url) - before
    if grown != n:
        raise RuntimeError(f"expected {n} more messages in {EVENTS_STREAM}, found {grown}")
    return elapsed


async def replication(n: int, rounds: int) -> int:
    root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        await asyncio.to_thread(cluster.up, root)
        url = _node_url(root)
        best: dict[int, dict[str, float]] = {}
        for replicas in (3, 1):
            nc = await connect_nats(url, reconnect=False)
            await ensure_streams(nc.jetstream(), [events_stream_config(replicas)], url=url)
            await nc.close()
            rates: dict[str, list[float]] = {"raw": [], "outbox": []}
            for r in range(rounds):
                order = ("raw", "outbox") if r % 2 == 0 else ("outbox", "raw")
                for way in order:
                    events = make_events(n)
                    run = (
                        run_raw(url, events)
                        if way == "raw"
                        else run_outbox(
                            url, root / f"data-{replicas}-{r}", events, f"b{r}", replicas
                        )
                    )
                    rates[way].append(n / await _measured(url, run, n))
                print(
                    f"R{replicas} round {r + 1}: raw {rates['raw'][-1]:>8,.0f} msgs/s   "
                    f"outbox {rates['outbox'][-1]:>8,.0f} msgs/s   "
                    f"ratio {rates['outbox'][-1] / rates['raw'][-1]:.2f}"
                )
            paired = statistics.median(
                o / w for o, w in zip(rates["outbox"], rates["raw"], strict=True)
            )
            best[replicas] = {k: max(v) for k, v in rates.items()}
            print(
                f"R{replicas}: raw {best[replicas]['raw']:,.0f}, outbox "
                f"{best[replicas]['outbox']:,.0f} msgs/s (best rounds); outbox/raw "
                f"{best[replicas]['outbox'] / best[replicas]['raw']:.2f} best/best, "
                f"{paired:.2f} median per round"
            )
        for way in ("raw", "outbox"):
            print(f"R3/R1 {way}: {best[3][way] / best[1][way]:.2f}")
        return 0
    finally:
        cluster.down(root)
        shutil.rmtree(root, ignore_errors=True)


async def _leader_index(url: str) -> int:
    nc = await connect_nats(url, reconnect=False)
    try:
        info = await nc.jetstream().stream_info(EVENTS_STREAM)
        assert info.cluster is not None and info.cluster.leader is not None
        return int(info.cluster.leader.rsplit("-", 1)[1]) - 1
    finally:
        await nc.close()


async def _recovery_once() -> float:
    root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    try:
        await asyncio.to_thread(cluster.up, root)
        url = _node_url(root)
        nc = await connect_nats(url, reconnect=True, reconnect_wait=0.05)
        try:
            js = nc.jetstream()
            await ensure_streams(js, [events_stream_config(3)], url=url)
            index = await _leader_index(url)
            events = iter(make_events(100_000))
            for _ in range(200):  # a steady flow before the kill
                e = next(events)
                await js.publish(e.subject(), encode_event(e), headers={MSG_ID_HEADER: e.event_id})
            os.kill(cluster.pids(root)[index], signal.SIGKILL)
            killed = time.perf_counter()
            e = next(events)
            while True:
                try:
                    await js.publish(
                        e.subject(),
                        encode_event(e),
                        headers={MSG_ID_HEADER: e.event_id},
                        timeout=0.5,
                    )
                    return time.perf_counter() - killed
                except (nats.errors.Error, TimeoutError):
                    await asyncio.sleep(0.01)
        finally:
            await close_quietly(nc)
    finally:
        cluster.down(root)
        shutil.rmtree(root, ignore_errors=True)


async def recovery(runs: int) -> int:
    gaps = []
    for r in range(runs):
        gaps.append(await _recovery_once())
        print(f"run {r + 1}: first event acked {gaps[-1]:.2f} s after the leader's SIGKILL")
    print(
        f"leader SIGKILL -> next event acked: median {statistics.median(gaps):.2f} s, max {max(gaps):.2f} s"
    )
    return 0


def _start_node(root: Path, node_id: str, extra: dict[str, Any] | None = None) -> DaemonProc:
    with (root / "node.toml").open("rb") as f:
        nats_table = tomllib.load(f)["nats"]
    cfg = {"nats": nats_table, "node_id": node_id, "scheduling": {"concurrency": 8}}
    cfg.update(extra or {})
    return DaemonProc(root / node_id, None, config=cfg).start(timeout=60)


def _ended(url: str, prefix: str) -> dict[str, tuple[str, float, str]]:
    """task id -> (end type, when it was stored, the node that ended it)."""
    out = {}
    for e in asyncio.run(stream_events(url, "sup.task.>")):
        tag = str(type(e).__struct_config__.tag)
        if e.task_id.startswith(prefix) and tag in ("task.succeeded", "task.failed"):
            out[e.task_id] = (tag, e.occurred_at.timestamp(), e.node_id)
    return out


def _managed(node_id: str) -> list[str]:
    """The ids of the managed containers of `node_id` on this host's engine."""
    found = docker.from_env().containers.list(
        all=True,
        sparse=True,
        filters={"label": ["supervisor.managed=true", f"supervisor.node={node_id}"]},
    )
    return [str(c.id) for c in found]


def _submit_all(node: DaemonProc, ids: list[str], script: str) -> None:
    for tid in ids:
        status, body = node.request(
            "POST", "/v1/tasks", json.dumps(task(script, task_id=tid)).encode()
        )
        if status not in (200, 202):
            raise RuntimeError(f"submit {tid}: {status} {body!r}")


def nodes(n: int) -> int:
    root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    started: list[DaemonProc] = []
    try:
        cluster.up(root)
        url = _node_url(root)
        rates = {}
        for count in (1, 2):
            started += [_start_node(root, f"n{i + 1}") for i in range(len(started), count)]
            ids = [f"nodes{count}-{i}" for i in range(n)]
            t0 = time.time()
            _submit_all(started[0], ids, "true")
            wait_until(lambda: len(_ended(url, f"nodes{count}-")) == n, 900, "every task")  # noqa: B023
            ends = _ended(url, f"nodes{count}-")
            elapsed = max(at for _, at, _ in ends.values()) - t0
            rates[count] = n / elapsed
            spread: dict[str, int] = {}
            for _, _, node_id in ends.values():
                spread[node_id] = spread.get(node_id, 0) + 1
            print(
                f"{count} node(s): {n} tasks in {elapsed:.1f} s = {rates[count]:.2f} tasks/s; ended by {spread}"
            )
        print(f"two nodes / one node: {rates[2] / rates[1]:.2f}")
        return 0
    finally:
        for d in started:
            d.stop()
        cluster.down(root)
        shutil.rmtree(root, ignore_errors=True)


_FAST_LOSS: dict[str, Any] = {
    "scheduling": {"concurrency": 3, "ack_wait_s": 3.0, "ack_progress_s": 1.0},
    "reconcile": {"interval_s": 1.0, "heartbeat_s": 0.5, "heartbeat_timeout_s": 2.0},
}


def node_loss(runs: int) -> int:
    gaps = []
    for r in range(runs):
        root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
        started: list[DaemonProc] = []
        try:
            cluster.up(root)
            url = _node_url(root)
            started = [_start_node(root, n, _FAST_LOSS) for n in ("n1", "n2")]
            ids = [f"loss{r}-{i}" for i in range(12)]
            _submit_all(started[0], ids, "sleep 1")
            time.sleep(1.5)
            started[0].kill()
            killed = time.time()
            wait_until(lambda: len(_ended(url, f"loss{r}-")) == len(ids), 120, "every task")  # noqa: B023
            # The first of n1's tasks finished by n2: the earliest end on n2 of a task whose
            # first attempt n1 started.
            events = asyncio.run(stream_events(url, "sup.attempt.started.>"))
            on_n1 = {
                e.task_id
                for e in events
                if e.task_id.startswith(f"loss{r}-") and e.attempt == 1 and e.node_id == "n1"
            }
            ends = _ended(url, f"loss{r}-")
            firsts = [ends[t][1] for t in on_n1 if t in ends and ends[t][2] == "n2"]
            gaps.append(min(firsts) - killed)
            print(
                f"run {r + 1}: the first of n1's tasks ended on n2 {gaps[-1]:.2f} s after n1's SIGKILL"
            )
            # n1's containers wait for n1: started again, its start-up pass removes them.
            started[0].start(timeout=60)
            wait_until(lambda: not _managed("n1"), 60, "n1 to remove its orphans")
        finally:
            for d in started:
                d.stop()
            cluster.down(root)
            shutil.rmtree(root, ignore_errors=True)
    print(
        f"node SIGKILL -> first of its tasks finished elsewhere: median {statistics.median(gaps):.2f} s, max {max(gaps):.2f} s"
    )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=("replication", "recovery", "nodes", "node-loss"))
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if args.what == "replication":
        sys.exit(asyncio.run(replication(args.events, args.rounds)))
    if args.what == "recovery":
        sys.exit(asyncio.run(recovery(args.runs)))
    sys.exit(nodes(args.tasks) if args.what == "nodes" else node_loss(args.runs))
