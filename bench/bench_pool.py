"""The warm pool, measured in one run against raw docker-py doing the same work.

    .venv/bin/python bench/bench_pool.py [--tasks 40] [--rate 5] [--seconds 30] [--idle 20]

1. Latency of a trivial task, one at a time, alternated: raw docker-py create + start +
   wait + logs + remove of the same hardened container; `Executor.run` cold (no pool); and
   `Executor.run` warm (a pool hit). Medians, p99 and the ratios to raw; and, of the warm
   runs, the adopt-to-exit time (from taking the parked container to its exit) p50/p99.
2. The hit rate at a steady `--rate` tasks/s for `--seconds` (a pool of the defaults:
   2 parked containers of the task's shape), and the latency ratio to raw at that rate.
3. What `--idle` parked containers cost at idle: the CPU they use over 10 s and the
   memory their cgroups hold, read from cgroup v1.

Everything runs on a private nats-server and the host's dockerd; the node is `bench-pool`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_executor import IMAGE, SCRIPT, raw_one
from schemas import RetryPolicy, TaskSpec
from schemas.config import Config
from schemas.spec import PoolConfig, pool_shape
from supervisor.daemon.node import Node, open_node
from supervisor.eventlog.nats_server import NatsServer
from supervisor.execution.pool import WarmPool
from testing.daemon import remove_managed_containers

NODE = "bench-pool"
_CGROUP = Path("/sys/fs/cgroup")


def _spec() -> TaskSpec:
    return TaskSpec(
        image=IMAGE,
        command=["sh", "/workspace/main.sh"],
        files={"main.sh": SCRIPT},
        retry=RetryPolicy(max_attempts=1),
    )


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _ready(pool: WarmPool, n: int, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while sum(pool.parked().values()) < n:
            await asyncio.sleep(0.01)


async def _run(node: Node, spec: TaskSpec) -> float:
    t0 = time.perf_counter()
    r = await node.executor.run(spec)
    took = time.perf_counter() - t0
    assert (r.status, r.stdout) == ("succeeded", "hello\n"), r
    return took


def _counter(node: Node, name: str) -> float:
    return sum(
        s.value
        for m in getattr(node.metrics, name).collect()
        for s in m.samples
        if s.name.endswith("_total")
    )


async def latency(node: Node, pool: WarmPool, api: docker.APIClient, mount: str, n: int) -> None:
    raw: list[float] = []
    cold: list[float] = []
    warm: list[float] = []
    adopt_to_exit: list[float] = []
    attempts = node.executor.attempts
    for _ in range(n):
        raw.append(await asyncio.to_thread(raw_one, api, mount))
        attempts.pool = None
        cold.append(await _run(node, _spec()))
        attempts.pool = pool
        await _ready(pool, 1)
        hits = _counter(node, "pool_hits")
        warm.append(await _run(node, _spec()))
        assert _counter(node, "pool_hits") == hits + 1, "a warm run missed the pool"
        adopt_to_exit.append(attempts.last_exit_at - attempts.last_adopt_at)
    await attempts.drain()
    r, c, w = (statistics.median(x) for x in (raw, cold, warm))
    print(f"{n} trivial tasks one at a time, alternated (medians, p99):")
    print(
        f"  raw docker-py create/start/wait/logs/remove: {r * 1e3:6.1f} ms  p99 {_p(raw, 0.99) * 1e3:.1f}"
    )
    print(
        f"  Executor.run, cold:                          {c * 1e3:6.1f} ms  p99 {_p(cold, 0.99) * 1e3:.1f}  ratio {c / r:.2f}"
    )
    print(
        f"  Executor.run, a pool hit:                    {w * 1e3:6.1f} ms  p99 {_p(warm, 0.99) * 1e3:.1f}  ratio {w / r:.2f}"
    )
    print(
        f"  adopt-to-exit of a pool hit: p50 {statistics.median(adopt_to_exit) * 1e3:.1f} ms, "
        f"p99 {_p(adopt_to_exit, 0.99) * 1e3:.1f} ms"
    )


async def steady(node: Node, pool: WarmPool, rate: float, seconds: float) -> None:
    node.executor.attempts.pool = pool
    await _ready(pool, pool.cfg.size)
    hits0, misses0 = _counter(node, "pool_hits"), _counter(node, "pool_misses")
    runs: list[asyncio.Task[float]] = []
    t0 = time.perf_counter()
    i = 0
    while time.perf_counter() - t0 < seconds:
        runs.append(asyncio.ensure_future(_run(node, _spec())))
        i += 1
        await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
    took = await asyncio.gather(*runs)
    await node.executor.attempts.drain()
    hits = _counter(node, "pool_hits") - hits0
    misses = _counter(node, "pool_misses") - misses0
    print(
        f"{len(runs)} tasks at a steady {rate:g}/s with [pool] size {pool.cfg.size}: "
        f"hit rate {hits / max(hits + misses, 1):.2f} ({int(hits)} hits, {int(misses)} misses), "
        f"latency p50 {statistics.median(took) * 1e3:.0f} ms, p99 {_p(took, 0.99) * 1e3:.0f} ms"
    )


def _cgroup_ints(cid: str) -> tuple[int, int]:
    """(CPU ns used, memory bytes held) of a container's cgroup (v1)."""
    cpu = int((_CGROUP / "cpuacct" / "docker" / cid / "cpuacct.usage").read_text())
    mem = int((_CGROUP / "memory" / "docker" / cid / "memory.usage_in_bytes").read_text())
    return cpu, mem


