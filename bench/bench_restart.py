"""Restart after a crash: how long from a new daemon's start to the last orphan removed.

    .venv/bin/python bench/bench_restart.py [--runs 5] [--tasks 3]

Each run, on the default configuration (embedded NATS under a fresh data dir, default
reconcile settings): `supervisor serve` runs `--tasks` long tasks, is killed with SIGKILL,
and is started again on the same data dir; the clock runs from that start (the process
launch) to the moment the last of the dead daemon's containers and workspaces is gone.
The new daemon holds the data dir's lock, so its predecessor is superseded at once: no
waiting for its heartbeat timeout (20 s by default), which is what bounded it before.
Prints each run, the median and the max.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import docker

from supervisor.eventlog.nats_server import resolve_nats_url
from testing.daemon import DaemonProc, submit, task


def _managed(client: docker.DockerClient, node_id: str) -> list[str]:
    flt = {"label": ["supervisor.managed=true", f"supervisor.node={node_id}"]}
    return [c["Id"] for c in client.api.containers(all=True, filters=flt)]


def _wait(cond, timeout: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.02)


def one_run(workdir: Path, client: docker.DockerClient, n: int, i: int) -> float:
    node_id = f"bench{i}t{int(time.time()) % 100000}"
    data = workdir / f"data-{node_id}"
    config = {"node_id": node_id}
    first = DaemonProc(data, None, config).start(timeout=60)
    try:
        url = resolve_nats_url(None, data)  # with the data dir's credentials
        assert url is not None
        for k in range(n):
            spec = task(
                "sleep 300",
                task_id=f"{node_id}-{k}",
                limits={"timeout_s": 600},
                retry={"max_attempts": 1},
            )
            if submit(url, workdir / "client", spec).returncode != 0:
                raise RuntimeError("submit failed")
        _wait(lambda: len(_managed(client, node_id)) == n, 60)
        first.kill()
        second = DaemonProc(data, None, config)
        t0 = time.monotonic()
        second.start(timeout=60)
        try:
            _wait(
                lambda: not _managed(client, node_id) and not any((data / "workspaces").iterdir()),
                120,
            )
            return time.monotonic() - t0
        finally:
            second.stop()
    finally:
        first.stop()
        for cid in _managed(client, node_id):
            client.api.remove_container(cid, force=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=3)
    args = parser.parse_args()
    if args.runs < 1 or args.tasks < 1:
        parser.error("--runs and --tasks must be at least 1")
    client = docker.from_env(timeout=30)
    workdir = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    try:
        times = []
        for i in range(args.runs):
            took = one_run(workdir, client, args.tasks, i)
            times.append(took)
            print(f"run {i + 1}: {took:.2f} s from restart to the last orphan removed")
        print(f"tasks: {args.tasks}, runs: {args.runs}, default configuration")
        print(f"median {statistics.median(times):.2f} s, max {max(times):.2f} s (goal <= 5 s)")
        return 0
    finally:
        client.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
