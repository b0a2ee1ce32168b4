"""What the node observes about its containers, beyond what the engine's calls return:

- `DockerEventWatcher`: one stream of Docker's events for this node's managed containers,
  so a `kill`/`stop`/`destroy` that the supervisor did not issue is seen as evidence.
- `CgroupSampler`: the containers' cgroup counters (pids limit hits, OOM kills), sampled
  while they run because Docker removes the cgroup when the container exits.

Both run one thread each for the whole process, not one per container.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas.errors import DockerError
from schemas.labels import node_filter
from supervisor.docker.runtime import DockerRuntime, EventStream

log = logging.getLogger(__name__)

_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class ContainerActivity:
    actions: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    died: asyncio.Event = field(default_factory=asyncio.Event)
    destroyed: asyncio.Event = field(default_factory=asyncio.Event)


WATCHED_ACTIONS = ("kill", "stop", "die", "destroy")
"""The container actions the watcher follows."""


class DockerEventWatcher:
    """Follows `docker events` for containers labelled managed on this node.

    `expect_kill(cid)` must be called before the supervisor kills a container so that the
    resulting `kill` event is known to be its own; any other `kill` or `stop` is external.
    """

    def __init__(self, runtime: DockerRuntime, node_id: str, *, keep: int = 4096) -> None:
        self._runtime = runtime
        self._node = node_id
        self._keep = keep
        self._activity: OrderedDict[str, ContainerActivity] = OrderedDict()
        self._own_kills: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: EventStream | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)
        self._thread.start()

    async def wait_connected(self, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not self.connected.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return self.connected.is_set()

    def _run(self) -> None:
        since: float | None = None
        filters = {
            "type": "container",
            "label": node_filter(self._node),
            # Only what is read (`_record`, `external_kills`, the pool): a container's
            # create, attach, start, resize... would cost dockerd and this thread for nothing.
            "event": list(WATCHED_ACTIONS),
        }
        while not self._stop.is_set():
            try:
                self._stream = self._runtime.open_events(filters, since)
                self.connected.set()
                for ev in self._stream:
                    since = ev.get("time", since)
                    self._deliver(ev)
            except DockerError as e:
                # The next stream starts at the last event seen: none is lost meanwhile.
                if self.connected.is_set() and not self._stop.is_set():
                    log.warning("docker events interrupted (%s); following again", e)
                self.connected.clear()
            if self._stop.wait(0.5):
                return

    def _deliver(self, ev: dict[str, Any]) -> None:
        cid = ev.get("id") or (ev.get("Actor") or {}).get("ID")
        action = str(ev.get("Action") or ev.get("status") or "")
        attrs = dict((ev.get("Actor") or {}).get("Attributes") or {})
        if cid and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                self._loop.call_soon_threadsafe(self._record, cid, action.split(":")[0], attrs)

    def _record(self, cid: str, action: str, attrs: dict[str, str]) -> None:
        act = self.activity(cid)
        act.actions.append((action, attrs))
        if action in ("die", "destroy"):
            act.died.set()
        if action == "destroy":
            act.destroyed.set()

    def activity(self, cid: str) -> ContainerActivity:
        act = self._activity.get(cid)
        if act is None:
            act = self._activity[cid] = ContainerActivity()
            while len(self._activity) > self._keep:
                self._activity.popitem(last=False)
        return act

    def expect_kill(self, cid: str) -> None:
        self._own_kills[cid] = self._own_kills.get(cid, 0) + 1

    async def wait_died(self, cid: str, timeout: float) -> bool:
        """Wait until Docker reported the container's death, so every event before it is in."""
        if not self.connected.is_set():
            return False
        try:
            await asyncio.wait_for(self.activity(cid).died.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def wait_destroyed(self, cid: str, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.activity(cid).destroyed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def external_kills(self, cid: str) -> tuple[str, ...]:
        """Signals of `kill`/`stop` actions beyond the supervisor's own announced kills."""
        own = self._own_kills.get(cid, 0)
        found: list[str] = []
        for action, attrs in self.activity(cid).actions:
            if action == "kill":
                if own > 0:
                    own -= 1
                    continue
                found.append(_signal_label(attrs.get("signal", "")))
            elif action == "stop" and not found:
                found.append("stop")
            if action == "die":
                break
        return tuple(found)

    def destroyed(self, cid: str) -> bool:
        return any(a == "destroy" for a, _ in self.activity(cid).actions)

    def forget(self, cid: str) -> None:
        self._activity.pop(cid, None)
        self._own_kills.pop(cid, None)

    def stop(self) -> None:
        self._stop.set()
        stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread is not None:
            self._thread.join(timeout=2)


def _signal_label(raw: str) -> str:
    import signal as _signal

    try:
        return _signal.Signals(int(raw)).name
    except (ValueError, TypeError):
        return raw or "unknown"


@dataclass
class CgroupCounters:
    pids_limit_events: int = 0
    memory_oom_events: int = 0
    cpu_time_ns: int | None = None
    """CPU time of all the container's processes; None when it could never be read."""
    peak_memory_bytes: int | None = None


def _cgroup_files(cid: str, controller: str, v2_name: str, v1_name: str) -> list[Path]:
    """Candidate paths of one cgroup file: v1 (cgroupfs driver), then v2 (systemd, cgroupfs)."""
    return [
        _CGROUP_ROOT / controller / "docker" / cid / v1_name,
        _CGROUP_ROOT / "system.slice" / f"docker-{cid}.scope" / v2_name,
        _CGROUP_ROOT / "docker" / cid / v2_name,
    ]


def _parse_counter(text: bytes, key: bytes | None) -> int | None:
    """The value of `key` in a flat keyed file; with `key` None the file's one number.
    (v1 files are one number, or keyed; v2 ones keyed; both read the same way.)"""
    for line in text.splitlines():
        parts = line.split()
        if key is None and len(parts) == 1 and parts[0].isdigit():
            return int(parts[0])
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return None


class _Counter:
    """One counter file, opened once (a held fd is read with pread: no path walk per
    sample). Reads fail with ENODEV once Docker removed the cgroup. `scale` turns the
    file's unit into the counter's (v2 gives CPU time in microseconds, v1 in ns)."""

    def __init__(self, candidates: list[tuple[Path, bytes | None, int]]) -> None:
        self.candidates = candidates
        self.key: bytes | None = None
        self.scale = 1
        self.fd: int | None = None
        self.gone = False
        self.best = 0
        self.seen = False

    def sample(self) -> None:
        if self.gone:
            return
        if self.fd is None:
            for p, key, scale in self.candidates:
                try:
                    self.fd = os.open(p, os.O_RDONLY)
                except OSError:
                    continue
                self.key, self.scale = key, scale
                break
            if self.fd is None:
                return
        try:
            value = _parse_counter(os.pread(self.fd, 512, 0), self.key)
        except OSError:
            self.close()
            self.gone = True
            return
        if value is not None:
            self.seen = True
            self.best = max(self.best, value * self.scale)

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


@dataclass
class _Tracked:
    pids: _Counter
    oom: _Counter
    cpu: _Counter
    memory: _Counter
    cpu_limit_ns: int | None = None
    on_cpu_limit: Callable[[int], None] | None = None

    def counters(self) -> tuple[_Counter, ...]:
        return (self.pids, self.oom, self.cpu, self.memory)

    def sample(self) -> None:
        for c in self.counters():
            c.sample()
        if self.cpu_limit_ns is not None and self.cpu.best > self.cpu_limit_ns:
            fire, self.on_cpu_limit, self.cpu_limit_ns = self.on_cpu_limit, None, None
            if fire is not None:
                fire(self.cpu.best)


def _tracked(cid: str) -> _Tracked:
    def one(
        controller: str, v1: tuple[str, bytes | None, int], v2: tuple[str, bytes | None, int]
    ) -> _Counter:
        first, *v2_paths = _cgroup_files(cid, controller, v2[0], v1[0])
        return _Counter([(first, v1[1], v1[2])] + [(p, v2[1], v2[2]) for p in v2_paths])

    return _Tracked(
        pids=one("pids", ("pids.events", b"max", 1), ("pids.events", b"max", 1)),
        oom=one(
            "memory", ("memory.oom_control", b"oom_kill", 1), ("memory.events", b"oom_kill", 1)
        ),
        cpu=one("cpuacct", ("cpuacct.usage", None, 1), ("cpu.stat", b"usage_usec", 1000)),
        memory=one("memory", ("memory.max_usage_in_bytes", None, 1), ("memory.peak", None, 1)),
    )


class CgroupSampler:
    """Samples the cgroup counters of tracked containers every `interval` s: pids-limit
    hits, OOM kills, CPU time and peak memory, keeping the highest value seen (the cgroup
    disappears when the container exits). A container tracked with a CPU-time limit has
    `on_cpu_limit(used_ns)` called once, from the sampling thread, when it passes it."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cgroup-sampler", daemon=True)
        self._started = False

    def track(
        self,
        cid: str,
        *,
        cpu_limit_ns: int | None = None,
        on_cpu_limit: Callable[[int], None] | None = None,
    ) -> None:
        entry = _tracked(cid)
        entry.cpu_limit_ns, entry.on_cpu_limit = cpu_limit_ns, on_cpu_limit
        with self._lock:
            self._tracked[cid] = entry
            if not self._started:
                self._started = True
                self._thread.start()

    def sample(self, cid: str) -> None:
        """Sample one container now (right after its start: a short-lived one may be gone
        before the sampling thread's next round)."""
        with self._lock:
            entry = self._tracked.get(cid)
            if entry is not None:
                entry.sample()

    def untrack(self, cid: str) -> CgroupCounters:
        """Take a last sample and stop tracking; returns the highest counters seen."""
        with self._lock:
            entry = self._tracked.pop(cid, None)
            if entry is None:
                return CgroupCounters()
            entry.on_cpu_limit = None
            for c in entry.counters():
                c.sample()
                c.close()
        return CgroupCounters(
            pids_limit_events=entry.pids.best,
            memory_oom_events=entry.oom.best,
            cpu_time_ns=entry.cpu.best if entry.cpu.seen else None,
            peak_memory_bytes=entry.memory.best if entry.memory.seen else None,
        )

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                for entry in self._tracked.values():
                    entry.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join(timeout=2)
        with self._lock:
            for entry in self._tracked.values():
                for c in entry.counters():
                    c.close()
            self._tracked.clear()
