"""A chaos run: a daemon runs a stream of mixed tasks while its daemon is killed with
SIGKILL, its NATS server is killed and started again, its Docker engine (a private
dockerd) is restarted, task containers are removed out of band, and tasks waiting for
their retry are cancelled, at moments drawn from a seeded RNG. Then everything is brought back, the tasks
are left to end, and the run checks what must hold whatever failed:

- every submitted task has exactly one terminal event;
- the audit of the stream's whole history finds no violation;
- no managed container of the run's node and no workspace is left;
- every outbox is empty;
- no event id is stored twice in the stream.

Used by the suite (`tests/test_chaos.py`, bounded) and by `bench/soak.py` (long). Real
parts only: a real nats-server, a real dockerd, `supervisor serve` as users start it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import urllib.error
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from projections.audit import audit_records, records_of
from schemas import (
    TERMINAL_TASK_EVENTS,
    CleanupSucceeded,
    Event,
    PoolAdopted,
    PoolParked,
    PoolRetired,
    ReconcileDecision,
    ReconcileOutcome,
)
from supervisor.eventlog.nats_server import NatsServer
from supervisor.eventlog.outbox import Outbox
from testing.daemon import SANDBOX_IMAGE, DaemonProc
from testing.dockerd import PrivateDockerd

# The mix: (script, limits, retry) - quick successes, user errors, slower tasks that faults
# will catch running, and timeouts that are retried.
_KINDS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("echo ok", {}, {"max_attempts": 3, "base_delay_s": 0.2}),
    ("exit 3", {}, {"max_attempts": 1}),
    ("sleep 2; echo slow", {"timeout_s": 30}, {"max_attempts": 4, "base_delay_s": 0.2}),
    ("sleep 4; echo slower", {"timeout_s": 30}, {"max_attempts": 4, "base_delay_s": 0.2}),
    ("sleep 5", {"timeout_s": 1}, {"max_attempts": 2, "base_delay_s": 0.2}),
    # A long, fixed backoff: what a cancel finds waiting for its retry.
    ("sleep 5", {"timeout_s": 0.5}, {"max_attempts": 3, "base_delay_s": 6, "jitter": False}),
]


@dataclass
class ChaosReport:
    seed: int
    tasks: int = 0
    daemon_kills: int = 0
    nats_restarts: int = 0
    containers_removed: int = 0
    dockerd_restarts: int = 0
    cancels: int = 0
    events: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    pool: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"seed {self.seed}: {self.tasks} tasks, {self.daemon_kills} daemon kills, "
            f"{self.nats_restarts} NATS restarts, {self.dockerd_restarts} dockerd restarts, "
            f"{self.containers_removed} containers removed, {self.cancels} cancels in "
            f"backoff, {self.events} events, outcomes {dict(self.outcomes)}, "
            f"warm pool {dict(self.pool)}, violations: {len(self.violations)}"
        )


class _Chaos:
    def __init__(self, workdir: Path, seed: int, node_id: str, engine: PrivateDockerd) -> None:
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.node_id = node_id
        self.data = workdir / "data"
        self.server = NatsServer(workdir / "nats-store")
        self.engine = engine
        self.config = {
            "node_id": node_id,
            "pool": {},  # the warm pool of the defaults: its containers are faulted too
            "docker_url": engine.url,
            "scheduling": {
                "concurrency": 4,
                "ack_wait_s": 3,
                "ack_progress_s": 1,
                "max_deliver": 8,
                "shutdown_grace_s": 20,
            },
            "reconcile": {
                "interval_s": 1,
                "heartbeat_s": 0.5,
                "heartbeat_timeout_s": 3,
                "creation_grace_s": 2,
                "lost_attempt_grace_s": 6,
                "command_backoff_s": 0.2,
                "command_backoff_max_s": 1,
            },
        }
        self.daemon: DaemonProc | None = None
        self.docker = docker.DockerClient(base_url=engine.url, timeout=30)
        self.report = ChaosReport(seed)
        self.specs: dict[str, dict[str, Any]] = {}

    # --- parts ------------------------------------------------------------------------------

    def start_daemon(self) -> None:
        self.daemon = DaemonProc(self.data, self.server.url, self.config).start(timeout=60)

    def kill_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()
        self.report.daemon_kills += 1

    def restart_nats(self) -> None:
        proc = self.server.proc
        assert proc is not None
        proc.kill()
        proc.wait()
        self.server.stop()
        time.sleep(self.rng.uniform(0.2, 2.0))
        self.server.start()
        self.report.nats_restarts += 1

    def restart_dockerd(self) -> None:
        """SIGTERM (dockerd stops its containers), a pause, start again."""
        self.engine.stop()
        time.sleep(self.rng.uniform(0.5, 3.0))
        self.engine.start()
        self.report.dockerd_restarts += 1

    def cancel_one_in_backoff(self) -> None:
        """DELETE a task that waits for its retry, if the projection shows one."""
        daemon = self.daemon
        if daemon is None or daemon.proc is None or daemon.proc.poll() is not None:
            return
        try:
            status, body = daemon.get("/v1/tasks?state=retrying&limit=20")
            retrying = [t["task_id"] for t in json.loads(body)["tasks"]] if status == 200 else []
            if retrying:
                status, _ = daemon.request("DELETE", f"/v1/tasks/{self.rng.choice(retrying)}")
                self.report.cancels += status == 202
        except (OSError, urllib.error.URLError):
            return

    def remove_a_container(self) -> None:
        flt = {"label": ["supervisor.managed=true", f"supervisor.node={self.node_id}"]}
        try:
            found = self.docker.api.containers(filters=flt)
        except docker.errors.DockerException:
            return
        if found:
            with contextlib.suppress(docker.errors.APIError):
                self.docker.api.remove_container(self.rng.choice(found)["Id"], force=True)
                self.report.containers_removed += 1

    def submit(self, task_id: str) -> None:
        """POST the spec, again and again under the same id until the daemon answers: the
        submission is idempotent by id."""
        spec = self.specs[task_id]
        for _ in range(100):
            daemon = self.daemon
            if daemon is not None and daemon.proc is not None and daemon.proc.poll() is None:
                try:
                    status, _ = daemon.request("POST", "/v1/tasks", json.dumps(spec).encode())
                except (OSError, urllib.error.URLError):
                    status = 0
                if status in (200, 202):
                    return
            time.sleep(0.3)
        raise AssertionError(f"task {task_id} could not be submitted")

    # --- the run ----------------------------------------------------------------------------

    def run(self, n_tasks: int, fault_s: float, settle_s: float) -> ChaosReport:
        self.server.start()
        try:
            self.start_daemon()
            for i in range(n_tasks):
                script, limits, retry = self.rng.choice(_KINDS)
                task_id = f"chaos-{i:04d}-{uuid.uuid4().hex[:6]}"
                self.specs[task_id] = {
                    "image": SANDBOX_IMAGE,
                    "command": ["sh", "-c", script],
                    "task_id": task_id,
                    "limits": limits,
                    "retry": retry,
                }
            ids = list(self.specs)
            self.report.tasks = len(ids)
            end = time.monotonic() + fault_s
            next_fault = time.monotonic() + self.rng.uniform(1, 4)
            pending = list(ids)
            while pending or time.monotonic() < end:
                if pending:
                    self.submit(pending.pop(0))
                    time.sleep(self.rng.uniform(0.0, fault_s / max(n_tasks, 1)))
                else:
                    time.sleep(0.1)
                if time.monotonic() >= next_fault and time.monotonic() < end:
                    self._fault()
                    next_fault = time.monotonic() + self.rng.uniform(2, 6)
            self._settle(ids, settle_s)
            assert self.daemon is not None
            self.daemon.stop()
            self._check(ids)
        finally:
            if self.daemon is not None:
                self.daemon.stop()
            self.server.stop()
            self._remove_leftovers()
            self.docker.close()
        return self.report

    def _fault(self) -> None:
        kind = self.rng.choice(["daemon", "nats", "dockerd", "container", "cancel", "cancel"])
        if kind == "daemon":
            self.kill_daemon()
            time.sleep(self.rng.uniform(0.2, 1.5))
            self.start_daemon()
        elif kind == "nats":
            self.restart_nats()
        elif kind == "dockerd":
            self.restart_dockerd()
        elif kind == "cancel":
            self.cancel_one_in_backoff()
        else:
            self.remove_a_container()

    def _settle(self, ids: list[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            events = self._events()
            ended = {e.task_id for e in events if isinstance(e, TERMINAL_TASK_EVENTS)}
            parked, parked_ws = self._live_parked()
            if (
                set(ids) <= ended
                and not set(self._managed()) - parked
                and not set(self._workspaces()) - parked_ws
                and not _open_commands(events)
            ):
                return
            time.sleep(1.0)
        # Checked below, with what is missing named.

    # --- the checks -------------------------------------------------------------------------

    def _check(self, ids: list[str]) -> None:
        events = self._events()
        r = self.report
        r.events = len(events)
        terminal = Counter(e.task_id for e in events if isinstance(e, TERMINAL_TASK_EVENTS))
        for t in ids:
            if terminal[t] != 1:
                r.violations.append(f"task {t} has {terminal[t]} terminal events")
        r.outcomes = Counter(
            type(e).__name__ for e in events if isinstance(e, TERMINAL_TASK_EVENTS)
        )
        r.violations += [
            f"audit: {v.rule} {v.task_id} {v.seqs}" for v in audit_records(records_of(events))
        ]
        r.violations += _pool_accounting(events, r.pool)
        dup = [i for i, n in Counter(e.event_id for e in events).items() if n > 1]
        r.violations += [f"event id {i} stored twice" for i in dup]
        r.violations += [f"container {c[:12]} left" for c in self._managed()]
        r.violations += [f"workspace {w} left" for w in self._workspaces()]
        with Outbox(self.data / "outbox", f"check-{uuid.uuid4().hex[:8]}") as box:
            left = box.adopt_orphans()
        if left:
            r.violations.append(f"{left} events left in the outboxes")

    def _events(self) -> list[Event]:
        from testing.stream import stream_events

        return asyncio.run(stream_events(self.server.url))

    def _managed(self) -> list[str]:
        flt = {"label": ["supervisor.managed=true", f"supervisor.node={self.node_id}"]}
        return [c["Id"] for c in self.docker.api.containers(all=True, filters=flt)]

    def _live_parked(self) -> tuple[set[str], set[str]]:
        """The containers (and their workspaces) parked by the live daemon's warm pool:
        its own until it stops. A dead instance's must be gone like any leftover."""
        try:
            live = json.loads((self.data / "daemon.lock").read_text())["instance_id"]
        except (OSError, ValueError, KeyError):
            return set(), set()
        flt = {"label": [f"supervisor.node={self.node_id}", f"supervisor.instance={live}"]}
        found = [
            c
            for c in self.docker.api.containers(all=True, filters=flt)
            if "supervisor.pool" in (c.get("Labels") or {})
        ]
        return {c["Id"] for c in found}, {c["Labels"]["supervisor.workspace"] for c in found}

    def _workspaces(self) -> list[str]:
        root = self.data / "workspaces"
        return sorted(str(p) for p in root.iterdir()) if root.exists() else []

    def _remove_leftovers(self) -> None:
        for cid in self._managed():
            with contextlib.suppress(docker.errors.APIError):
                self.docker.api.remove_container(cid, force=True)


