"""Daemon throughput and memory, measured in one run.

1. Throughput: N trivial tasks submitted at once to `supervisor serve` (concurrency 8),
   from the first submission to the last terminal event, against raw docker-py running the
   same hardened container N times with 8 threads (half before the daemon's run, half
   after it, so that the machine's drift weighs on both). Target ratio >= 0.8.
2. Peak RSS of the daemon with M tasks queued and 8 running. Target <= 150 MB. The
   projection runs in a child process of the daemon; its RSS is printed apart, and the sum.
3. Submit latency: K submissions one after the other through the intake (validate, append
   `task.submitted` to the outbox and wait for its JetStream ack, publish the task to
   SUP_TASKS and wait for that ack), p50 and p99, against the same two awaited
   `js.publish` calls done raw (no outbox, no validation).

The daemon runs on the default host-pressure thresholds: its brakes read contention
(PSI), which the node's own tasks on a 2-core machine stay under; `--no-brakes` turns them
off, for a comparison.

    .venv/bin/python bench/bench_daemon.py [--tasks 500] [--queued 10000] [--submits 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import psutil
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_executor import SCRIPT, raw_run
from schemas import Limits, RetryPolicy, TaskSpec
from schemas.config import Config, Scheduling
from schemas.streams import TASKS_STREAM
from supervisor.eventlog.emitter import Emitter, new_id
from supervisor.eventlog.log import EventLog
from supervisor.eventlog.nats_client import ensure_streams
from supervisor.eventlog.nats_server import NatsServer
from supervisor.eventlog.streams import tasks_stream_config
from supervisor.intake.submit import Intake
from testing.daemon import HOST_BRAKES, DaemonProc, remove_managed_containers

IMAGE = "supervisor-sandbox:busybox"


def _spec(i: int, script: str, timeout: float = 30) -> TaskSpec:
    return TaskSpec(
        task_id=f"b-{i}-{new_id()[:6]}",
        image=IMAGE,
        command=["sh", "/workspace/main.sh"],
        files={"main.sh": script},
        limits=Limits(timeout_s=timeout),
        retry=RetryPolicy(max_attempts=1),
    )


async def submit_all(url: str, data_dir: Path, specs: list[TaskSpec], wait: bool) -> float:
    """Submit every spec at once; with `wait`, return the seconds until the last terminal event."""
    events = EventLog(data_dir, url, instance_id=new_id()[:16])
    await events.start()
    await events.wait_connected(10)
    cfg = Config(scheduling=Scheduling(queue_bound_per_priority=100_000))
    intake = Intake(events.js, Emitter(events, "client", events.instance_id), events, cfg)
    done = asyncio.Event()
    finished: set[str] = set()
    failed: set[str] = set()
    want = {s.task_id for s in specs}

    async def on_terminal(msg) -> None:  # type: ignore[no-untyped-def]
        task = msg.subject.split(".")[-1]
        if task in want:
            finished.add(task)
            if msg.subject.startswith("sup.task.failed."):
                failed.add(task)
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
    if failed:
        print(f"  {len(failed)} of {len(want)} tasks failed, e.g. {sorted(failed)[:3]}")
    return took


async def submit_latency(url: str, data_dir: Path, n: int) -> tuple[list[float], list[float]]:
    """Per-submission seconds: through the intake, and raw (two awaited publishes)."""
    events = EventLog(data_dir, url, instance_id=new_id()[:16])
    await events.start()
    await events.wait_connected(10)
    js = events.js
    await ensure_streams(js, [tasks_stream_config(n * 3)])
    cfg = Config(scheduling=Scheduling(queue_bound_per_priority=n * 3))
    intake = Intake(js, Emitter(events, "client", events.instance_id), events, cfg)
    specs = [_spec(i, SCRIPT) for i in range(n)]
    encoder = msgspec.json.Encoder()
    ours: list[float] = []
    raw: list[float] = []
    for spec in specs:
        t0 = time.perf_counter()
        s = await intake.submit(spec)
        ours.append(time.perf_counter() - t0)
        assert s.accepted, s
    for i, spec in enumerate(specs):
        body = encoder.encode(spec)
        t0 = time.perf_counter()
        await js.publish(f"sup.task.submitted.client.r{i}", body, headers={"Nats-Msg-Id": f"r{i}"})
        await js.publish("suptask.low", body, headers={"Nats-Msg-Id": f"raw-{i}"})
        raw.append(time.perf_counter() - t0)
    await js.purge_stream(TASKS_STREAM)
    await events.close(10)
    return ours, raw


def _samples(daemon: DaemonProc, family_name: str) -> list[Sample]:
    """The samples of one metric family of the daemon's /metrics."""
    _, body = daemon.get("/metrics")
    for family in text_string_to_metric_families(body.decode()):
        if family.name == family_name:
            return list(family.samples)
    return []


