"""What the node observes about its containers, beyond what docker-py calls return:

- `DockerEventWatcher`: one stream of Docker's events for this node's managed containers,
  so a `kill`/`stop`/`destroy` that the supervisor did not issue is seen as evidence.
- `CgroupSampler`: the containers' cgroup counters (pids limit hits, OOM kills), sampled
  while they run because Docker removes the cgroup when the container exits.

Both run one thread each for the whole process, not one per container.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from schemas.labels import node_filter

_CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class ContainerActivity:
    actions: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    died: asyncio.Event = field(default_factory=asyncio.Event)
    destroyed: asyncio.Event = field(default_factory=asyncio.Event)


class DockerEventWatcher:
    """Follows `docker events` for containers labelled managed on this node.

    `expect_kill(cid)` must be called before the supervisor kills a container so that the
    resulting `kill` event is known to be its own; any other `kill` or `stop` is external.
    """

    def __init__(self, client: docker.DockerClient, node_id: str, *, keep: int = 4096) -> None:
        self._client = client
        self._node = node_id
        self._keep = keep
        self._activity: OrderedDict[str, ContainerActivity] = OrderedDict()
        self._own_kills: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: Any = None
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
        }
        while not self._stop.is_set():
            try:
                self._stream = self._client.api.events(decode=True, filters=filters, since=since)
                self.connected.set()
                for ev in self._stream:
                    since = ev.get("time", since)
                    self._deliver(ev)
            except Exception:
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
            with contextlib.suppress(Exception):
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


def _cgroup_files(cid: str) -> tuple[list[Path], list[Path]]:
    """Candidate files for (pids events, memory oom counters), cgroup v1 then v2 layouts."""
    pids = [
        _CGROUP_ROOT / "pids" / "docker" / cid / "pids.events",
        _CGROUP_ROOT / "system.slice" / f"docker-{cid}.scope" / "pids.events",
        _CGROUP_ROOT / "docker" / cid / "pids.events",
    ]
    mem = [
        _CGROUP_ROOT / "memory" / "docker" / cid / "memory.oom_control",
        _CGROUP_ROOT / "system.slice" / f"docker-{cid}.scope" / "memory.events",
        _CGROUP_ROOT / "docker" / cid / "memory.events",
    ]
    return pids, mem


def _parse_counter(text: bytes, key: bytes) -> int | None:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            return int(parts[1])
    return None


class _Counter:
    """One counter file, opened once (a held fd is read with pread: no path walk per
    sample). Reads fail with ENODEV once Docker removed the cgroup."""

    def __init__(self, candidates: list[Path], key: bytes) -> None:
        self.candidates = candidates
        self.key = key
        self.fd: int | None = None
        self.gone = False
        self.best = 0

    def sample(self) -> None:
        if self.gone:
            return
        if self.fd is None:
            for p in self.candidates:
                try:
                    self.fd = os.open(p, os.O_RDONLY)
                    break
                except OSError:
                    continue
            if self.fd is None:
                return
        try:
            value = _parse_counter(os.pread(self.fd, 512, 0), self.key)
        except OSError:
            self.close()
            self.gone = True
            return
        if value is not None and value > self.best:
            self.best = value

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


class CgroupSampler:
    """Samples pids-limit and OOM-kill counters of tracked containers every `interval` s,
    keeping the highest value seen (the cgroup disappears when the container exits)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self._tracked: dict[str, tuple[_Counter, _Counter]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cgroup-sampler", daemon=True)
        self._started = False

    def track(self, cid: str) -> None:
        pids, mem = _cgroup_files(cid)
        with self._lock:
            self._tracked[cid] = (_Counter(pids, b"max"), _Counter(mem, b"oom_kill"))
            if not self._started:
                self._started = True
                self._thread.start()

    def untrack(self, cid: str) -> CgroupCounters:
        """Take a last sample and stop tracking; returns the highest counters seen."""
        with self._lock:
            entry = self._tracked.pop(cid, None)
            if entry is None:
                return CgroupCounters()
            for c in entry:
                c.sample()
                c.close()
        return CgroupCounters(pids_limit_events=entry[0].best, memory_oom_events=entry[1].best)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                for pids, mem in self._tracked.values():
                    pids.sample()
                    mem.sample()

    def stop(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join(timeout=2)
        with self._lock:
            for entry in self._tracked.values():
                for c in entry:
                    c.close()
            self._tracked.clear()
