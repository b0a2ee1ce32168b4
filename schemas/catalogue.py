"""The error catalogue of the design: every (type, code), whether it is retried by default,
the evidence behind it, and `classify`, the pure function from recorded evidence to an
entry (the executor decides with it; the audit re-runs it over history). The tables in the README and `docs/running.md` are generated
from `ENTRIES` (`python -m schemas.catalogue`), and a test holds them equal."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any, Final, NamedTuple

from msgspec import Struct

from schemas.events import Evidence
from schemas.spec import ErrorType


class Entry(NamedTuple):
    type: ErrorType
    retryable: bool
    evidence: str
    produced: bool = True
    """False: a code of the contract that this version never records (kept for the
    outside tools that name it)."""


ENTRIES: Final[dict[str, Entry]] = {
    "INVALID_SPEC": Entry(
        "validation",
        False,
        "the spec fails the schema or the configured bounds (sizes, retry delays, file "
        "paths), or the engine refused the request (an HTTP 4xx: never retried, never "
        "counted by the breaker)",
    ),
    "IMAGE_NOT_FOUND": Entry("validation", False, "the image is not present locally"),
    "RUNTIME_UNAVAILABLE": Entry(
        "validation",
        False,
        "the OCI runtime the spec (or the node's `[sandbox] runtime`) names is not registered "
        "with the engine (`docker info`): refused before any container, never retried, never "
        "counted by the breaker",
    ),
    "DUPLICATE_TASK_ID": Entry(
        "validation",
        False,
        "a different spec under a task id already known; recorded about the submission "
        "(attempt 0), the task keeps its own outcome",
    ),
    "POLICY_VIOLATION": Entry(
        "security", False, "privileged, cap_add, a network other than none, mounts, a callback"
    ),
    "EXECUTION_TIMEOUT": Entry("timeout", True, "the supervisor's own `kill_issued{timeout}`"),
    "CPU_TIME_EXCEEDED": Entry(
        "timeout",
        False,
        "the supervisor's own `kill_issued{cpu_time}`, from the cgroup's CPU accounting",
    ),
    "OOM_KILLED": Entry(
        "resource",
        False,
        "`State.OOMKilled` or the cgroup's `oom_kill` counter, whatever the exit code (a "
        "child killed for memory fails the task even if the script exits 0)",
    ),
    "PIDS_LIMIT": Entry(
        "resource",
        False,
        "the cgroup's `pids.events max` counter (a fork was refused); under gVisor, the "
        "Sentry's trace of a fork refused with EAGAIN at the task's `RLIMIT_NPROC`",
    ),
    "OUTPUT_LIMIT": Entry("resource", False, "the supervisor's own `kill_issued{output_limit}`"),
    "QUEUE_FULL": Entry(
        "resource",
        True,
        "JetStream refused the submission (per-priority bound): `task.refused`, the id stays free",
    ),
    "HOST_PRESSURE": Entry(
        "resource",
        True,
        "reserved: under host pressure the daemon stops pulling instead, and the task waits",
        produced=False,
    ),
    "DISK_FULL": Entry(
        "resource",
        True,
        "the data dir's free space is under `thresholds.disk_min_free_mb`, or an outbox write "
        "met ENOSPC",
    ),
    "QUERY_MEMORY": Entry(
        "resource", False, "a SQL query went past the projection's memory limit (HTTP 507)"
    ),
    "NONZERO_EXIT": Entry("user_code", False, "a non-zero exit code"),
    "SIGNALED": Entry(
        "user_code",
        False,
        "exit code 128+n with no kill from anyone else; details name the signal",
    ),
    "DOCKER_UNAVAILABLE": Entry("infrastructure", True, "the adapter could not reach the engine"),
    "DOCKER_API_ERROR": Entry("infrastructure", True, "the engine answered with a server error"),
    "CIRCUIT_OPEN": Entry(
        "infrastructure", True, "the Docker breaker is open (HTTP 503 while it is)"
    ),
    "KILLED_EXTERNALLY": Entry(
        "infrastructure",
        True,
        "a Docker `kill`/`stop` event the supervisor did not announce (an engine restart "
        "too), or a kill by a reconciler's cleanup command (`details.by = reconcile`)",
    ),
    "CONTAINER_VANISHED": Entry(
        "infrastructure",
        True,
        "a Docker `destroy` the supervisor did not do, or the container already gone",
    ),
    "SUPERVISOR_LOST": Entry(
        "infrastructure",
        True,
        "a redelivered task whose last attempt never finished, and proof its owner is dead",
    ),
    "REDELIVERY_LIMIT": Entry(
        "infrastructure", False, "the task message was delivered more than `max_deliver` times"
    ),
    "CLEANUP_FAILED": Entry(
        "infrastructure",
        True,
        "reserved: a failed cleanup step is a `cleanup.failed` event naming what is left, "
        "and a leak in `leaked_resources` until the reconciler removes it",
        produced=False,
    ),
    "CANCELLED": Entry(
        "infrastructure",
        False,
        "`DELETE /v1/tasks/{id}`, Ctrl-C on `supervisor run`, or a forced shutdown",
    ),
    "NATS_UNAVAILABLE": Entry(
        "infrastructure",
        True,
        "intake could not make a submission durable: `task.refused`, the id stays free",
    ),
    "INTERNAL_ERROR": Entry(
        "infrastructure",
        False,
        "an unexpected error inside the supervisor during an attempt; cleanup ran, the "
        "details name the error",
    ),
}

# code -> (type, retryable by default)
CATALOGUE: Final[dict[str, tuple[ErrorType, bool]]] = {
    code: (e.type, e.retryable) for code, e in ENTRIES.items()
}

_TYPES: Final = ("validation", "security", "timeout", "resource", "user_code", "infrastructure")


def error_type_of(code: str) -> ErrorType:
    return CATALOGUE[code][0]


def retryable_by_default(code: str) -> bool:
    return CATALOGUE[code][1]


# Classification: a pure function from recorded evidence to the catalogue.
#
# Never looks at message text. The evidence is what the events record (`schemas.Evidence`),
# so the same function can be re-run over history and must give the same answer.
#
# Precedence, strongest cause first: an adapter error (the attempt never ran to an exit),
# removal out of band, an external kill, the kernel's OOM killer (its kill count in the
# cgroup, whatever the exit code), the pids limit, the
# supervisor's own kills (output cap, then CPU time, then the deadline), cancellation, then the exit code
# (a signal death, then a plain non-zero exit). Resource evidence outranks the deadline: a
# fork bomb that also ran out of time failed because of its fork bomb.

_ADAPTER_CODES = {
    "docker_unavailable": "DOCKER_UNAVAILABLE",
    "docker_api_error": "DOCKER_API_ERROR",
    "docker_request_refused": "INVALID_SPEC",
    "docker_error": "DOCKER_API_ERROR",
    "image_not_found": "IMAGE_NOT_FOUND",
    "runtime_unavailable": "RUNTIME_UNAVAILABLE",
    "container_vanished": "CONTAINER_VANISHED",
    "circuit_open": "CIRCUIT_OPEN",
    "invalid_spec": "INVALID_SPEC",
    "policy_violation": "POLICY_VIOLATION",
    "internal": "INTERNAL_ERROR",
}


class Classification(Struct, frozen=True, kw_only=True):
    type: ErrorType
    code: str
    retryable: bool
    message: str
    details: dict[str, Any] = {}


def catalogue_entry(code: str, message: str, **details: Any) -> Classification:
    """The catalogue's entry for `code` (its type and default retryability), with this
    occurrence's message and details."""
    etype, retryable = CATALOGUE[code]
    return Classification(
        type=etype, code=code, retryable=retryable, message=message, details=details
    )


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def _oom(ev: Evidence) -> bool:
    return ev.oom_killed or ev.memory_oom_events > 0