async def idle_cost(node: Node, tmp: Path, n: int) -> None:
    cfg = Config(data_dir=str(tmp / "data"), node_id=NODE, pool=PoolConfig(size=n))
    pool = WarmPool(node.runtime, node.emitter, cfg, node.metrics, data_dir=tmp / "data")
    shape = pool_shape(_spec())
    assert shape is not None
    pool.keep(shape)
    pool.start()
    try:
        t = time.perf_counter()
        await _ready(pool, n, timeout=300)
        parked_s = time.perf_counter() - t
        ids = [p.container_id for q in pool._parked.values() for p in q]
        await asyncio.sleep(2)
        before = [_cgroup_ints(c) for c in ids]
        await asyncio.sleep(10)
        after = [_cgroup_ints(c) for c in ids]
        cpu = sum(a[0] - b[0] for a, b in zip(after, before, strict=True)) / 1e9
        mem = sum(a[1] for a in after)
        print(
            f"{n} parked containers (made in {parked_s:.1f} s): CPU over 10 s {cpu * 1e3:.1f} ms "
            f"in all ({cpu / 10 * 100:.3f} % of one core), memory held {mem / 2**20:.1f} MiB "
            f"in all ({mem / n / 2**20:.2f} MiB each)"
        )
    finally:
        await pool.close()


async def main_async(args: argparse.Namespace, tmp: Path, url: str) -> None:
    mount = tmp / "ws"
    mount.mkdir(mode=0o755)
    (mount / "main.sh").write_text(SCRIPT)
    (mount / "main.sh").chmod(0o644)
    cfg = Config(data_dir=str(tmp / "data"), node_id=NODE, pool=PoolConfig(size=2))
    api = docker.APIClient(version="1.41", timeout=120)
    try:
        async with open_node(cfg, nats_url=url) as node:
            pool = WarmPool(
                node.runtime,
                node.emitter,
                cfg,
                node.metrics,
                data_dir=node.data_dir,
                watcher=node.watcher,
            )
            shape = pool_shape(_spec())
            assert shape is not None
            pool.keep(shape)
            pool.start()
            try:
                await _run(node, _spec())  # warm up: the image, the connections
                await latency(node, pool, api, str(mount), args.tasks)
                await steady(node, pool, args.rate, args.seconds)
            finally:
                await pool.close()
            if args.idle:
                await idle_cost(node, tmp, args.idle)
    finally:
        api.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=40)
    ap.add_argument("--rate", type=float, default=5.0, help="tasks/s of the steady run")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the steady run")
    ap.add_argument("--idle", type=int, default=20, help="parked containers to cost (0: skip)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    server = NatsServer(tmp / "nats")
    url = server.start()
    try:
        asyncio.run(main_async(args, tmp, url))
    finally:
        remove_managed_containers(NODE)
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
