"""Admission of pulled work: may this node start another task now?

Pure: a function of what runs now (the memory limit of each running task), the node's
bounds, the host pressure and the Docker breaker. Nothing here does I/O.

A node pulls only while the Docker breaker is closed, the host is under every pressure
threshold, fewer than `concurrency` tasks run and some memory budget is left. A task of M
MB then fits when the memory limits of the running tasks plus M stay within the budget.
A task larger than the whole budget is admitted alone (when nothing else runs): otherwise
it would be held at the head of its priority forever and block everything behind it.
Admission bounds (`Bounds.max_memory_mb`) are what keeps such tasks out in the first place.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Literal

from msgspec import Struct

from schemas import BreakerStatus

Reason = Literal["ok", "breaker", "pressure", "concurrency", "memory"]


class Verdict(Struct, frozen=True, kw_only=True):
    """`ok`: the answer. `reason`: the first bound that refused (or `ok`). `message`: for a
    log line or a readiness check."""

    ok: bool
    reason: Reason = "ok"
    message: str = ""

    def __bool__(self) -> bool:
        return self.ok


_OK = Verdict(ok=True)


def fits_budget(
    memory_mb: int, running: Sequence[int], *, concurrency: int, memory_budget_mb: int
) -> bool:
    """Whether a task of `memory_mb` may start beside the `running` ones (their memory
    limits), counting only the node's own bounds: fewer than `concurrency` running and the
    sum of limits within `memory_budget_mb` (a task larger than the budget fits alone)."""
    return _bounds(memory_mb, running, concurrency, memory_budget_mb).ok


def can_pull_any(
    running: Sequence[int],
    *,
    concurrency: int,
    memory_budget_mb: int,
    pressure: Collection[str] = (),
    breaker: BreakerStatus = "closed",
) -> Verdict:
    """Whether this node should pull at all: breaker closed, no pressure (`pressure` names
    the metrics over their threshold), a free slot and some budget left."""
    refused = _environment(pressure, breaker)
    if refused is not None:
        return refused
    if len(running) >= concurrency:
        return _concurrency(running, concurrency)
    used = sum(running)
    if running and used >= memory_budget_mb:
        return Verdict(
            ok=False,
            reason="memory",
            message=f"memory budget used: {used} of {memory_budget_mb} MB",
        )
    return _OK


def fits(
    task_memory_mb: int,
    running: Sequence[int],
    *,
    concurrency: int,
    memory_budget_mb: int,
    pressure: Collection[str] = (),
    breaker: BreakerStatus = "closed",
) -> Verdict:
    """Whether a task of `task_memory_mb` may start now (everything `can_pull_any` checks,
    and its own memory limit within what is left of the budget)."""
    refused = _environment(pressure, breaker)
    if refused is not None:
        return refused
    return _bounds(task_memory_mb, running, concurrency, memory_budget_mb)


def _environment(pressure: Collection[str], breaker: BreakerStatus) -> Verdict | None:
    if breaker != "closed":
        return Verdict(ok=False, reason="breaker", message=f"the Docker breaker is {breaker}")
    if pressure:
        return Verdict(
            ok=False,
            reason="pressure",
            message="host under pressure: " + ", ".join(sorted(pressure)),
        )
    return None


def _concurrency(running: Sequence[int], concurrency: int) -> Verdict:
    return Verdict(
        ok=False, reason="concurrency", message=f"{len(running)} of {concurrency} slots in use"
    )


def _bounds(memory_mb: int, running: Sequence[int], concurrency: int, budget: int) -> Verdict:
    if len(running) >= concurrency:
        return _concurrency(running, concurrency)
    if not running:
        return _OK
    used = sum(running)
    if used + memory_mb > budget:
        return Verdict(
            ok=False,
            reason="memory",
            message=f"{memory_mb} MB does not fit: {used} of {budget} MB in use",
        )
    return _OK
