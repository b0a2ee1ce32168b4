"""A trivial task's round trip over HTTP (`POST /v1/tasks`, then `GET /v1/tasks/{id}?wait`,
through `supervisor.client`) against `supervisor submit --wait` and against raw docker-py
running the same hardened container, one task at a time, in one run.

    .venv/bin/python bench/bench_http.py [--tasks 20] [--burst 120] [--no-brakes] [--no-pool]
        [--against DIR] [--against-config JSON]

A daemon runs on its own nats-server, on the defaults (the host-pressure brakes and the
warm pool included; `--no-brakes`, `--no-pool` turn them off). Rounds alternate: raw docker-py, the HTTP round trip,
`Client.run`, `submit --wait` (a new CLI process each time, as a shell script would use
it: through the data dir's daemon, the quick path), and `submit --wait --nats URL` (the
same straight to NATS), so the machine's drift weighs on all five. Prints the medians and
the ratios to raw. Each supervisor run starts once the pool is full again (a client sending
fewer tasks than the pool refills, about 3 a second at size 2, finds it so); with
`--back-to-back` they follow each other at once and take what is parked.

With `--burst N`, then N trivial tasks submitted at once over HTTP (`submit_many`) and
waited for, against raw docker-py running N containers with 8 threads, alternated (which
side goes first alternates too: each inherits the clean-up of the one before): the
throughput ratio, to the daemon's last answer and to its last container removed (a burst's
removals wait for its tasks: `[scheduling] removal_wait_s`; a round ends only after them),
and the CPU each side's processes spent per task, removals included (read from /proc: on a
host whose cores both sides keep busy, the ratio follows the CPU). With `--against DIR`
(another checkout of this repository, at an older commit say), each burst round runs on a
daemon started from that checkout and on one started from this tree, both fresh, in
alternating order, beside raw docker-py: what a change gained, measured in one run; with
`--against-config JSON` the other daemon's configuration has JSON merged into it (this tree
unless `--against` names another): what a setting gains.
Besides the ratio of the medians it prints each round's own ratio and their median: the
host's speed drifts between rounds by as much as the gap, a round's sides ran back to back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not installed

from bench.bench_executor import IMAGE, SCRIPT, raw_one, raw_run
from schemas import RetryPolicy, TaskSpec
from supervisor.client import Client
from supervisor.eventlog.emitter import new_id
from supervisor.eventlog.nats_server import NatsServer
from testing.daemon import HOST_BRAKES, DaemonProc, remove_managed_containers


def _spec() -> TaskSpec:
    return TaskSpec(
        task_id=f"h-{new_id()[:10]}",
        image=IMAGE,
        command=["sh", "/workspace/main.sh"],
        files={"main.sh": SCRIPT},
        retry=RetryPolicy(max_attempts=1),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--burst", type=int, default=0, metavar="N")
    ap.add_argument("--rounds", type=int, default=2, help="alternated bursts (default 2)")
    ap.add_argument("--no-brakes", action="store_true", help="turn the host-pressure brakes off")
    ap.add_argument("--no-pool", action="store_true", help="turn the warm pool off ([pool] size 0)")
    ap.add_argument(
        "--against",
        metavar="DIR",
        help="with --burst: each round also on a daemon from the checkout DIR (both fresh)",
    )
    ap.add_argument(
        "--against-config",
        metavar="JSON",
        help="with --burst: each round also on a fresh daemon (from DIR, or this tree) with "
        'JSON merged into its configuration, e.g. \'{"scheduling": {"removal_wait_s": 0}}\'',
    )
    ap.add_argument(
        "--back-to-back",
        action="store_true",
        help="start each supervisor run at once, without waiting for the pool to refill",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    server = NatsServer(tmp / "nats")
    url = server.start()
    mount = tmp / "ws"
    mount.mkdir(mode=0o755)
    (mount / "main.sh").write_text(SCRIPT)
    (mount / "main.sh").chmod(0o644)
    brakes = dict.fromkeys(HOST_BRAKES, 0.0) if args.no_brakes else {}
    cfg = {"reconcile": {"enabled": True}, "thresholds": brakes, "pool": {}}
    if args.no_pool:
        cfg["pool"] = {"size": 0}
    daemon = DaemonProc(tmp / "data", url, cfg)
    api = docker.APIClient(version="1.41", timeout=120)
    raw: list[float] = []
    http: list[float] = []
    run: list[float] = []
    cli: list[float] = []
    cli_nats: list[float] = []
    try:
        if args.burst and (args.against or args.against_config):  # fresh daemons, by round
            other = Path(args.against) if args.against else Path(__file__).parent.parent
            changed = json.loads(args.against_config or "{}")
            _burst_trees(args.burst, args.rounds, str(mount), tmp, cfg, other, changed)
            return
        daemon.start(60)

        def ready() -> None:
            if not args.back_to_back and not args.no_pool:
                _pool_full(daemon)

        with _client(daemon) as c:
            c.run(_spec(), timeout_s=60)  # warm up: the image, the projection
            for _ in range(args.tasks):
                raw.append(raw_one(api, str(mount)))

                ready()
                t = time.perf_counter()
                sub = c.submit(_spec())
                view = c.wait(sub.task_id, timeout_s=60)
                http.append(time.perf_counter() - t)
                assert view.result is not None and view.result.stdout == "hello\n", view

                ready()
                t = time.perf_counter()
                result = c.run(_spec(), timeout_s=60)
                run.append(time.perf_counter() - t)
                assert result.stdout == "hello\n", result

                for out, via in ((cli, ()), (cli_nats, ("--nats", url))):
                    ready()
                    t = time.perf_counter()
                    done = subprocess.run(
                        [
                            sys.executable,
                            "-m",
                            "supervisor",
                            "submit",
                            "-",
                            "--wait",
                            "--json",
                            "--data-dir",
                            str(tmp / "data"),
                            *via,
                        ],
                        input=json.dumps(
                            {
                                "image": IMAGE,
                                "command": ["sh", "/workspace/main.sh"],
                                "files": {"main.sh": SCRIPT},
                                "retry": {"max_attempts": 1},
                            }
                        ).encode(),
                        capture_output=True,
                        timeout=120,
                    )
                    out.append(time.perf_counter() - t)
                    assert done.returncode == 0, done.stderr
        r, h, u, s = (statistics.median(x) for x in (raw, http, run, cli))
        print(f"{args.tasks} trivial tasks, one at a time (medians):")
        print(f"  raw docker-py create/start/wait/logs/remove: {r * 1e3:.0f} ms")
        print(f"  HTTP POST + GET ?wait (supervisor.client):  {h * 1e3:.0f} ms  ratio {h / r:.2f}")
        print(f"  Client.run (the same, one call):             {u * 1e3:.0f} ms  ratio {u / r:.2f}")
        print(f"  supervisor submit --wait (a new process):   {s * 1e3:.0f} ms  ratio {s / r:.2f}")
        n = statistics.median(cli_nats)
        print(f"  ... --nats URL (straight to NATS):          {n * 1e3:.0f} ms  ratio {n / r:.2f}")
        print(f"  HTTP / submit --wait: {h / s:.2f}")
        print(f"  warm pool: {_pool_counts(daemon)}")
        if args.burst:
            with _client(daemon) as c:
                _burst(c, args.burst, args.rounds, str(mount))
    finally:
        api.close()
        daemon.stop()
        remove_managed_containers("n1")
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _pool_full(daemon: DaemonProc, size: int = 2, timeout: float = 5.0) -> None:
    """Wait (at most `timeout` s) until the daemon's pool has `size` containers parked, as
    a client sending fewer tasks than the pool refills (about 3 a second at size 2) finds
    it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = daemon.get("/metrics")
        parked = sum(
            float(line.rsplit(" ", 1)[1])
            for line in body.decode().splitlines()
            if line.startswith("supervisor_pool_parked{")
        )
        if parked >= size:
            return
        time.sleep(0.02)


