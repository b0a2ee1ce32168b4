"""gVisor (`runsc`) as a task container's runtime: what the engine registered, the limits
that hold under it, and the evidence of a refused fork.

Under gVisor a task's processes live in an application kernel (the Sentry), and the host's
pids cgroup counts the Sentry's own threads and its ptrace stubs (about 50 before the task
starts, about ten per task process), so it cannot be the task's limit: a small one stops the
sandbox from starting (`urpc ... StartRoot failed: EOF`), one reached later kills the whole
sandbox with its output. So, under gVisor:

- the task's limit is `RLIMIT_NPROC` (`--ulimit nproc=<pids>`), which the Sentry enforces on
  the sandbox's processes: a fork past it is refused with EAGAIN, as the pids cgroup refuses
  it under runc;
- the host's pids cgroup keeps a backstop (`host_pids`) that a task at its own limit never
  reaches;
- the evidence that a fork was refused is the Sentry's own trace of the fork family
  (`--strace --strace-syscalls=clone,fork,vfork`, written to its boot log under
  `--debug-log=<dir>/`, as `scripts/setup` registers it): each `X clone(...) = ...
  errno=11` is one refused fork, the counterpart of the cgroup's `pids.events max`.

The boot log is read when the attempt ends and deleted then; a log that nothing reads
(a supervisor killed meanwhile) is deleted once it is `STALE_S` old. While the task runs
the log is kept under `[sandbox] gvisor_log_max_mb` (`guard`): each fork is about 300 bytes
of it, so a task that forks in a loop past its limit would fill the disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_log = logging.getLogger("supervisor.docker.gvisor")

FORK_SYSCALLS = ("clone", "fork", "vfork")
STALE_S = 24 * 3600.0
"""A boot log untouched this long belongs to no live attempt (deadlines are shorter)."""

_HEAD_BYTES = 8192
_REFUSED = re.compile(
    rb"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ strace\.go:\d+\] \[ *\d+: *\d+\] .* X "
    rb"(?:clone|fork|vfork)\(.*\) = .* errno=11 "
)
_EXEC = re.compile(rb"^[IWE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ kernel\.go:\d+\] EXEC: \[")
_ARGS = re.compile(rb"^[IWE]\d{4} [\d:. ]+ main\.go:\d+\] Args: \[(?P<args>.*)\]$", re.M)


def host_pids(pids: int) -> int:
    """The host pids cgroup's limit of a gVisor sandbox whose task may have `pids`
    processes: the Sentry's own threads plus headroom for each task process."""
    return 128 + 32 * pids


@dataclass(frozen=True)
class RuntimeInfo:
    """One OCI runtime registered with the engine (`docker info` `Runtimes`)."""

    name: str
    path: str
    args: tuple[str, ...] = ()

    @property
    def gvisor(self) -> bool:
        return Path(self.path).name.startswith("runsc")

    @property
    def fork_log_dir(self) -> str | None:
        """The directory of the Sentry's boot logs when they trace the fork family (the
        evidence of a refused fork); None when the runtime was registered without it."""
        if not self.gvisor:
            return None
        opts: dict[str, str] = {}
        for a in self.args:
            name, _, value = a.lstrip("-").partition("=")
            opts[name] = value if "=" in a else "true"
        if opts.get("strace") not in ("true", "1"):
            return None
        traced = [s for s in opts.get("strace-syscalls", "").split(",") if s]
        if traced and not set(FORK_SYSCALLS) <= set(traced):
            return None
        commands = [c for c in opts.get("debug-command", "").split(",") if c]
        if commands and "boot" not in commands:
            return None
        where = opts.get("debug-log", "")
        return where.rstrip("/") if where.endswith("/") and "%" not in where else None


