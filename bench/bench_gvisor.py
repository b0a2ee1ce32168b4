"""What gVisor's second wall costs, runsc against runc, alternated in one run.

Both through `Executor.run` on a real dockerd and JetStream, the warm pool off (every task
starts cold, so the runtime's own start is measured), the same trivial task:

- per-task latency at concurrency 1 (median) and throughput at concurrency 8;
- a task adopting a parked container of each runtime (the warm pool hides the start), and
  the memory a parked one holds;
- a CPU-bound task (a shell loop: user code, few system calls) and a syscall-heavy one
  (`dd` copying 1-byte blocks: two system calls a byte), timed inside the container by
  busybox `time` (10 ms resolution), the cost a judge's user pays.

    .venv/bin/python bench/bench_gvisor.py [--tasks 24] [--rounds 2]

Prints each figure and its ratio runsc / runc. Needs runsc registered with dockerd
(`scripts/setup` does it).
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

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import Limits, RetryPolicy, TaskSpec
from schemas.config import Config
from schemas.spec import PoolConfig, Sandbox, pool_shape
from supervisor.daemon.node import Node, open_node
from supervisor.eventlog.nats_server import NatsServer
from supervisor.execution.pool import WarmPool

IMAGE = "supervisor-sandbox:busybox"
_MEMORY = Path("/sys/fs/cgroup/memory/docker")
RUNTIMES = ("runc", "runsc")
TIMED = "time sh -c '{work}'"
# name -> (the work, its count of units under runc and under runsc): sized so that each
# takes a second or so (the timer's resolution is 10 ms); the figure is per unit.
WORKS = {
    "cpu-bound (shell loop), us per iteration": (
        "i=0; while [ $i -lt {n} ]; do i=$((i + 1)); done",
        {"runc": 1_000_000, "runsc": 1_000_000},
    ),
    "syscall-heavy (dd of 1-byte blocks: 2 system calls each), us per block": (
        "dd if=/dev/zero of=/dev/null bs=1 count={n} 2>/dev/null",
        {"runc": 1_000_000, "runsc": 10_000},
    ),
}


def _spec(runtime: str, command: str = "echo hello", timeout_s: float = 60) -> TaskSpec:
    return TaskSpec(
        image=IMAGE,
        command=["sh", "-c", command],
        limits=Limits(timeout_s=timeout_s),
        retry=RetryPolicy(max_attempts=1),
        runtime=runtime,
    )


async def _latency(node: Node, runtime: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = await node.executor.run(_spec(runtime))
        out.append(time.perf_counter() - t)
        assert r.status == "succeeded", r
    return out


async def _throughput(node: Node, runtime: str, n: int, concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            r = await node.executor.run(_spec(runtime))
            assert r.status == "succeeded", r

    t = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t)


async def _work_us(node: Node, runtime: str, work: str, n: int) -> float:
    """The work's time per unit, in microseconds."""
    script = TIMED.replace("{work}", work.replace("{n}", str(n)))
    r = await node.executor.run(_spec(runtime, script, timeout_s=120))
    assert r.status == "succeeded", r
    # busybox `time`: "real\t0m 1.23s" (10 ms resolution: the works take a second or so)
    real = next(line for line in r.stderr.splitlines() if line.startswith("real"))
    minutes, seconds = real.split()[1:3]
    return (int(minutes.rstrip("m")) * 60 + float(seconds.rstrip("s"))) * 1e6 / n


async def _pool_hits(node: Node, runtime: str, n: int) -> tuple[list[float], float]:
    """`n` tasks each adopting a parked container of `runtime`: their latencies, and the
    memory a parked one holds (MiB, its cgroup)."""
    cfg = msgspec.structs.replace(
        node.config,
        pool=PoolConfig(size=1, learn=False, refill_interval_s=0.05),
        sandbox=Sandbox(runtime=runtime),
    )
    pool = WarmPool(node.runtime, node.emitter, cfg, node.metrics, data_dir=node.data_dir)
    shape = pool_shape(_spec(runtime), runtime)
    assert shape is not None
    pool.keep(shape)
    pool.start()
    took, mem = [], 0.0
    try:
        for i in range(n):
            async with asyncio.timeout(60):
                while not pool.parked().get(shape.key()):
                    await asyncio.sleep(0.01)
            if i == 0:
                (parked,) = [p.container_id for q in pool._parked.values() for p in q]
                usage = _MEMORY / parked / "memory.usage_in_bytes"
                mem = int(usage.read_text()) / 2**20
            node.executor.attempts.pool = pool
            t = time.perf_counter()
            r = await node.executor.run(_spec(runtime))
            took.append(time.perf_counter() - t)
            node.executor.attempts.pool = None
            assert r.status == "succeeded", r
    finally:
        node.executor.attempts.pool = None
        await pool.close()
    return took, mem


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-gvisor-"))
    server = NatsServer(tmp / "nats")
    try:
        url = server.start()
        cfg = Config(
            data_dir=str(tmp / "data"),
            node_id="bench",
            pool=PoolConfig(size=0),
            sandbox=Sandbox(runtime="runc"),
        )
        async with open_node(cfg, nats_url=url) as node:
            for rt in RUNTIMES:  # warm up: the image, each runtime's first start
                await _latency(node, rt, 2)
            lat: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
            tput: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
            work: dict[tuple[str, str], list[float]] = {}
            hits: dict[str, list[float]] = {rt: [] for rt in RUNTIMES}
            parked_mib: dict[str, float] = {}
            for _ in range(args.rounds):
                for rt in RUNTIMES:
                    lat[rt] += await _latency(node, rt, args.tasks // 2)
                    tput[rt].append(await _throughput(node, rt, args.tasks, 8))
                    for name, (w, counts) in WORKS.items():
                        us = await _work_us(node, rt, w, counts[rt])
                        work.setdefault((name, rt), []).append(us)
                    took, parked_mib[rt] = await _pool_hits(node, rt, args.tasks // 2)
                    hits[rt] += took
            await node.executor.attempts.drain()
            await node.events.flush(10)
        print(f"{args.tasks} trivial tasks a round, {args.rounds} rounds, alternated:")
        m = {rt: statistics.median(lat[rt]) * 1e3 for rt in RUNTIMES}
        print(
            f"  latency, concurrency 1 (median): runc {m['runc']:.0f} ms, "
            f"runsc {m['runsc']:.0f} ms  ratio {m['runsc'] / m['runc']:.2f}"
        )
        t = {rt: statistics.median(tput[rt]) for rt in RUNTIMES}
        print(
            f"  throughput, concurrency 8: runc {t['runc']:.1f}/s, runsc {t['runsc']:.1f}/s"
            f"  ratio {t['runsc'] / t['runc']:.2f}"
        )
        h = {rt: statistics.median(hits[rt]) * 1e3 for rt in RUNTIMES}
        print(
            f"  a warm pool hit (median): runc {h['runc']:.0f} ms, runsc {h['runsc']:.0f} ms"
            f"  ratio {h['runsc'] / h['runc']:.2f}; runsc hit / runc cold "
            f"{h['runsc'] / m['runc']:.2f}"
        )
        print(
            f"  memory a parked container holds: runc {parked_mib['runc']:.1f} MiB, "
            f"runsc {parked_mib['runsc']:.1f} MiB"
        )
        for name in WORKS:
            a, b = (statistics.median(work[(name, rt)]) for rt in RUNTIMES)
            print(f"  {name}: runc {a:.2f}, runsc {b:.2f}  ratio {b / a:.1f}")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=24, help="tasks a measurement (default 24)")
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds (default 2)")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