def _lag_quantiles(daemon: DaemonProc) -> dict[str, float]:
    """The projection's exact recent publish-to-visible quantiles, from /metrics."""
    return {
        "p" + str(round(float(s.labels["quantile"]) * 100)): s.value
        for s in _samples(daemon, "supervisor_projection_lag_recent_seconds")
    }


def _batch_stats(daemon: DaemonProc) -> tuple[int, float]:
    """(batches applied, mean seconds per batch) of the live projection, from /metrics."""
    by_name = {s.name: s.value for s in _samples(daemon, "supervisor_projection_batch_seconds")}
    count = by_name.get("supervisor_projection_batch_seconds_count", 0.0)
    total = by_name.get("supervisor_projection_batch_seconds_sum", 0.0)
    return int(count), (total / count if count else 0.0)


def _rss(proc: psutil.Process) -> tuple[int, int]:
    """The RSS of the daemon's process and the sum of its child processes' (the projection
    service; the embedded NATS server is not the daemon's here)."""
    children = 0
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            children += child.memory_info().rss
    return proc.memory_info().rss, children


def _cpu_seconds(procs: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each named group of processes."""
    out: dict[str, float] = {}
    for name, group in procs.items():
        total = 0.0
        for p in group:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        out[name] = total
    return out


def _cpu_groups(daemon_pid: int, nats_pid: int) -> dict[str, list[psutil.Process]]:
    """The processes whose CPU a throughput run is split into: the daemon, its projection
    child, the NATS server and the Docker engine (dockerd, containerd; the per-container
    shims come and go and are not counted)."""
    daemon = psutil.Process(daemon_pid)
    engine = [
        p for p in psutil.process_iter(["name"]) if p.info["name"] in ("dockerd", "containerd")
    ]
    return {
        "daemon": [daemon],
        "projection": daemon.children(recursive=True),
        "nats-server": [psutil.Process(nats_pid)],
        "docker engine": engine,
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=500)
    ap.add_argument("--queued", type=int, default=10_000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--submits", type=int, default=1000)
    ap.add_argument(
        "--core-only",
        action="store_true",
        help="run the daemon without the DuckDB read side (no projection, no reconciler)",
    )
    ap.add_argument(
        "--max-busy",
        type=float,
        metavar="F",
        help="the projection's max_busy (default: the configured default)",
    )
    ap.add_argument(
        "--batch-age",
        type=float,
        metavar="S",
        help="the projection's batch_age_s (default: the configured default)",
    )
    ap.add_argument("--no-brakes", action="store_true", help="turn the host-pressure brakes off")
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
        ours, raw = asyncio.run(submit_latency(url, tmp / "latency", args.submits))
        print(
            f"submit latency, {args.submits} sequential: intake p50 {_pct(ours, 0.5) * 1e3:.2f} ms "
            f"p99 {_pct(ours, 0.99) * 1e3:.2f} ms; raw p50 {_pct(raw, 0.5) * 1e3:.2f} ms "
            f"p99 {_pct(raw, 0.99) * 1e3:.2f} ms; p50 ratio {_pct(ours, 0.5) / _pct(raw, 0.5):.2f}"
        )
        sched = {
            "concurrency": args.concurrency,
            "queue_bound_per_priority": max(args.queued, args.tasks) + 100,
            "memory_budget_mb": 64 * 1024,
        }
        config: dict[str, object] = {"scheduling": sched}
        config["thresholds"] = dict.fromkeys(HOST_BRAKES, 0.0) if args.no_brakes else {}
        extra: tuple[str, ...] = ()
        projection: dict[str, float] = {}
        if args.max_busy is not None:
            projection["max_busy"] = args.max_busy
        if args.batch_age is not None:
            projection["batch_age_s"] = args.batch_age
        if projection:
            config["projection"] = projection
        if args.core_only:
            config["reconcile"] = {"enabled": False}
            extra = ("--no-projection",)
        config.setdefault("pool", {})  # the defaults' warm pool
        daemon = DaemonProc(tmp / "data", url, config, extra).start()
        specs = [_spec(i, SCRIPT) for i in range(args.tasks)]
        # The raw baseline runs half before and half after the daemon's run, so that the
        # machine's drift over the few minutes weighs on both sides alike.
        half = args.tasks // 2
        groups = _cpu_groups(daemon.proc.pid, server.proc.pid)  # type: ignore[union-attr]
        raw_groups = {"raw client": [psutil.Process()], "docker engine": groups["docker engine"]}
        raw0 = _cpu_seconds(raw_groups)
        _, raw_before = raw_run(half, args.concurrency, str(mount))
        raw1 = _cpu_seconds(raw_groups)
        cpu0 = _cpu_seconds(groups)
        sup_s = asyncio.run(submit_all(url, tmp / "client", specs, wait=True))
        cpu1 = _cpu_seconds(groups)
        raw2 = _cpu_seconds(raw_groups)
        _, raw_after = raw_run(args.tasks - half, args.concurrency, str(mount))
        raw3 = _cpu_seconds(raw_groups)
        raw_s = raw_before + raw_after
        sup_tp, raw_tp = args.tasks / sup_s, args.tasks / raw_s
        print(
            f"throughput, {args.tasks} tasks at concurrency {args.concurrency}: raw {raw_tp:.2f}/s, "
            f"daemon {sup_tp:.2f}/s, ratio {sup_tp / raw_tp:.3f} (target >= 0.8)"
        )

        print(
            "  CPU per task, daemon's run: "
            + ", ".join(f"{k} {(cpu1[k] - cpu0[k]) / args.tasks * 1e3:.1f} ms" for k in cpu0)
            + "; raw run: "
            + ", ".join(
                f"{k} {(raw1[k] - raw0[k] + raw3[k] - raw2[k]) / args.tasks * 1e3:.1f} ms"
                for k in raw0
            )
        )

        lag = _lag_quantiles(daemon)
        if lag:
            print(
                "live projection lag (publish to visible) over the last events of that run: "
                + ", ".join(f"{q} {v * 1e3:.0f} ms" for q, v in lag.items())
                + " (target p99 < 1 s)"
            )
            batches, mean = _batch_stats(daemon)
            print(
                f"  {batches} projection batches during the run, {mean * 1e3:.0f} ms each on average"
            )

        proc = psutil.Process(daemon.proc.pid)  # type: ignore[union-attr]
        idle, idle_children = _rss(proc)
        long = [_spec(i, "sleep 500", timeout=590) for i in range(args.queued)]
        asyncio.run(submit_all(url, tmp / "client", long, wait=False))
        peak = peak_children = peak_sum = 0
        t_end = time.monotonic() + 15
        while time.monotonic() < t_end:
            own, children = _rss(proc)
            peak, peak_children = max(peak, own), max(peak_children, children)
            peak_sum = max(peak_sum, own + children)
            time.sleep(0.2)
        print(
            f"daemon peak RSS with {args.queued} queued and {args.concurrency} running: "
            f"{peak / 2**20:.1f} MB (target <= 150 MB); before queueing {idle / 2**20:.1f} MB"
        )
        if peak_children:
            print(
                f"  its projection process (DuckDB): peak {peak_children / 2**20:.1f} MB, "
                f"before queueing {idle_children / 2**20:.1f} MB; both together peak "
                f"{peak_sum / 2**20:.1f} MB"
            )
    finally:
        if daemon is not None:
            daemon.signal(9)
            daemon.wait()
        remove_managed_containers("n1")
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