def _pool_counts(daemon: DaemonProc) -> str:
    """The daemon's pool hits and misses so far, from its /metrics."""
    status, body = daemon.get("/metrics")
    counts: dict[str, float] = {}
    for line in body.decode().splitlines():
        for name in ("supervisor_pool_hits_total", "supervisor_pool_misses_total"):
            if line.startswith(name):
                counts[name] = counts.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    hits = counts.get("supervisor_pool_hits_total", 0.0)
    misses = counts.get("supervisor_pool_misses_total", 0.0)
    return f"{hits:.0f} hits, {misses:.0f} misses (status {status})"


def _client(daemon: DaemonProc) -> Client:
    """The daemon's client as a service would use it: not `daemon.client()`, which checks
    every answer against the OpenAPI document (the tests' CPU, not a user's)."""
    return Client(daemon.base_url, token=daemon.token, timeout_s=30)


def _submit_burst(c: Client, n: int) -> None:
    """`n` trivial tasks submitted at once (100 a request), each waited for."""
    specs = [_spec() for _ in range(n)]
    subs = [s for i in range(0, n, 100) for s in c.submit_many(specs[i : i + 100])]
    for sub in subs:
        assert not isinstance(sub, Exception), sub
        view = c.wait(sub.task_id, timeout_s=300)
        assert view.result is not None and view.result.status == "succeeded", view