def engine_runtimes(info: dict[str, Any]) -> dict[str, RuntimeInfo]:
    """The runtimes of a `docker info` answer, by name."""
    out: dict[str, RuntimeInfo] = {}
    for name, entry in (info.get("Runtimes") or {}).items():
        entry = entry or {}
        out[name] = RuntimeInfo(
            name=name,
            path=str(entry.get("path") or name),
            args=tuple(str(a) for a in entry.get("runtimeArgs") or ()),
        )
    return out


class BootLogs:
    """The Sentry boot logs of one directory, found by container id (the last word of the
    log's `Args:` line). Blocking (file reads): call from a thread."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self._owner: dict[str, str] = {}  # file name -> container id

    def _find(self, container_id: str) -> Path | None:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return None
        found = None
        now = time.time()
        for name in names:
            if not (name.startswith("runsc.log.") and name.endswith(".boot.txt")):
                continue
            path = self.directory / name
            owner = self._owner.get(name)
            if owner is None:
                owner = _owner_of(path)
                if owner is None:
                    self._stale(path, now)
                    continue
                self._owner[name] = owner
            if owner == container_id:
                found = path
            else:
                self._stale(path, now)
        return found

    def _stale(self, path: Path, now: float) -> None:
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > STALE_S:
                path.unlink()
                self._owner.pop(path.name, None)

    def refused_forks(self, container_id: str, argv_newlines: int = 0) -> int | None:
        """How many forks the Sentry refused for want of processes (EAGAIN) in the sandbox
        of `container_id`; None when its boot log is not found. `argv_newlines`: the line
        breaks in the container's command, whose `EXEC:` record spans that many more lines
        (skipped: a task's own words are never evidence)."""
        path = self._find(container_id)
        if path is None:
            return None
        refused, skip = 0, 0
        try:
            with path.open("rb") as f:
                for line in f:
                    if skip:
                        skip -= 1
                    elif _EXEC.match(line):
                        skip = argv_newlines
                    elif _REFUSED.match(line):
                        refused += 1
        except OSError:
            return None
        return refused

    def guard(self, container_id: str, max_bytes: int) -> bool:
        """Keep the boot log of a running sandbox under `max_bytes`: True when it is larger
        and holds a refused fork (a task forking in a loop past its limit: to be killed);
        a larger log without one (a task that forks a lot, within its limit) is emptied,
        as it holds no evidence."""
        path = self._find(container_id)
        try:
            if path is None or path.stat().st_size <= max_bytes:
                return False
        except OSError:
            return False
        if self.refused_forks(container_id):
            return True
        with contextlib.suppress(OSError):
            os.truncate(path, 0)
        return False

    def discard(self, container_id: str) -> None:
        """Delete the boot log of `container_id` (read, or no longer needed)."""
        self._find(container_id)
        for name, owner in list(self._owner.items()):
            if owner == container_id:
                with contextlib.suppress(OSError):
                    (self.directory / name).unlink()
                self._owner.pop(name, None)


def take_refused_forks(log_dir: str, container_id: str, argv_newlines: int) -> int:
    """Under gVisor: the forks the Sentry refused at the task's process limit (its boot
    log, deleted once read; `supervisor.docker.gvisor`)."""
    logs = boot_logs(log_dir)
    refused = logs.refused_forks(container_id, argv_newlines)
    logs.discard(container_id)
    if refused is None:
        _log.warning("no gVisor boot log of %s under %s", container_id[:12], log_dir)
    return refused or 0


_BOOT_LOGS: dict[str, BootLogs] = {}


def boot_logs(directory: str) -> BootLogs:
    """The process's one `BootLogs` of `directory`."""
    logs = _BOOT_LOGS.get(directory)
    if logs is None:
        logs = _BOOT_LOGS[directory] = BootLogs(directory)
    return logs


def _owner_of(path: Path) -> str | None:
    try:
        with path.open("rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError:
        return None
    m = _ARGS.search(head)
    if m is None:
        return None
    words = m.group("args").split()
    return words[-1].decode(errors="replace") if words else None