def classify(ev: Evidence) -> Classification | None:
    """None means the attempt succeeded; otherwise the catalogue entry the evidence proves."""
    if ev.adapter_error is not None:
        code = _ADAPTER_CODES.get(ev.adapter_error, "DOCKER_API_ERROR")
        return catalogue_entry(
            code,
            f"{code.lower().replace('_', ' ')} ({ev.adapter_error})",
            adapter_error=ev.adapter_error,
        )
    # A cleanup command whose kill the attempt recorded as its own (`kill_issued{reconcile}`)
    # removes the container too: whether that removal shows before the attempt looks is a
    # race, not a removal out of band.
    if ev.removed_out_of_band and "reconcile" not in ev.kills_issued:
        return catalogue_entry("CONTAINER_VANISHED", "the container was removed out of band")
    if ev.external_kills:
        return catalogue_entry(
            "KILLED_EXTERNALLY",
            "the container was killed or stopped through Docker by someone else",
            signals=list(ev.external_kills),
        )
    # The cgroup's OOM kill count outranks the exit code: a script whose child the kernel
    # killed for memory may still exit 0 (`sort` killed, then `echo survived`).
    killed = bool(ev.kills_issued)
    if not killed and not ev.cancelled and ev.exit_code == 0 and not _oom(ev):
        return None
    if _oom(ev):
        return catalogue_entry(
            "OOM_KILLED",
            "the kernel OOM killer acted in the container's cgroup",
            oom_killed=ev.oom_killed,
            memory_oom_events=ev.memory_oom_events,
        )
    if ev.pids_limit_events > 0:
        return catalogue_entry(
            "PIDS_LIMIT",
            "the process limit was hit: a fork was refused",
            pids_limit_events=ev.pids_limit_events,
        )
    if "output_limit" in ev.kills_issued:
        return catalogue_entry(
            "OUTPUT_LIMIT",
            "output passed its cap; the container was killed",
            stdout_truncated=ev.stdout_truncated,
            stderr_truncated=ev.stderr_truncated,
        )
    if "cpu_time" in ev.kills_issued:
        return catalogue_entry(
            "CPU_TIME_EXCEEDED",
            "the CPU-time limit passed; the container was killed",
            cpu_time_s=ev.cpu_time_s,
        )
    if "timeout" in ev.kills_issued:
        return catalogue_entry(
            "EXECUTION_TIMEOUT", "the wall-clock deadline passed; the container was killed"
        )
    if "reconcile" in ev.kills_issued:
        return catalogue_entry(
            "KILLED_EXTERNALLY",
            "the container was killed by a cleanup command of the reconciler",
            by="reconcile",
        )
    if ev.cancelled or "cancelled" in ev.kills_issued:
        return catalogue_entry("CANCELLED", "the run was cancelled by its supervisor")
    status = ev.exit_code
    if status is None:
        return catalogue_entry("DOCKER_API_ERROR", "the container ended without an exit code")
    if 128 < status <= 128 + 64:
        name = signal_name(status - 128)
        return catalogue_entry(
            "SIGNALED", f"the script died of {name}", signal=name, exit_code=status
        )
    return catalogue_entry(
        "NONZERO_EXIT", f"the script exited with code {status}", exit_code=status
    )


