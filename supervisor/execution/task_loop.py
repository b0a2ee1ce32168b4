"""Pulls tasks from the work queue while this node has capacity and runs them.

High is always served before normal, normal before low, FIFO within a priority (the
stream's order); a retry whose backoff is over goes before them all. A task that does not fit the memory budget yet is held at the head of its
priority (kept alive with in-progress acks, not counted as a new delivery) and nothing of a
lower priority passes it: no starvation of big tasks. A message is acknowledged only after
the task's terminal event is durable in JetStream; a task interrupted by shutdown is
nak'ed so another daemon (or this one, restarted) runs it.

Between two attempts a task is parked (`Parked`): its message kept alive, no slot held.
When its backoff ends it waits for the Docker engine (`Executor.wait_for_engine`), then for
a slot. A cancellation ends a parked task at once; at shutdown its message is handed back
at once, and whoever gets it waits out what is left of the backoff (from its history).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg

from schemas import PRIORITIES, Result, TaskSpec
from schemas.errors import NatsUnavailable, SupervisorError
from schemas.lifecycle import Keyring
from schemas.spec import newer_spec
from supervisor.eventlog.emitter import utcnow
from supervisor.eventlog.history import TaskHistory, read_task_events, summarize
from supervisor.eventlog.outcomes import emit_error
from supervisor.execution.executor import Backoff, Executor
from supervisor.execution.recovery import close_lost_attempt, owner_death, redelivery_limit
from supervisor.execution.workqueue import WorkQueue
from supervisor.observability.logs import bind
from supervisor.policy.classify import catalogue_entry
from supervisor.policy.retry import should_retry

__all__ = ["Parked", "Running", "Scheduler"]

log = logging.getLogger("supervisor.execution.task_loop")
_spec_decoder = msgspec.json.Decoder(TaskSpec)
_TERMINAL_DURABLE_S = 30.0


@dataclass
class Running:
    """A task this instance runs. `msg` is its latest delivery (a redelivery that arrives
    while it runs replaces it, with its own keep-alive), the one acked at the end."""

    spec: TaskSpec
    msg: Msg
    task: asyncio.Task[None]
    keepalive: asyncio.Task[None]


@dataclass
class Parked:
    """A task between two attempts: `next_attempt` is due once `timer` (its backoff, then
    the engine) is over, and then `ready` for a slot."""

    spec: TaskSpec
    msg: Msg
    keepalive: asyncio.Task[None]
    next_attempt: int
    timer: asyncio.Task[None] | None = None
    ready: bool = False


class _Defer(SupervisorError):
    """A redelivered task cannot be decided now (its history may be incomplete, or the
    owner of its open attempt may be alive): leave it for a later delivery."""

    tag = "deferred"


class Scheduler:
    """Pulls tasks from `SUP_TASKS` (`WorkQueue`, highest priority first) while this node
    may (`may_pull`: the breaker, host pressure, draining) and a task fits (`fits`: slots
    and memory), and runs each through the `Executor`.

    Promises: a message is acked only once its task's terminal event is durable, and kept
    alive (in progress) while it runs; a redelivered message whose owner died has that
    owner's open attempt closed first (`supervisor.execution.recovery`); a task in backoff
    is parked without a slot and its message kept alive until the retry is due; a
    message that cannot be decoded, or was delivered `max_deliver` times, is ended as a
    poison message with its error recorded, never retried forever; a task whose spec has
    fields this node does not know (a newer node's) is handed back until then, never run.
    `stop_pulling` stops taking work and hands parked tasks back to the queue.
    """

    def __init__(
        self,
        wq: WorkQueue,
        executor: Executor,
        *,
        max_deliver: int,
        ack_progress_s: float,
        may_pull: Callable[[], bool],
        fits: Callable[[int, list[int]], bool],
        on_result: Callable[[Result], None] = lambda r: None,
        superseded: frozenset[str] = frozenset(),
        heartbeat_timeout_s: float = 20.0,
        defer_s: float = 5.0,
        keyring: Keyring | None = None,
        terminal_wait_s: float = _TERMINAL_DURABLE_S,
    ) -> None:
        self.wq = wq
        self.executor = executor
        self.max_deliver = max_deliver
        self.ack_progress_s = ack_progress_s
        self.may_pull = may_pull
        self.fits = fits
        self.on_result = on_result
        self.superseded = superseded
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.defer_s = defer_s
        self.keyring = keyring
        # No use waiting longer than the ack wait: the message comes back then anyway, and
        # its redelivery is acked here once the terminal event is durable (`_known_here`).
        self.terminal_wait_s = terminal_wait_s
        self.running: dict[str, Running] = {}
        self._acks: set[asyncio.Task[None]] = set()
        self.held: dict[str, tuple[Msg, TaskSpec, asyncio.Task[None]]] = {}
        self.parked: dict[str, Parked] = {}
        self._changed = asyncio.Event()
        self._stopping = False
        executor.on_cancel = self._cancel_parked
        # A finished attempt's removal waits while tasks wait for a slot here.
        executor.attempts.removals.busy = self.backlog
        executor.attempts.removals.active = lambda: bool(self.running)

    @property
    def events(self):  # type: ignore[no-untyped-def]
        return self.executor.emitter.sink

    def running_memory(self) -> list[int]:
        return [r.spec.limits.memory_mb for r in self.running.values()]

    async def loop(self) -> None:
        while not self._stopping:
            self.wq.wakeup.clear()
            self._changed.clear()
            try:
                started = await self._schedule_once()
            except NatsUnavailable as e:
                log.warning("cannot pull work: %s", e)
                started = False
            if started:
                continue
            waits = [
                asyncio.ensure_future(self.wq.wakeup.wait()),
                asyncio.ensure_future(self._changed.wait()),
            ]
            await asyncio.wait(waits, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()

    def backlog(self) -> bool:
        """Whether tasks wait for a slot here: held for memory, due after a backoff, or
        left in the queue by the last pull."""
        return bool(self.held) or any(p.ready for p in self.parked.values()) or self.wq.waiting()

    def poke(self) -> None:
        """Something changed (capacity, breaker, pressure): look at the queues again."""
        self._changed.set()

    async def _schedule_once(self) -> bool:
        if self._stopping:
            return False
        for task_id, p in list(self.parked.items()):
            if p.ready and self.fits(p.spec.limits.memory_mb, self.running_memory()):
                del self.parked[task_id]
                self._start(p.msg, p.spec, p.keepalive, retry=p.next_attempt)
                return True
        if not self.may_pull():
            return False
        for prio in PRIORITIES:
            head = self.held.pop(prio, None)
            if head is None:
                pulled = await self._pull(prio)
                if pulled is None:
                    continue
                msg, spec = pulled
                if self._known_here(msg, spec):
                    return True
                keepalive = asyncio.ensure_future(self._keepalive(msg))
            else:
                msg, spec, keepalive = head
            if not self.fits(spec.limits.memory_mb, self.running_memory()):
                self.held[prio] = (msg, spec, keepalive)
                return False
            self._start(msg, spec, keepalive)
            return True
        return False

    def _known_here(self, msg: Msg, spec: TaskSpec) -> bool:
        """A redelivery of a task this instance runs, holds or has ended (its acks were late:
        NATS was down, or the ack itself was lost) is never run or closed again: a running
        or held one follows the new delivery, an ended one is acked once its terminal event
        is durable."""
        task_id = spec.task_id
        assert task_id is not None
        run = self.running.get(task_id)
        if run is not None:
            log.info("task %s: redelivered while it runs here; following the new delivery", task_id)
            run.keepalive.cancel()
            run.msg, run.keepalive = msg, asyncio.ensure_future(self._keepalive(msg))
            return True
        parked = self.parked.get(task_id)
        if parked is not None:
            parked.keepalive.cancel()
            parked.msg, parked.keepalive = msg, asyncio.ensure_future(self._keepalive(msg))
            return True
        for prio, (_, held, keepalive) in list(self.held.items()):
            if held.task_id == task_id:
                keepalive.cancel()
                self.held[prio] = (msg, held, asyncio.ensure_future(self._keepalive(msg)))
                return True
        if task_id in self.executor.finished:
            log.info("task %s: redelivered after it ended here; acking it", task_id)
            ack = asyncio.ensure_future(self._ack_when_durable(msg))
            self._acks.add(ack)
            ack.add_done_callback(self._acks.discard)
            return True
        return False

    async def _ack_when_durable(self, msg: Msg) -> None:
        if await self.events.flush(self.terminal_wait_s):
            with contextlib.suppress(Exception):
                await msg.ack_sync()
        else:
            with contextlib.suppress(Exception):
                await msg.nak(delay=self.defer_s)

    async def _pull(self, prio: str) -> tuple[Msg, TaskSpec] | None:
        while True:
            msg = await self.wq.next(prio)
            if msg is None:
                return None
            try:
                spec = _spec_decoder.decode(msg.data)
                if spec.task_id is None:
                    raise msgspec.ValidationError("task_id is missing")
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                newer = newer_spec(msg.data)
                if newer is None:
                    await self._poison(msg, prio, str(e))
                    continue
                spec, unknown = newer
                if msg.metadata.num_delivered <= self.max_deliver:
                    # A newer node's intake took it: it is a task, but not one to run
                    # without those fields. Left to a node that knows them; past the
                    # deliveries `_execute` ends it (REDELIVERY_LIMIT) without running it.
                    log.warning(
                        "task %s: its spec has fields this node does not know (%s); "
                        "leaving it to a node that does",
                        spec.task_id,
                        ", ".join(unknown),
                    )
                    with contextlib.suppress(Exception):
                        await msg.nak(delay=self.defer_s)
                    continue
            return msg, spec

    async def _poison(self, msg: Msg, prio: str, reason: str) -> None:
        """A message that is not a task spec: recorded as an error, then terminated."""
        seq = msg.metadata.sequence.stream
        message = f"undecodable task message on suptask.{prio} (stream seq {seq}): {reason}"
        invalid = catalogue_entry("INVALID_SPEC", message, stream_seq=seq, priority=prio)
        emit_error(self.executor.emitter, invalid)
        with contextlib.suppress(Exception):
            await msg.term()

    def _start(
        self, msg: Msg, spec: TaskSpec, keepalive: asyncio.Task[None], retry: int | None = None
    ) -> None:
        assert spec.task_id is not None
        task = asyncio.ensure_future(self._handle(msg, spec, retry))
        self.running[spec.task_id] = Running(spec, msg, task, keepalive)

        def _done(_: asyncio.Task[None]) -> None:
            self.running.pop(spec.task_id or "", None)
            self.poke()

        task.add_done_callback(_done)

    async def _keepalive(self, msg: Msg) -> None:
        while True:
            await asyncio.sleep(self.ack_progress_s)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _handle(self, msg: Msg, spec: TaskSpec, retry: int | None) -> None:
        with bind(task_id=spec.task_id, correlation_id=spec.correlation_id):
            await self._handle_bound(msg, spec, retry)

    def _park(self, spec: TaskSpec, backoff: Backoff) -> None:
        """Move a running task to `parked` until its next attempt is due (its slot is free
        as soon as its run returns)."""
        task_id = spec.task_id or ""
        run = self.running[task_id]
        p = Parked(spec, run.msg, run.keepalive, backoff.next_attempt)
        p.timer = asyncio.ensure_future(self._due(p, backoff.delay_s))
        self.parked[task_id] = p

    async def _due(self, p: Parked, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.executor.wait_for_engine()
        p.ready = True
        self.poke()

    async def _cancel_parked(self, task_id: str) -> bool:
        """A cancellation of a parked task ends it now, once (`CANCELLED`), and acks its
        message once that is durable. False when the task is not parked here."""
        p = self.parked.pop(task_id, None)
        if p is None:
            return False
        if p.timer is not None:
            p.timer.cancel()
        with bind(task_id=task_id, correlation_id=p.spec.correlation_id):
            result = self.executor.fail(p.spec, self.executor.cancellation(), p.next_attempt - 1)
            self.on_result(result)
            p.keepalive.cancel()
            await self._ack_when_durable(p.msg)
        return True

    def _delivery(self, spec: TaskSpec, first: Msg) -> Msg:
        run = self.running.get(spec.task_id or "")
        return run.msg if run is not None else first

    async def _handle_bound(self, msg: Msg, spec: TaskSpec, retry: int | None) -> None:
        try:
            if retry is None:
                result = await self._execute(msg, spec)
            else:
                result = await self.executor.run_or_park(
                    spec, announce=False, first_attempt=retry, terminal_on_cancel=False
                )
            if isinstance(result, Backoff):
                self._park(spec, result)
                return
            if result is not None:
                self.on_result(result)
            # Ack only once the terminal event is durable; otherwise the redelivery finds it.
            if await self.events.flush(self.terminal_wait_s):
                await self._delivery(spec, msg).ack_sync()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._delivery(spec, msg).nak())
            raise
        except _Defer as e:
            log.info("task %s: %s; leaving it for a later delivery", spec.task_id, e)
            with contextlib.suppress(Exception):
                await self._delivery(spec, msg).nak(delay=self.defer_s)
        except SupervisorError as e:
            log.error("task %s: %s; leaving it for redelivery", spec.task_id, e)
            with contextlib.suppress(Exception):
                await self._delivery(spec, msg).nak(delay=1)
        finally:
            run = self.running.get(spec.task_id or "")
            if run is not None and spec.task_id not in self.parked:
                run.keepalive.cancel()

    async def _execute(self, msg: Msg, spec: TaskSpec) -> Result | Backoff | None:
        deliveries = msg.metadata.num_delivered
        ex = self.executor
        if deliveries <= 1:
            return await ex.run_or_park(spec, announce=False, terminal_on_cancel=False)
        assert spec.task_id is not None
        # The history must hold everything this process has to say first: its own events
        # and those of the outboxes it adopted (a superseded instance's terminal events).
        if not await self.events.flush(self.terminal_wait_s):
            raise _Defer("the event log cannot reach NATS to read the task's history")
        history = summarize(await read_task_events(self.wq.js, spec.task_id, keyring=self.keyring))
        if history.terminal is not None:
            return None  # done before, only the ack was lost
        last = history.last_attempt
        closed = None
        if history.open_attempt is not None:
            closed = await close_lost_attempt(ex, spec, history, await self._death(history))
        if history.cancel_requested:
            return ex.fail(spec, ex.cancellation(), attempts=last)
        if deliveries > self.max_deliver:
            # A newer node's spec (`_pull` handed it back each time): its unknown fields.
            newer = newer_spec(msg.data)
            limit = redelivery_limit(deliveries, self.max_deliver, newer[1] if newer else ())
            return ex.fail(spec, limit, attempts=last)
        if last == 0:
            return await ex.run_or_park(spec, announce=False, terminal_on_cancel=False)
        if closed is None and history.retry_pending == last + 1:
            # The earlier delivery decided to retry; wait out what is left of its backoff.
            left = 0.0
            if history.retry_due is not None:
                left = (history.retry_due - utcnow()).total_seconds()
            cap = ex.config.bounds.max_retry_delay_s
            return Backoff(last + 1, min(max(left, 0.0), cap))
        previous = closed or catalogue_entry(
            "SUPERVISOR_LOST", "the previous delivery ended without a result"
        )
        if not should_retry(spec.retry, last, previous.retryable):
            # A lost attempt just closed has its error in the log: the failure repeats it.
            return ex.fail(spec, previous, attempts=last, recorded=closed is not None)
        em = ex.emitter.for_task(spec.task_id, spec.correlation_id or "").for_attempt(last)
        return Backoff(last + 1, ex.schedule_retry(em, spec, last, previous))

    async def _death(self, history: TaskHistory) -> str:
        """The proof that the open attempt's owner is dead; `_Defer` when there is none."""
        owner = history.open_instance or ""
        if owner == self.executor.emitter.instance_id:
            # Not running here (`_known_here`) and never ended: its run was cut short.
            return f"this instance ({owner}) no longer runs it"
        death = await owner_death(
            self.wq.js,
            node_id=history.open_node or "",
            instance_id=owner,
            self_instance=self.executor.emitter.instance_id,
            superseded=self.superseded,
            heartbeat_timeout_s=self.heartbeat_timeout_s,
            now=utcnow(),
        )
        if death is None:
            raise _Defer(
                f"the owner of attempt {history.open_attempt}, instance {owner}, may be alive"
            )
        return death

    async def stop_pulling(self) -> None:
        self._stopping = True
        self.poke()
        for msg, _, keepalive in self.held.values():
            keepalive.cancel()
            with contextlib.suppress(Exception):
                await msg.nak()
        self.held.clear()
        # Parked tasks go back at once: the next holder waits out what is left of the
        # backoff from the task's history, and can end it at once if it is cancelled.
        for p in self.parked.values():
            if p.timer is not None:
                p.timer.cancel()
            p.keepalive.cancel()
            with contextlib.suppress(Exception):
                await p.msg.nak()
        self.parked.clear()

    async def drain(self, grace_s: float, force: asyncio.Event) -> None:
        """Let running tasks finish within `grace_s` (or until `force`), then cancel the
        rest: they are cleaned up and their messages nak'ed for redelivery."""
        tasks = [r.task for r in self.running.values()]
        if tasks and not force.is_set():
            all_done = asyncio.ensure_future(asyncio.wait(tasks))
            forced = asyncio.ensure_future(force.wait())
            await asyncio.wait(
                [all_done, forced], timeout=grace_s, return_when=asyncio.FIRST_COMPLETED
            )
            all_done.cancel()
            forced.cancel()
        left = [r.task for r in self.running.values() if not r.task.done()]
        for t in left:
            t.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