def _measured(n: int, work: Callable[[], object]) -> tuple[float, dict[str, float]]:
    """Tasks a second of `work` (n tasks), and the CPU per task of each process group."""
    before = _cpu_by_process()
    t = time.perf_counter()
    work()
    return n / (time.perf_counter() - t), _cpu_since(before, n)


def _removed(api: docker.APIClient) -> None:
    """Wait until no finished task's container is left: a burst's removals wait for its
    tasks (`[scheduling] removal_wait_s`), and the round is not over before them."""
    while api.containers(
        all=True, filters={"label": "supervisor.managed=true", "status": "exited"}
    ):
        time.sleep(0.02)


def _burst(c: Client, n: int, rounds: int, mount: str) -> None:
    rates: dict[str, list[float]] = {"raw": [], "ours": [], "removed": []}
    cpu: dict[str, list[dict[str, float]]] = {"raw": [], "ours": [], "removed": []}
    api = docker.APIClient(version="1.41", timeout=120)
    for r in range(rounds):
        # Alternating which side goes first: each side inherits the engine's and the
        # kernel's clean-up of the one before it.
        for side in ("raw", "ours") if r % 2 == 0 else ("ours", "raw"):
            if side == "raw":
                rate, used = _measured(n, lambda: raw_run(n, 8, mount))
                rates["raw"].append(rate)
                cpu["raw"].append(used)
                continue
            # Ours twice: to its last answer, and to its last container removed (the CPU
            # per task is counted to the latter, removals included).
            before, t = _cpu_by_process(), time.perf_counter()
            _submit_burst(c, n)
            rates["ours"].append(n / (time.perf_counter() - t))
            _removed(api)
            rates["removed"].append(n / (time.perf_counter() - t))
            used = _cpu_since(before, n)
            cpu["ours"].append(used)
            cpu["removed"].append(used)
    api.close()
    print(f"{n} trivial tasks at once, {rounds} alternated rounds (medians):")
    labels = {
        "raw": "raw docker-py, 8 threads",
        "ours": "HTTP, the daemon's defaults, to the last answer",
        "removed": "the same, to the last container removed",
    }
    _report(rates, cpu, labels)


def _burst_trees(
    n: int,
    rounds: int,
    mount: str,
    tmp: Path,
    cfg: dict[str, Any],
    other: Path,
    changed: dict[str, Any],
) -> None:
    """Each round: raw docker-py, then a fresh daemon from `other` (its configuration with
    `changed` merged in) and one from this tree (each on its own nats-server), in
    alternating order."""
    here = Path(__file__).resolve().parent.parent
    trees = {"other": other.resolve(), "this": here}
    cfgs = {"other": _merged(cfg, changed), "this": cfg}
    rates: dict[str, list[float]] = {k: [] for k in ("raw", "other", "this")}
    rates |= {"other removed": [], "this removed": []}
    cpu: dict[str, list[dict[str, float]]] = {k: [] for k in rates}
    api = docker.APIClient(version="1.41", timeout=120)
    try:
        for r in range(rounds):
            rate, used = _measured(n, lambda: raw_run(n, 8, mount))
            rates["raw"].append(rate)
            cpu["raw"].append(used)
            for side in ("other", "this") if r % 2 == 0 else ("this", "other"):
                os.chdir(trees[side])  # `python -m supervisor` runs the tree it starts in
                server = NatsServer(tmp / f"nats-{side}-{r}")
                daemon = DaemonProc(tmp / f"data-{side}-{r}", server.start(), cfgs[side])
                try:
                    daemon.start(60)
                    with _client(daemon) as c:
                        c.run(_spec(), timeout_s=60)  # warm up: the image, the projection
                        time.sleep(2)
                        before, t = _cpu_by_process(), time.perf_counter()
                        _submit_burst(c, n)
                        rate = n / (time.perf_counter() - t)
                        _removed(api)
                        rates[f"{side} removed"].append(n / (time.perf_counter() - t))
                        used = _cpu_since(before, n)
                        cpu[f"{side} removed"].append(used)
                finally:
                    daemon.stop()
                    remove_managed_containers("n1")
                    server.stop()
                rates[side].append(rate)
                cpu[side].append(used)
            print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}/s" for k, v in rates.items()))
    finally:
        api.close()
        os.chdir(here)
    print(f"{n} trivial tasks at once, {rounds} alternated rounds (medians):")
    labels = {
        "raw": "raw docker-py, 8 threads",
        "other": f"daemon from {other}" + (f" with {json.dumps(changed)}" if changed else ""),
        "this": "daemon from this tree",
        "other removed": "  the first, to its last container removed",
        "this removed": "  the second, to its last container removed",
    }
    _report(rates, cpu, labels)