def codes_table() -> str:
    """The README's table: each type and its codes (those never recorded in italics)."""
    rows = ["| type | codes |", "| --- | --- |"]
    for t in _TYPES:
        codes = [f"`{c}`" if e.produced else f"*`{c}`*" for c, e in ENTRIES.items() if e.type == t]
        rows.append(f"| {t} | {', '.join(codes)} |")
    return "\n".join(rows) + "\n"


def evidence_table() -> str:
    """`docs/running.md`'s table: type, code, retried by default, the evidence."""
    rows = ["| type | code | retried | evidence |", "| --- | --- | --- | --- |"]
    for t in _TYPES:
        for c, e in ENTRIES.items():
            if e.type == t:
                rows.append(f"| {t} | {c} | {'yes' if e.retryable else 'no'} | {e.evidence} |")
    return "\n".join(rows) + "\n"


GENERATED: Final = {"README.md": codes_table, "docs/running.md": evidence_table}
_MARK = re.compile(
    r"(<!-- catalogue: generated by python -m schemas.catalogue -->\n)(.*?)(<!-- /catalogue -->)",
    re.S,
)


def with_tables(path: str, text: str) -> str:
    """`text` (the file at `path`) with its generated table made anew."""
    return _MARK.sub(lambda m: m.group(1) + GENERATED[path]() + m.group(3), text)


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    for name in GENERATED:
        f = root / name
        f.write_text(with_tables(name, f.read_text()))
        print(f)