def _open_commands(events: list[Event]) -> set[str]:
    """Commands ordered by a decision with no final outcome yet: one whose executor was
    killed mid-way is carried out again once its delivery's ack wait has passed."""
    ordered = {
        e.command_id
        for e in events
        if isinstance(e, ReconcileDecision) and not e.dry_run and e.command_id
    }
    done = {e.command_id for e in events if isinstance(e, ReconcileOutcome) and e.final}
    return ordered - done


def _pool_accounting(events: list[Event], counts: Counter[str]) -> list[str]:
    """Every parked container was adopted by one attempt, retired by its pool, or removed
    by a cleanup (the reconciler's, once its instance died): never lost, never adopted
    twice. Fills `counts` (parked, adopted, retired by reason, removed by a cleanup)."""
    parked: dict[str, Counter[str]] = {}
    removed: set[str] = set()
    for e in events:
        if isinstance(e, PoolParked):
            parked.setdefault(e.container_id, Counter())["parked"] += 1
            counts["parked"] += 1
        elif isinstance(e, PoolAdopted):
            parked.setdefault(e.container_id, Counter())["adopted"] += 1
            counts["adopted"] += 1
        elif isinstance(e, PoolRetired):
            parked.setdefault(e.container_id, Counter())["retired"] += 1
            counts[f"retired_{e.reason}"] += 1
        elif isinstance(e, CleanupSucceeded) and e.step == "remove_container":
            removed.add(e.resource)
    out = []
    for cid, seen in parked.items():
        if seen["adopted"] > 1:
            out.append(f"parked container {cid[:12]} adopted {seen['adopted']} times")
        if not (seen["adopted"] or seen["retired"] or cid in removed):
            out.append(f"parked container {cid[:12]} neither adopted, retired nor removed")
        elif not seen["adopted"] and not seen["retired"]:
            counts["removed_by_cleanup"] += 1
    return out


def run_chaos(
    workdir: Path, *, seed: int, tasks: int, fault_s: float, settle_s: float = 90.0
) -> ChaosReport:
    """One chaos run in `workdir` (left for the caller to remove), on a private dockerd
    that it may restart, removed at the end."""
    node_id = f"chaos{uuid.uuid4().hex[:6]}"
    engine = PrivateDockerd(workdir / "dk").start()
    try:
        engine.load_sandbox_image()
        return _Chaos(workdir, seed, node_id, engine).run(tasks, fault_s, settle_s)
    finally:
        engine.destroy()
