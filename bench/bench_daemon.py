"""Daemon throughput and memory, measured in one run.

1. Throughput: N trivial tasks submitted at once to `supervisor serve` (concurrency 8),
   from the first submission to the last terminal event, against raw docker-py running the
   same hardened container N times with 8 threads. Target ratio >= 0.8.
2. Peak RSS of the daemon with M tasks queued and 8 running. Target <= 150 MB.

    .venv/bin/python bench/bench_daemon.py [--tasks 500] [--queued 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_executor import SCRIPT, raw_run
from schemas import TaskSpec
from supervisor.config import Config
from supervisor.emitter import Emitter, new_id
from supervisor.eventlog import EventLog
from supervisor.intake import Intake
from supervisor.natsserver import NatsServer
from tests.daemonutil import DaemonProc

IMAGE = "supervisor-sandbox:busybox"


def _spec(i: int, script: str, timeout: float = 30) -> TaskSpec:
    return TaskSpec(
        task_id=f"b-{i}-{new_id()[:6]}",
        image=IMAGE,
        command=["sh", "/workspace/main.sh"],
        files={"main.sh": script},
        limits={"timeout_s": timeout},  # type: ignore[arg-type]
        retry={"max_attempts": 1},  # type: ignore[arg-type]
    )


async def submit_all(url: str, data_dir: Path, specs: list[TaskSpec], wait: bool) -> float:
    """Submit every spec at once; with `wait`, return the seconds until the last terminal event."""
    events = EventLog(data_dir, url, instance_id=new_id()[:16])
    await events.start()
    await events.wait_connected(10)
    cfg = Config(scheduling={"queue_bound_per_priority": 100_000})  # type: ignore[arg-type]
    intake = Intake(events.js, Emitter(events, "client", events.instance_id), events, cfg)
    done = asyncio.Event()
    finished: set[str] = set()
    want = {s.task_id for s in specs}

    async def on_terminal(msg) -> None:  # type: ignore[no-untyped-def]
        task = msg.subject.split(".")[-1]
        if task in want:
            finished.add(task)
            if len(finished) == len(want):
                done.set()

    sub = None
    if wait:
        sub = await events.nc.subscribe("sup.task.succeeded.>", cb=on_terminal)
        await events.nc.subscribe("sup.task.failed.>", cb=on_terminal)
    t0 = time.perf_counter()
    sem = asyncio.Semaphore(200)

    async def one(spec: TaskSpec) -> None:
        async with sem:
            s = await intake.submit(spec)
            assert s.accepted, s

    await asyncio.gather(*(one(s) for s in specs))
    if wait:
        await done.wait()
    took = time.perf_counter() - t0
    del sub
    await events.close(10)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    server = NatsServer(tmp / "nats")
    url = server.start()
    mount = tmp / "ws"
    mount.mkdir(mode=0o755)
    (mount / "main.sh").write_text(SCRIPT)
    (mount / "main.sh").chmod(0o644)
    daemon = None
    try:
        sched = {
            "concurrency": args.concurrency,
            "queue_bound_per_priority": max(args.queued, args.tasks) + 100,
            "memory_budget_mb": 64 * 1024,
        }
        daemon = DaemonProc(tmp / "data", url, {"scheduling": sched}).start()
        specs = [_spec(i, SCRIPT) for i in range(args.tasks)]
        sup_s = asyncio.run(submit_all(url, tmp / "client", specs, wait=True))
        _, raw_s = raw_run(args.tasks, args.concurrency, str(mount))
        sup_tp, raw_tp = args.tasks / sup_s, args.tasks / raw_s
        print(
            f"throughput, {args.tasks} tasks at concurrency {args.concurrency}: raw {raw_tp:.2f}/s, "
            f"daemon {sup_tp:.2f}/s, ratio {sup_tp / raw_tp:.3f} (target >= 0.8)"
        )

        proc = psutil.Process(daemon.proc.pid)  # type: ignore[union-attr]
        long = [_spec(i, "sleep 600", timeout=900) for i in range(args.queued)]
        asyncio.run(submit_all(url, tmp / "client", long, wait=False))
        peak = 0
        t_end = time.monotonic() + 15
        while time.monotonic() < t_end:
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.2)
        print(
            f"daemon peak RSS with {args.queued} queued and {args.concurrency} running: "
            f"{peak / 2**20:.1f} MB (target <= 150 MB)"
        )
    finally:
        if daemon is not None:
            daemon.signal(9)
            daemon.wait()
        import docker

        client = docker.from_env(version="1.41")
        for c in client.containers.list(all=True, filters={"label": "supervisor.node=n1"}):
            c.remove(force=True, v=True)
        client.close()
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
