"""Executor overhead against raw docker-py, measured in one run.

Raw: docker-py create + start + wait + logs + remove of the same hardened container (same
image, command, limits, init, read-only root, tmpfs, network none, a read-only bind mount).
Supervisor: `Executor.run` of the same trivial task, with its workspace, Docker event
watcher, cgroup sampling, cleanup and every event through the outbox to a real JetStream.

    .venv/bin/python bench/bench_executor.py [--tasks N] [--concurrency 8]

Prints per-task latency at concurrency 1 (median, ratio supervisor/raw: target <= 1.15) and
throughput at the given concurrency (ratio supervisor/raw: target >= 0.85).

With `--public`, each round also runs the supervisor with docker-py's internals left alone
(`supervisor.docker.internals`: one connection pool per URL and every engine call in a
worker thread, as on another docker-py version) and prints what the shared pool and the
container's calls made on the loop (`supervisor.docker.aio`) gain.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import Limits, RetryPolicy, TaskSpec
from schemas.config import Config
from supervisor.daemon.node import open_node
from supervisor.docker import internals as internals_module
from supervisor.eventlog.nats_server import NatsServer

IMAGE = "supervisor-sandbox:busybox"
SCRIPT = "echo hello"
PINNED = internals_module.DOCKER_PY_VERSION


def raw_one(api: docker.APIClient, mount_dir: str) -> float:
    t0 = time.perf_counter()
    hc = api.create_host_config(
        init=True,
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        read_only=True,
        tmpfs={"/tmp": "rw,nosuid,nodev,size=16m,mode=1777"},
        pids_limit=64,
        mem_limit="128m",
        memswap_limit="128m",
        nano_cpus=1_000_000_000,
        binds={mount_dir: {"bind": "/workspace", "mode": "ro"}},
    )
    c = api.create_container(
        IMAGE,
        ["sh", "/workspace/main.sh"],
        user="65534:65534",
        labels={"bench.raw": "true"},
        working_dir="/workspace",
        host_config=hc,
        network_disabled=True,
    )
    cid = c["Id"]
    try:
        api.start(cid)
        api.wait(cid)
        out = api.logs(cid, stdout=True, stderr=True)
        assert out == b"hello\n", out
    finally:
        api.remove_container(cid, force=True, v=True)
    return time.perf_counter() - t0


def raw_run(n: int, concurrency: int, mount_dir: str) -> tuple[list[float], float]:
    api = docker.APIClient(version="1.41", timeout=120, max_pool_size=64)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(lambda _: raw_one(api, mount_dir), range(n)))
    wall = time.perf_counter() - t0
    api.close()
    return lat, wall


async def sup_run(
    n: int, concurrency: int, data_dir: Path, url: str, *, internals: bool = True
) -> tuple[list[float], float]:
    internals_module.DOCKER_PY_VERSION = PINNED if internals else "none (--public)"
    spec = TaskSpec(
        image=IMAGE,
        command=["sh", "/workspace/main.sh"],
        files={"main.sh": SCRIPT},
        limits=Limits(),
        retry=RetryPolicy(max_attempts=1),
    )
    cfg = Config(data_dir=str(data_dir), node_id="bench")
    async with open_node(cfg, nats_url=url) as node:
        assert node.runtime.shared_pool is internals
        sem = asyncio.Semaphore(concurrency)
        lat: list[float] = []

        async def one() -> None:
            async with sem:
                t = time.perf_counter()
                r = await node.executor.run(spec)
                lat.append(time.perf_counter() - t)
                assert r.status == "succeeded" and r.stdout == "hello\n", r

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(n)))
        wall = time.perf_counter() - t0
        assert await node.events.flush(30)
    return lat, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=40, help="tasks per measurement (default 40)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    ap.add_argument(
        "--public", action="store_true", help="also measure the supervisor without internals"
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-exec-"))
    server = NatsServer(tmp / "nats")
    url = server.start()
    mount = tmp / "ws"
    mount.mkdir()
    (mount / "main.sh").write_text(SCRIPT)
    mount.chmod(0o755)
    (mount / "main.sh").chmod(0o644)
    try:
        raw_lat: list[float] = []
        sup_lat: list[float] = []
        raw_tp: list[float] = []
        sup_tp: list[float] = []
        pub_lat: list[float] = []
        pub_tp: list[float] = []
        raw_one(docker.APIClient(version="1.41"), str(mount))  # warm-up
        for r in range(args.rounds):
            lat, _ = raw_run(args.tasks, 1, str(mount))
            raw_lat += lat
            lat, _ = asyncio.run(sup_run(args.tasks, 1, tmp / f"d{r}a", url))
            sup_lat += lat
            _, wall = raw_run(args.tasks, args.concurrency, str(mount))
            raw_tp.append(args.tasks / wall)
            _, wall = asyncio.run(sup_run(args.tasks, args.concurrency, tmp / f"d{r}b", url))
            sup_tp.append(args.tasks / wall)
            if args.public:
                lat, _ = asyncio.run(sup_run(args.tasks, 1, tmp / f"d{r}c", url, internals=False))
                pub_lat += lat
                _, wall = asyncio.run(
                    sup_run(args.tasks, args.concurrency, tmp / f"d{r}d", url, internals=False)
                )
                pub_tp.append(args.tasks / wall)
        rm, sm = statistics.median(raw_lat), statistics.median(sup_lat)
        rt, st = statistics.median(raw_tp), statistics.median(sup_tp)
        print(
            f"concurrency 1: raw median {rm * 1000:.1f} ms, supervisor median {sm * 1000:.1f} ms, "
            f"latency ratio {sm / rm:.3f} (target <= 1.15)"
        )
        print(
            f"concurrency {args.concurrency}: raw {rt:.2f} tasks/s, supervisor {st:.2f} tasks/s, "
            f"throughput ratio {st / rt:.3f} (target >= 0.85)"
        )
        if args.public:
            pm, pt = statistics.median(pub_lat), statistics.median(pub_tp)
            print(
                f"public docker-py only: median {pm * 1000:.1f} ms, {pt:.2f} tasks/s; what the "
                f"internals gain: latency {pm / sm:.3f}x, throughput {st / pt:.3f}x"
            )
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
