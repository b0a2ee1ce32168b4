"""Delivering a task's Result to its `callback_url`, durably.

The daemon part follows the terminal task events of `SUP_EVENTS` through one durable pull
consumer (`callbacks`), shared by every node of a fleet, so each terminal event is handled
by one node at a time and, if that node dies, by another. For an event naming a
`callback_url`:

1. the task's history is read: only the terminal event that ends the task (the
   ownership rule, `history.applied_terminal`) is delivered, never a duplicate or a
   forgery, and a task whose delivery already ended (`delivered`, `gave_up`) is skipped;
2. the URL is checked against `[callbacks] allowed` again (the configuration may have
   changed since the submission);
3. the Result is POSTed, signed (`signing`), without following redirects;
4. the attempt is recorded as `callback.attempted` and flushed before the message is
   settled: acked when delivered or given up, else nakked with the backoff delay, so the
   next delivery comes back from JetStream itself, across restarts, counted from the
   recorded attempts.

Deliveries are at least once: a crash between a receiver's 2xx and the recording repeats
the delivery; `X-Supervisor-Event-Id` lets the receiver see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from prometheus_client import Counter

from schemas import (
    CallbackAttempted,
    Result,
    TaskFailed,
    TaskRejected,
    TaskSubmitted,
    TaskSucceeded,
    event_type,
)
from schemas.config import Config
from schemas.http import CallbackBody
from schemas.lifecycle import Keyring
from schemas.streams import EVENTS_STREAM
from supervisor.delivery.signing import (
    SIGNATURE,
    TIMESTAMP,
    callback_secret,
    delay_after,
    signature,
)
from supervisor.eventlog.history import applied_terminal, read_task_messages
from supervisor.policy.admission import callback_refused

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from supervisor.daemon.extension import DaemonContext
    from supervisor.eventlog.emitter import Emitter
    from supervisor.eventlog.log import EventLog

log = logging.getLogger("supervisor.delivery")

CONSUMER = "callbacks"
TERMINAL_SUBJECTS = ["sup.task.succeeded.>", "sup.task.failed.>", "sup.task.rejected.>"]
BATCH = 16
_FLUSH_S = 10.0


class _Peek(msgspec.Struct):
    """The fields of a terminal event a delivery needs to decide whether to look closer."""

    task_id: str
    callback_url: str | None = None


_peek = msgspec.json.Decoder(_Peek)


class CallbacksPart:
    """Runs when `[callbacks] allowed` names a destination (and the node runs tasks)."""

    name = "callbacks"

    def __init__(self, config: Config) -> None:
        self.config = config.callbacks
        self.secret = callback_secret(self.config)  # ConfigError before anything starts

    async def start(self, ctx: DaemonContext, stack: contextlib.AsyncExitStack) -> None:
        cfg = self.config
        ack_wait = max(30.0, cfg.timeout_s * 3)
        consumer = ConsumerConfig(
            durable_name=CONSUMER,
            filter_subjects=TERMINAL_SUBJECTS,
            deliver_policy=DeliverPolicy.NEW,  # from when callbacks were first configured
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=1024,
        )
        try:
            await ctx.js.add_consumer(EVENTS_STREAM, consumer)
        except nats.js.errors.APIError:
            await ctx.js.consumer_info(EVENTS_STREAM, CONSUMER)  # it exists: keep its position
        sub = await ctx.js.pull_subscribe_bind(CONSUMER, stream=EVENTS_STREAM)
        counter = Counter(
            "supervisor_callback_deliveries",
            "Deliveries of Results to callback URLs, by outcome",
            ["outcome"],
            registry=ctx.registry,
        )
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=cfg.timeout_s))
        stack.push_async_callback(http.close)
        deliverer = _Deliverer(
            self, ctx.js, ctx.node.events, ctx.node.emitter, http, counter, ctx.node.keyring
        )
        task = asyncio.create_task(deliverer.run(sub), name="callbacks")

        async def stop() -> None:
            # Deliveries under way finish and are recorded and settled (a message left
            # unsettled would wait out the ack wait before another node took it).
            deliverer.stopping.set()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), cfg.timeout_s + _FLUSH_S)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

        stack.push_async_callback(stop)


class _Deliverer:
    def __init__(
        self,
        part: CallbacksPart,
        js: Any,
        events: EventLog,
        emitter: Emitter,
        http: aiohttp.ClientSession,
        counter: Counter,
        keyring: Keyring | None = None,
    ) -> None:
        self.cfg = part.config
        self.secret = part.secret
        self.js = js
        self.events = events
        self.emitter = emitter
        self.keyring = keyring
        self.http = http
        self.counter = counter
        self.stopping = asyncio.Event()

    async def run(self, sub: Any) -> None:
        while not self.stopping.is_set():
            try:
                msgs = await sub.fetch(BATCH, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except nats.errors.Error as e:
                log.warning("callbacks: cannot fetch terminal events: %s", e)
                await asyncio.sleep(1.0)
                continue
            await asyncio.gather(*(self._settled(m) for m in msgs))

    async def _settled(self, msg: Msg) -> None:
        try:
            await self.handle(msg)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # NATS away while reading or recording: the message comes back
            log.warning("callbacks: delivery deferred: %s", e)
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)

    async def handle(self, msg: Msg) -> None:
        try:
            peek = _peek.decode(msg.data)
        except msgspec.MsgspecError:
            await msg.ack()  # not an event of ours: the projection records it as poison
            return
        if peek.callback_url is None:
            await msg.ack()
            return
        messages = await read_task_messages(self.js, peek.task_id, keyring=self.keyring)
        end = applied_terminal(messages)
        this = next((e for s, e in messages if s == msg.metadata.sequence.stream), None)
        # The URL is the submitted spec's (admitted against the policy then), never what a
        # terminal event claims.
        spec = next((e.spec for _, e in messages if isinstance(e, TaskSubmitted)), None)
        done = any(
            isinstance(e, CallbackAttempted) and e.outcome in ("delivered", "gave_up")
            for _, e in messages
        )
        if (
            end is None
            or this is None
            or end.event_id != this.event_id
            or spec is None
            or spec.callback_url is None
            or done
        ):
            await msg.ack()  # a duplicate, a forgery, no callback, or delivered already
            return
        assert isinstance(end, TaskSucceeded | TaskFailed | TaskRejected)
        tried = sum(1 for _, e in messages if isinstance(e, CallbackAttempted))
        await self.deliver(msg, end, spec.callback_url, tried + 1)

    async def deliver(
        self, msg: Msg, end: TaskSucceeded | TaskFailed | TaskRejected, url: str, n: int
    ) -> None:
        body = msgspec.json.encode(
            CallbackBody(
                task_id=end.task_id,
                event=event_type(end),  # type: ignore[arg-type]
                event_id=end.event_id,
                correlation_id=end.correlation_id,
                result=_result(end),
            )
        )
        started = time.monotonic()
        # The configuration may have changed since the submission: a URL no longer allowed
        # is given up at once, never called.
        refused = callback_refused(url, self.cfg.allowed)
        status, error = (None, refused) if refused else await self.post(url, body, end, n)
        delivered = error is None
        last = n >= self.cfg.max_attempts or refused is not None
        outcome = "delivered" if delivered else "gave_up" if last else "retrying"
        delay = None if outcome != "retrying" else round(delay_after(self.cfg, n), 3)
        em = self.emitter.for_task(end.task_id, end.correlation_id).for_attempt(end.attempt)
        em.emit(
            CallbackAttempted,
            url=url,
            delivery=n,
            outcome=outcome,  # type: ignore[arg-type]
            terminal_event_id=end.event_id,
            status=status,
            error=error,
            next_delay_s=delay,
            duration_s=round(time.monotonic() - started, 6),
        )
        self.counter.labels(outcome).inc()
        if not await self.events.flush(_FLUSH_S):
            raise TimeoutError("the delivery's record is not durable yet")
        log.log(
            logging.INFO if delivered else logging.WARNING,
            "callback %s of task %s to %s: %s%s",
            n,
            end.task_id,
            url,
            outcome,
            "" if delivered else f" ({error})",
            extra={"task_id": end.task_id, "correlation_id": end.correlation_id},
        )
        if delay is None:
            await msg.ack()
        else:
            await msg.nak(delay=delay)

    async def post(
        self, url: str, body: bytes, end: TaskSucceeded | TaskFailed | TaskRejected, n: int
    ) -> tuple[int | None, str | None]:
        """(HTTP status or None, what failed or None when delivered)."""
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "container-supervisor",
            TIMESTAMP: str(ts),
            SIGNATURE: signature(self.secret, ts, body),
            "X-Supervisor-Event-Id": end.event_id,
            "X-Supervisor-Task": end.task_id,
            "X-Supervisor-Delivery": str(n),
        }
        try:
            async with self.http.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                await resp.content.read(65536)
                if 200 <= resp.status < 300:
                    return resp.status, None
                return resp.status, f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            return None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _result(end: TaskSucceeded | TaskFailed | TaskRejected) -> Result:
    if isinstance(end, TaskRejected) and end.result is None:
        return Result(task_id=end.task_id, status="rejected", attempts=0, error=end.error)
    assert end.result is not None
    return end.result
