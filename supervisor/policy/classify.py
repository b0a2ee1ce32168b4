"""Classification: a pure function from recorded evidence to the error catalogue.

Never looks at message text. The evidence is what the events record (`schemas.Evidence`),
so the same function can be re-run over history and must give the same answer.

Precedence, strongest cause first: an adapter error (the attempt never ran to an exit),
removal out of band, an external kill, the kernel's OOM killer (its kill count in the
cgroup, whatever the exit code), the pids limit, the
supervisor's own kills (output cap, then CPU time, then the deadline), cancellation, then the exit code
(a signal death, then a plain non-zero exit). Resource evidence outranks the deadline: a
fork bomb that also ran out of time failed because of its fork bomb.
"""

from __future__ import annotations

import signal
from typing import Any

from msgspec import Struct

from schemas import CATALOGUE, ErrorType, Evidence

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


_make = catalogue_entry


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
        return _make(
            code,
            f"{code.lower().replace('_', ' ')} ({ev.adapter_error})",
            adapter_error=ev.adapter_error,
        )
    # A cleanup command whose kill the attempt recorded as its own (`kill_issued{reconcile}`)
    # removes the container too: whether that removal shows before the attempt looks is a
    # race, not a removal out of band.
    if ev.removed_out_of_band and "reconcile" not in ev.kills_issued:
        return _make("CONTAINER_VANISHED", "the container was removed out of band")
    if ev.external_kills:
        return _make(
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
        return _make(
            "OOM_KILLED",
            "the kernel OOM killer acted in the container's cgroup",
            oom_killed=ev.oom_killed,
            memory_oom_events=ev.memory_oom_events,
        )
    if ev.pids_limit_events > 0:
        return _make(
            "PIDS_LIMIT",
            "the process limit was hit: a fork was refused",
            pids_limit_events=ev.pids_limit_events,
        )
    if "output_limit" in ev.kills_issued:
        return _make(
            "OUTPUT_LIMIT",
            "output passed its cap; the container was killed",
            stdout_truncated=ev.stdout_truncated,
            stderr_truncated=ev.stderr_truncated,
        )
    if "cpu_time" in ev.kills_issued:
        return _make(
            "CPU_TIME_EXCEEDED",
            "the CPU-time limit passed; the container was killed",
            cpu_time_s=ev.cpu_time_s,
        )
    if "timeout" in ev.kills_issued:
        return _make(
            "EXECUTION_TIMEOUT", "the wall-clock deadline passed; the container was killed"
        )
    if "reconcile" in ev.kills_issued:
        return _make(
            "KILLED_EXTERNALLY",
            "the container was killed by a cleanup command of the reconciler",
            by="reconcile",
        )
    if ev.cancelled or "cancelled" in ev.kills_issued:
        return _make("CANCELLED", "the run was cancelled by its supervisor")
    status = ev.exit_code
    if status is None:
        return _make("DOCKER_API_ERROR", "the container ended without an exit code")
    if 128 < status <= 128 + 64:
        name = signal_name(status - 128)
        return _make("SIGNALED", f"the script died of {name}", signal=name, exit_code=status)
    return _make("NONZERO_EXIT", f"the script exited with code {status}", exit_code=status)
