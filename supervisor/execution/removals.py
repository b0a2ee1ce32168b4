"""Removals that yield to waiting work.

An attempt whose container exited on its own has its outcome recorded and answered first,
and its container and workspace removed afterwards (`AttemptRunner._defer_cleanup`). While
tasks wait for a slot on this node (`busy`), such a removal waits too, and those waiting
keep waiting until no task runs here any more (`active`), so that the engine's time goes to
the tasks first: a burst's results come sooner, and its removals follow once it is over.
A removal that finds no task waiting goes at once, unless others wait and tasks waited in
the last `tail_s` (the burst's last tasks): under steady load with an empty queue nothing
waits. A removal waits no longer than `max_wait_s` (kept under half the reconciler's
`creation_grace_s`, which spares a live instance's exited container for that long after
its attempt ended), never while the disk brake is on (`low_disk`), and never while more
than `max_waiting` others wait (the oldest goes first). Its events are an immediate
removal's, only later: `cleanup.succeeded` (or `cleanup.failed`, a recorded leak). A daemon
killed while removals wait leaves exited containers of a dead instance: the next reconcile
pass removes them (`orphan_container`).

Pure asyncio: the scheduler gives `busy` (its backlog) and `active` (tasks running), the
daemon `low_disk` (its disk brake).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Callable

from schemas.config import Config
from supervisor.observability.metrics import Metrics

__all__ = ["RemovalGate"]

_POLL_S = 0.1
_TAIL_S = 2.0


class RemovalGate:
    """`turn()` returns when a deferred removal may run; `waiting` is how many wait now."""

    def __init__(
        self,
        *,
        max_wait_s: float = 0.0,
        max_waiting: int = 0,
        busy: Callable[[], bool] = lambda: False,
        active: Callable[[], bool] = lambda: False,
        low_disk: Callable[[], bool] = lambda: False,
        poll_s: float = _POLL_S,
        tail_s: float = _TAIL_S,
    ) -> None:
        self.max_wait_s = max_wait_s
        self.max_waiting = max_waiting
        self.busy = busy
        self.active = active
        self.low_disk = low_disk
        self.poll_s = poll_s
        self.tail_s = tail_s
        self._busy_at = -math.inf  # loop time tasks were last seen waiting for a slot
        self.on_defer: Callable[[], None] = lambda: None
        self._queue: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._watch: asyncio.Task[None] | None = None
        self._open = True

    @classmethod
    def configured(cls, config: Config, metrics: Metrics) -> RemovalGate:
        """A gate with `[scheduling] removal_wait_s` and `removal_max_waiting`, counted in
        `metrics`; it holds nothing until its owner gives it `busy` (the scheduler does)."""
        sc = config.scheduling
        gate = cls(
            max_wait_s=min(sc.removal_wait_s, config.reconcile.creation_grace_s / 2),
            max_waiting=sc.removal_max_waiting,
        )
        gate.on_defer = metrics.removals_deferred.inc
        metrics.removals_waiting.set_function(lambda: gate.waiting)
        return gate

    @property
    def waiting(self) -> int:
        return sum(1 for _, f in self._queue if not f.done())

    def _hold(self, *, waiting: bool) -> bool:
        """Whether a removal waits now: a new one while tasks wait for a slot, or while
        others wait and tasks waited a moment ago; one waiting already while tasks run."""
        if not self._open or self.max_wait_s <= 0 or self.max_waiting <= 0 or self.low_disk():
            return False
        now = asyncio.get_running_loop().time()
        if self.busy():
            self._busy_at = now
            return True
        if not self.active():
            return False
        return waiting or (self.waiting > 0 and now - self._busy_at < self.tail_s)

    async def turn(self) -> None:
        """Wait until this removal may run (at once when nothing waits for a slot)."""
        if not self._hold(waiting=False):
            return
        loop = asyncio.get_running_loop()
        turn: asyncio.Future[None] = loop.create_future()
        self._queue.append((loop.time(), turn))
        self.on_defer()
        self._release()
        if self._watch is None or self._watch.done():
            self._watch = asyncio.ensure_future(self._watching())
        try:
            await turn
        finally:
            if not turn.done():
                turn.cancel()  # cancelled while waiting: `_release` drops it

    def open_all(self) -> None:
        """Let every waiting removal run now, and none wait from now on (shutdown)."""
        self._open = False
        self._release()

    def _release(self) -> None:
        """Let go the removals whose turn it is: all once no task waits or runs, else those
        past `max_wait_s` and the oldest beyond `max_waiting`."""
        hold = self._hold(waiting=True)
        now = asyncio.get_running_loop().time()
        q = self._queue
        while q and q[0][1].done():
            q.popleft()
        while q:
            since, turn = q[0]
            if hold and now - since < self.max_wait_s and len(q) <= self.max_waiting:
                break
            q.popleft()
            if not turn.done():
                turn.set_result(None)

    async def _watching(self) -> None:
        while self._queue:
            await asyncio.sleep(self.poll_s)
            self._release()

    async def close(self) -> None:
        self.open_all()
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