def _merged(base: dict[str, Any], changed: dict[str, Any]) -> dict[str, Any]:
    """`base` with the tables of `changed` merged into its own (one level deep)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in changed.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def _report(
    rates: dict[str, list[float]], cpu: dict[str, list[dict[str, float]]], labels: dict[str, str]
) -> None:
    raw = statistics.median(rates["raw"])
    for side, label in labels.items():
        rate = statistics.median(rates[side])
        # Each round's own ratio too: the host's speed drifts between rounds as much as
        # the gap, and a round's sides ran back to back.
        paired = [r / w for r, w in zip(rates[side], rates["raw"], strict=True)]
        rounds = ", ".join(f"{r:.2f}" for r in paired)
        print(
            f"  {label}: {rate:.2f} tasks/s  ratio {rate / raw:.2f}"
            + (
                f"  (by round: {rounds}; median {statistics.median(paired):.2f})"
                if side != "raw"
                else ""
            )
        )
    print("  CPU per task (ms, medians over rounds; read from /proc, so approximate):")
    for side, label in labels.items():
        groups = sorted({g for d in cpu[side] for g in d})
        per = {g: statistics.median(d.get(g, 0.0) for d in cpu[side]) for g in groups}
        shown = ", ".join(f"{g} {v:.1f}" for g, v in sorted(per.items(), key=lambda kv: -kv[1]))
        print(f"    {label}: total {sum(per.values()):.0f} ({shown})")


_GROUPS = {"dockerd": "dockerd", "containerd": "containerd", "nats-server": "nats-server"}


def _cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of each process group on the host: the engine (dockerd,
    containerd, the shims; runc and the containers' processes are counted where they are
    reaped), nats-server, the daemon (its event loop and its other threads) and its
    projection, the kernel's workers, the rest.
    Children reaped are included (`cutime`/`cstime`)."""
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = (
                Path(f"/proc/{pid}/cmdline")
                .read_bytes()
                .replace(b"\0", b" ")
                .decode(errors="replace")
            )
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        f = stat[stat.rindex(")") + 2 :].split()
        if int(pid) == os.getpid():
            group = "this benchmark"
        elif "projection_service" in cmd:
            group = "projection"
        elif "supervisor serve" in cmd:
            # Its event loop (the main thread) apart from its other threads: the sampler,
            # the attach readers, the engine's and the fsyncs' workers.
            try:
                loop = Path(f"/proc/{pid}/task/{pid}/stat").read_text()
            except OSError:
                continue
            own = sum(int(x) for x in loop[loop.rindex(")") + 2 :].split()[11:13]) / hz
            out["daemon's event loop"] = out.get("daemon's event loop", 0.0) + own
            out["daemon's threads"] = out.get("daemon's threads", 0.0) - own
            group = "daemon's threads"
        elif comm.startswith("containerd-shim"):
            group = "shims"
        elif comm.startswith("kworker"):
            group = "kernel workers"
        else:
            group = _GROUPS.get(comm, "runc, containers, other")
        out[group] = out.get(group, 0.0) + sum(int(x) for x in f[11:15]) / hz
    return out


def _cpu_since(before: dict[str, float], n: int) -> dict[str, float]:
    """Milliseconds of CPU per task of each group since `before` (groups that gained)."""
    now = _cpu_by_process()
    return {g: (v - before.get(g, 0.0)) * 1e3 / n for g, v in now.items() if v > before.get(g, 0.0)}


if __name__ == "__main__":
    main()
