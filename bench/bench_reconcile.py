"""The reconciler's two figures, measured in one run each.

1. Leak-to-removal: N long tasks run in a daemon, the daemon is killed with SIGKILL and
   started again; from the restart, when does each of the N containers it left disappear?
   Median and maximum, against the configured interval and heartbeat timeout (a dead
   instance is recognised once its heartbeats are `heartbeat_timeout_s` old; a pass comes
   every `interval_s`).
2. The cost of one pass with M managed containers observed (created, not started; a
   creation grace long enough that none is a divergence: the steady state): wall time and
   CPU time of the process (the projector and DuckDB threads included) per pass, against a
   bare `docker ps --all` of the same containers (docker-py, same label filter) in the same
   run.

    .venv/bin/python bench/bench_reconcile.py [--orphans 50] [--containers 1000] [--passes 5]
        [--interval 10] [--heartbeat-timeout 5]

Either part can be skipped with 0.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import TaskSpec
from schemas.config import Config
from supervisor.eventlog.emitter import Emitter, new_id
from supervisor.eventlog.log import EventLog
from supervisor.eventlog.nats_server import NatsServer
from supervisor.intake.submit import Intake
from testing.daemon import DaemonProc
from testing.reconcile import labels, new_node_id, rig

IMAGE = "supervisor-sandbox:busybox"


def _managed(api: docker.APIClient, node_id: str) -> set[str]:
    flt = {"label": ["supervisor.managed=true", f"supervisor.node={node_id}"]}
    return {c["Id"] for c in api.containers(all=True, filters=flt)}


async def _submit(url: str, data_dir: Path, n: int) -> None:
    events = EventLog(data_dir, url, instance_id=new_id()[:16])
    await events.start()
    await events.wait_connected(10)
    cfg = Config(scheduling={"queue_bound_per_priority": 100_000})  # type: ignore[arg-type]
    intake = Intake(events.js, Emitter(events, "client", events.instance_id), events, cfg)
    for i in range(n):
        spec = msgspec.convert(
            {
                "image": IMAGE,
                "command": ["sleep", "600"],
                "task_id": f"long-{i}",
                "limits": {"timeout_s": 600},
                "retry": {"max_attempts": 1},
            },
            TaskSpec,
        )
        assert (await intake.submit(spec)).accepted
    await events.close()


def leak_to_removal(n: int, interval: float, timeout: float) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-reconcile-"))
    server = NatsServer(tmp / "nats")
    url = server.start()
    api = docker.APIClient(version="1.41", timeout=120)
    node_id = new_node_id()
    config = {
        "node_id": node_id,
        "reconcile": {
            "interval_s": interval,
            "heartbeat_s": min(1.0, timeout / 3),
            "heartbeat_timeout_s": timeout,
        },
        "scheduling": {
            "ack_wait_s": 600,
            "ack_progress_s": 5,
            "concurrency": n,
            "memory_budget_mb": 1_000_000,
        },
    }
    daemons: list[DaemonProc] = []
    try:
        first = DaemonProc(tmp / "data", url, config).start()
        daemons.append(first)
        asyncio.run(_submit(url, tmp / "client", n))
        while len(_managed(api, node_id)) < n:
            time.sleep(0.2)
        left = _managed(api, node_id)
        first.kill()
        second = DaemonProc(tmp / "data", url, config)
        daemons.append(second)
        t0 = time.monotonic()
        second.start(timeout=120)
        ready = time.monotonic() - t0
        gone_at: dict[str, float] = {}
        while len(gone_at) < n and time.monotonic() - t0 < 600:
            now = time.monotonic() - t0
            for cid in left - _managed(api, node_id) - gone_at.keys():
                gone_at[cid] = now
            time.sleep(0.05)
        times = sorted(gone_at.values())
        print(
            f"leak-to-removal, {n} orphans of a killed daemon (interval {interval:g}s, "
            f"heartbeat timeout {timeout:g}s; restart to ready {ready:.2f}s):"
        )
        print(
            f"  median {statistics.median(times):.2f}s, max {times[-1]:.2f}s after the restart"
            f" ({times[-1] / (interval + timeout):.2f} x (interval + timeout)); "
            f"{len(times)}/{n} removed"
        )
    finally:
        for d in reversed(daemons):
            d.stop()
        for cid in _managed(api, node_id):
            api.remove_container(cid, force=True)
        api.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def _pass_cost(m: int, passes: int, tmp: Path, client: docker.DockerClient) -> None:
    async with rig(
        await _nats(tmp), tmp, client, creation_grace_s=3600.0, projection_wait_s=60.0
    ) as r:
        api = client.api
        with ThreadPoolExecutor(8) as pool:
            lbl = labels(r.node_id, "t-bench")
            created = list(
                pool.map(
                    lambda _: api.create_container(
                        IMAGE,
                        ["true"],
                        labels=lbl,
                        host_config=api.create_host_config(network_mode="none"),
                    )["Id"],
                    range(m),
                )
            )
        r.created.extend(created)
        await r.reconciler.run_pass()  # warm: the projection has the history
        walls, cpus, waits, raw_walls, raw_cpus = [], [], [], [], []
        flt = {"label": ["supervisor.managed=true", f"supervisor.node={r.node_id}"]}
        for _ in range(passes):
            w0, c0 = time.perf_counter(), time.process_time()
            report = await r.reconciler.run_pass()
            walls.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
            waits.append(report.projection_wait_s)
            assert report.containers == m and report.planned == []
            w0, c0 = time.perf_counter(), time.process_time()
            assert len(await asyncio.to_thread(api.containers, all=True, filters=flt)) == m
            raw_walls.append(time.perf_counter() - w0)
            raw_cpus.append(time.process_time() - c0)
        pw, pc = statistics.median(walls), statistics.median(cpus)
        rw, rc = statistics.median(raw_walls), statistics.median(raw_cpus)
        print(f"one pass with {m} managed containers observed (median of {passes}):")
        print(
            f"  pass: {pw * 1000:.0f} ms wall (of which {statistics.median(waits) * 1000:.0f} ms "
            f"until the projection showed the inventory), {pc * 1000:.0f} ms CPU (the "
            f"projector's included); docker ps: {rw * 1000:.0f} ms wall, {rc * 1000:.0f} ms "
            f"CPU; ratio {pw / rw:.1f}x wall, {pc / max(rc, 1e-6):.1f}x CPU"
        )
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda cid: api.remove_container(cid, force=True), created))


_servers: list[NatsServer] = []


async def _nats(tmp: Path) -> str:
    server = NatsServer(tmp / "nats")
    _servers.append(server)
    return server.start()


def pass_cost(m: int, passes: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-reconcile-"))
    client = docker.from_env(version="1.41", timeout=300)
    try:
        asyncio.run(_pass_cost(m, passes, tmp, client))
    finally:
        for server in _servers:
            server.stop()
        client.close()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--orphans", type=int, default=50)
    p.add_argument("--containers", type=int, default=1000)
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--interval", type=float, default=10.0)
    p.add_argument("--heartbeat-timeout", type=float, default=5.0)
    args = p.parse_args()
    if args.orphans:
        leak_to_removal(args.orphans, args.interval, args.heartbeat_timeout)
    if args.containers:
        pass_cost(args.containers, args.passes)


if __name__ == "__main__":
    main()
