"""The event log: the `EventSink` adapter that puts events on disk, then into JetStream.

`emit` appends to the local outbox and returns; a relay task publishes the outbox in order
to `SUP_EVENTS` with `Nats-Msg-Id = event_id`, pipelined (`publish_async` for a whole
batch, then the acks), and acks in the outbox only the prefix JetStream acknowledged. A
failed or timed-out batch is retried from its first unacknowledged record: JetStream drops
the copies it already stored (same `Nats-Msg-Id` within the stream's duplicate window), so
nothing is lost and nothing is stored twice.

Why the relay publishes on a connection of its own that never reconnects by itself: nats-py
keeps commands it has not flushed yet across a reconnect and sends them first on the new
connection, while what it had already written to the dead socket is lost. A pipelined batch
cut by an outage could then land as "tail of the batch, then the retried middle" - out of
order. A connection that simply dies loses its whole unflushed rest instead, so the stream
only ever holds a prefix of what was sent and the retry continues it in order. The relay
opens a new connection itself (forever, with a short back-off).

The other connection (`nc`, `js`) is an ordinary auto-reconnecting one for the components
that consume or request (the daemon's work queues, intake); it is opened in the background
and never needed by the relay.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.api import PubAck, StreamConfig
from nats.js.client import JetStreamContext

from schemas import Event, encode_event
from schemas.errors import DiskFull, EventLogError, NatsUnavailable
from schemas.streams import SIGNATURE_BYTES, EventSigner
from supervisor.eventlog.nats_auth import redact
from supervisor.eventlog.nats_client import (
    CONNECTION_ERRORS,
    MSG_ID_HEADER,
    close_quietly,
    connect_nats,
    ensure_stream_exists,
)
from supervisor.eventlog.outbox import Outbox, Record
from supervisor.eventlog.streams import events_stream_config

__all__ = ["EventLog"]

log = logging.getLogger(__name__)

_SUBJECT_RE = re.compile(r"^sup(\.[^.\s*>]+){4}$")
_valid_subjects: set[str] = set()  # subjects repeat (a task's dozen events); checked once
_MAX_BACKOFF_S = 2.0
_OVERFLOW_RETRY_S = 0.5
SIGN_ON_LOOP = 16  # most records of a batch signed on the loop (25 us each; a thread hop 150)


class _Batch:
    """Records published together and the futures of their acks."""

    __slots__ = ("complete", "futures", "records")

    def __init__(
        self, records: list[Record], futures: list[asyncio.Future[PubAck]], *, complete: bool = True
    ) -> None:
        self.records = records
        self.futures = futures
        self.complete = complete  # False: publishing stopped before the end of the batch

    def abandon(self) -> None:
        """Give up on the acks still due (freeing nats-py's slots for them) and mark the
        errors of those already in as seen."""
        for f in self.futures:
            if not f.done():
                f.cancel()
            elif not f.cancelled():
                f.exception()


def _signed(signer: EventSigner, records: list[Record]) -> list[Record]:
    return [Record(r.seq, r.subject, r.msg_id, signer.sign(r.payload)) for r in records]


def _abandon(in_flight: deque[_Batch]) -> None:
    while in_flight:
        in_flight.popleft().abandon()


class EventLog:
    """Durable, ordered, exactly-once delivery of events to `SUP_EVENTS` (the `EventSink`).

    `emit` never blocks on the network and never raises because NATS is down: the event is
    in the outbox under `<data_dir>/outbox/` when it returns. While NATS is unreachable the
    events wait on disk; they go out in order when it is back. Outboxes left by crashed
    processes in the same directory are adopted at start and published first.
    """

    def __init__(
        self,
        data_dir: Path,
        nats_url: str,
        *,
        instance_id: str,
        batch: int = 1000,
        window: int = 4,
        ack_timeout: float = 5.0,
        connect_timeout: float = 1.0,
        reconnect_wait: float = 0.25,
        adopt_interval: float = 60.0,
        max_payload: int = 8 * 1024 * 1024,
        max_overflow_bytes: int = 64 * 1024 * 1024,
        replicas: int = 1,
        stream: StreamConfig | None = None,
        signer: EventSigner | None = None,
    ) -> None:
        if batch < 1 or window < 1:
            raise ValueError("batch and window must be at least 1")
        self.stream = stream or events_stream_config(replicas)
        """`SUP_EVENTS` as this log creates or updates it (copies, retention)."""
        self.data_dir = Path(data_dir)
        self.nats_url = nats_url
        self.instance_id = instance_id
        self.batch = batch
        self.window = window
        self.ack_timeout = ack_timeout
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.adopt_interval = adopt_interval
        self.max_payload = max_payload
        self.signer = signer
        """Signs each event as it is published (None: unsigned). The outbox holds them
        unsigned: an outbox adopted from a dead process is signed by this one's key, which
        is its node's."""
        self._outbox: Outbox | None = None
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._relay_task: asyncio.Task[None] | None = None
        self._shared_task: asyncio.Task[None] | None = None
        self._pub: NATS | None = None
        self._pub_js: JetStreamContext | None = None
        self._pub_lost = asyncio.Event()
        self._shared: NATS | None = None
        self._shared_js: JetStreamContext | None = None
        self._shared_ready = asyncio.Event()
        self._closed = False
        self.max_overflow_bytes = max_overflow_bytes
        self._overflow: deque[tuple[str, str, bytes]] = deque()
        self._overflow_bytes = 0
        self._acks: dict[str, asyncio.Future[PubAck]] = {}

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the outbox (adopting orphans), try NATS once, then relay in the background.

        NATS being down is not an error here: the relay keeps trying. Raises `OutboxError`
        when the outbox cannot be opened and `EventLogError` when NATS answers but the
        streams cannot be set up.
        """
        if self._outbox is not None:
            return
        outbox = Outbox(self.data_dir / "outbox", self.instance_id)
        try:
            adopted = outbox.adopt_orphans()
            if adopted:
                log.info(
                    "event log: %d events of crashed processes will be published first", adopted
                )
            self._outbox = outbox
            if outbox.backlog:
                self._drained.clear()
            try:
                await self._connect_relay()
            except NatsUnavailable as e:
                log.warning("event log: %s; events wait on disk until it is back", e)
        except BaseException:
            outbox.close()
            self._outbox = None
            raise
        self._relay_task = asyncio.create_task(
            self._relay(), name=f"eventlog-relay-{self.instance_id}"
        )
        self._shared_task = asyncio.create_task(
            self._connect_shared(), name=f"eventlog-connect-{self.instance_id}"
        )

    async def close(self, flush_timeout: float = 5.0) -> None:
        """Flush for up to `flush_timeout`, stop the relay, close the connections and the
        outbox. Whatever is still unpublished stays on disk for the next start (or for
        another process to adopt). Bounded in time; never raises for a down NATS."""
        if self._closed:
            return
        self._closed = True
        if self._outbox is None:
            return
        await self.flush(flush_timeout)
        for task in (self._relay_task, self._shared_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:
                    log.exception("event log: %s had failed", task.get_name())
        await close_quietly(self._pub)
        await close_quietly(self._shared, drain=True)
        self._write_overflow(self._outbox)
        if self._overflow:
            log.error(
                "event log: the disk is still full; %d events held in memory are lost",
                len(self._overflow),
            )
        self._outbox.close()

    async def __aenter__(self) -> EventLog:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the EventSink ---------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Append `event` to the outbox (written before this returns) and wake the relay.

        Raises `ValueError` for an event whose subject is not five valid tokens or whose
        encoding exceeds `max_payload` (it could never be published), `OutboxError` when
        the disk fails and `EventLogError` when the log is not started or already closed.
        """
        outbox = self._outbox
        if outbox is None or self._closed:
            raise EventLogError("the event log is not running")
        subject = event.subject()
        if subject not in _valid_subjects:
            if _SUBJECT_RE.match(subject) is None:
                raise ValueError(
                    f"event subject {subject!r} is not sup.<category>.<name>.<node>.<task>"
                )
            if len(_valid_subjects) >= 10_000:
                _valid_subjects.clear()
            _valid_subjects.add(subject)
        payload = encode_event(event)
        if len(payload) + (SIGNATURE_BYTES if self.signer is not None else 0) > self.max_payload:
            raise ValueError(
                f"event {event.event_id} is {len(payload)} bytes, over {self.max_payload}"
            )
        if not self._overflow:
            try:
                outbox.append(subject, event.event_id, payload)
            except DiskFull as e:
                log.error("event log: %s; events wait in memory until there is space", e)
                self._hold(subject, event.event_id, payload)
        else:
            self._hold(subject, event.event_id, payload)  # behind the others, in order
        self._drained.clear()
        self._wakeup.set()

    def _hold(self, subject: str, msg_id: str, payload: bytes) -> None:
        """Keep an event the full disk refused, in order, until `_write_overflow` can put it
        in the outbox. Bounded: past `max_overflow_bytes` the disk-full error is raised."""
        if self._overflow_bytes + len(payload) > self.max_overflow_bytes:
            raise DiskFull(
                f"the data dir has no space left and {len(self._overflow)} events "
                f"({self._overflow_bytes} bytes) already wait in memory"
            )
        self._overflow.append((subject, msg_id, payload))
        self._overflow_bytes += len(payload)

    def _write_overflow(self, outbox: Outbox) -> None:
        """Move the events held in memory to the outbox, in order, as far as space allows
        (and say so when it held any)."""
        if not self._overflow:
            return
        while self._overflow:
            subject, msg_id, payload = self._overflow[0]
            try:
                outbox.append(subject, msg_id, payload)
            except DiskFull:
                return
            self._overflow.popleft()
            self._overflow_bytes -= len(payload)
        log.info("event log: the data dir has space again; every held event is in the outbox")

    def ack_of(self, msg_id: str) -> asyncio.Future[PubAck]:
        """JetStream's ack of the event `msg_id` when this process's relay publishes it next
        (`duplicate`: the stream had stored one under that id already). Cancel it once it
        is no longer wanted."""
        fut: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        self._acks[msg_id] = fut

        def forget(done: asyncio.Future[PubAck]) -> None:
            if self._acks.get(msg_id) is done:
                del self._acks[msg_id]

        fut.add_done_callback(forget)
        return fut

    @property
    def disk_full(self) -> bool:
        """Whether events wait in memory because the outbox's disk refused them."""
        return bool(self._overflow)

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until JetStream acknowledged every event emitted so far; False if `timeout`
        passed first (the events are still safe on disk)."""
        if self._drained.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._drained.wait()
        except TimeoutError:
            return False
        return True

    @property
    def backlog(self) -> int:
        """Events not yet acknowledged by JetStream: on disk (adopted ones included), and
        held in memory while the disk is full."""
        return len(self._overflow) + (0 if self._outbox is None else self._outbox.backlog)

    @property
    def connected(self) -> bool:
        """Whether the relay is connected to NATS right now."""
        return self._pub is not None and self._pub.is_connected

    # --- the shared connection -------------------------------------------------------

    @property
    def nc(self) -> NATS:
        """The auto-reconnecting connection for other components. Raises `NatsUnavailable`
        until it was first established (see `wait_connected`)."""
        if self._shared is None:
            raise NatsUnavailable(self.nats_url, "not connected yet")
        return self._shared

    @property
    def js(self) -> JetStreamContext:
        if self._shared_js is None:
            raise NatsUnavailable(self.nats_url, "not connected yet")
        return self._shared_js

    async def wait_connected(self, timeout: float | None = None) -> bool:
        """Wait until `nc` is usable; False if `timeout` passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._shared_ready.wait()
        except TimeoutError:
            return False
        return True

    async def _connect_shared(self) -> None:
        failures = 0
        while True:
            try:
                nc = await connect_nats(
                    self.nats_url,
                    reconnect=True,
                    timeout=None,
                    name=f"supervisor-{self.instance_id}",
                    reconnect_wait=self.reconnect_wait,
                )
                break
            except NatsUnavailable as e:  # refused outright (e.g. authorization), not just down
                failures += 1
                if failures == 1:
                    log.warning("event log: %s; retrying", e)
                await self._backoff(failures)
        self._shared = nc
        self._shared_js = nc.jetstream()
        self._shared_ready.set()

    # --- the relay -------------------------------------------------------------------

    async def _connect_relay(self) -> None:
        lost = asyncio.Event()

        async def _on_lost() -> None:
            lost.set()
            self._wakeup.set()

        nc = await connect_nats(
            self.nats_url,
            reconnect=False,
            timeout=self.connect_timeout,
            name=f"supervisor-outbox-{self.instance_id}",
            reconnect_wait=self.reconnect_wait,
            disconnected_cb=_on_lost,
        )
        try:
            js = nc.jetstream(publish_async_max_pending=max(4000, (self.window + 1) * self.batch))
            # Only its own stream: SUP_TASKS and SUP_COMMANDS are configured by the daemon
            # (the task queue bound is its setting), never reset by a passing client.
            await ensure_stream_exists(js, self.stream, url=self.nats_url)
        except BaseException:
            await close_quietly(nc)
            raise
        self._pub, self._pub_js, self._pub_lost = nc, js, lost
        log.info("event log: relay connected to %s", redact(self.nats_url))

    async def _relay(self) -> None:
        """Publish the outbox in order, forever: up to `window` batches in flight, and the
        acknowledged prefix acked in the outbox. On any failure (a refused or missing ack,
        the connection lost) everything in flight is dropped and publishing resumes, after
        a back-off and on a fresh connection if need be, from the first record not
        acknowledged; JetStream drops the copies of what it had already stored."""
        assert self._outbox is not None
        outbox = self._outbox
        in_flight: deque[_Batch] = deque()
        failures = 0
        try:
            while True:
                try:
                    failures = await self._step(outbox, in_flight, failures)
                except Exception as e:
                    # Disk trouble (OutboxError) or a bug: the relay must not die, and the
                    # events are still on disk.
                    log.error("event log: relay step failed: %r; retrying", e, exc_info=True)
                    _abandon(in_flight)
                    failures += 1
                    await self._backoff(failures)
        finally:
            _abandon(in_flight)

    async def _step(self, outbox: Outbox, in_flight: deque[_Batch], failures: int) -> int:
        """One turn of the relay; returns the updated count of consecutive failures."""
        if self._overflow:
            self._write_overflow(outbox)
        if self._pub is None or self._pub_lost.is_set() or self._pub.is_closed:
            # Acks of the old connection will never come: keep those that did, and drop the
            # rest before anything is sent on a new connection. `is_closed` too: when the
            # server resets the connection, nats-py's close can fail flushing the dead
            # socket and end without calling `disconnected_cb` (nats.py#806; one run in
            # ten of a SIGKILLed server), and the relay then retried on a closed client
            # forever.
            self._settle(outbox, in_flight)
            _abandon(in_flight)
            if not await self._reconnect_relay(failures):
                return failures + 1
            failures = 0
        self._wakeup.clear()  # anything emitted from here on wakes `_idle` again
        stalled = await self._fill(outbox, in_flight)
        if not in_flight:
            if stalled:  # records wait but not one could be sent
                await self._backoff(failures + 1)
                return failures + 1
            if self._overflow:  # the disk is still full: try again soon
                await asyncio.sleep(_OVERFLOW_RETRY_S)
                return failures
            if outbox.backlog == 0:
                self._drained.set()
            await self._idle()
            return failures
        oldest = in_flight[0]
        await self._wait_for_acks(oldest)
        self._settle(outbox, in_flight)
        if not in_flight or in_flight[0] is not oldest:
            return 0
        _abandon(in_flight)
        await self._backoff(failures + 1)
        return failures + 1

    def _settle(self, outbox: Outbox, in_flight: deque[_Batch]) -> None:
        """Ack in the outbox every record JetStream acknowledged, up to the first that it
        did not (yet), and forget the batches fully acknowledged."""
        upto: int | None = None
        while in_flight:
            batch = in_flight[0]
            n = self._acked_prefix(batch)
            if n:
                upto = batch.records[n - 1].seq
            if n < len(batch.records) or not batch.complete:
                break
            in_flight.popleft()
        if upto is not None:
            outbox.ack(upto)
            if outbox.backlog == 0 and not self._overflow:
                self._drained.set()

    async def _reconnect_relay(self, failures: int) -> bool:
        await close_quietly(self._pub)
        self._pub = self._pub_js = None
        try:
            await self._connect_relay()
        except EventLogError as e:
            if failures == 0 or not isinstance(e, NatsUnavailable):
                log.warning("event log: %s; retrying", e)
            await self._backoff(failures + 1)
            return False
        return True

    async def _fill(self, outbox: Outbox, in_flight: deque[_Batch]) -> bool:
        """Publish batches until `window` of them are in flight or the outbox has no more.
        Returns True if publishing stopped short (connection lost, a record refused)."""
        while len(in_flight) < self.window:
            after = in_flight[-1].records[-1].seq if in_flight else None
            records = outbox.pending(self.batch, after)
            if not records:
                return False
            if outbox.dirty:
                # Group commit: one fsync covers every record appended so far, and nothing
                # is published before it is durable.
                await asyncio.to_thread(outbox.sync)
            if self.signer is not None and len(records) <= SIGN_ON_LOOP:
                records = _signed(self.signer, records)
            elif self.signer is not None:  # off the loop: the crypto runs without the GIL
                records = await asyncio.to_thread(_signed, self.signer, records)
            batch = await self._send(records)
            if batch.futures:
                in_flight.append(batch)
            if not batch.complete:
                return True
        return False

    async def _send(self, records: list[Record]) -> _Batch:
        """`publish_async` each record (no waiting for acks); stops early if the connection
        is lost or nats-py refuses one."""
        js, lost = self._pub_js, self._pub_lost
        assert js is not None
        futures: list[asyncio.Future[PubAck]] = []
        try:
            for r in records:
                if lost.is_set():
                    break
                futures.append(
                    await js.publish_async(r.subject, r.payload, headers={MSG_ID_HEADER: r.msg_id})
                )
        except nats.errors.Error as e:
            if isinstance(e, CONNECTION_ERRORS):
                log.debug("event log: publishing interrupted: %r", e)
            else:
                log.error("event log: cannot publish seq %d: %r", records[len(futures)].seq, e)
        except BaseException:
            _Batch(records, futures).abandon()
            raise
        return _Batch(records[: len(futures)], futures, complete=len(futures) == len(records))

    async def _wait_for_acks(self, batch: _Batch) -> None:
        """Wait until every ack of `batch` is in, `ack_timeout` passed or the connection
        was lost."""
        futures = batch.futures
        if all(f.done() for f in futures):
            return
        acks = asyncio.gather(*futures, return_exceptions=True)
        lost_wait = asyncio.ensure_future(self._pub_lost.wait())
        try:
            await asyncio.wait(
                (acks, lost_wait), timeout=self.ack_timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost_wait.cancel()

    def _acked_prefix(self, batch: _Batch) -> int:
        """How many records of `batch`, from its first, JetStream acknowledged so far."""
        acked = 0
        for f in batch.futures:
            if not f.done() or f.cancelled():
                break
            error = f.exception()
            if error is not None:
                self._publish_failed(batch.records[acked], error)
                break
            want = self._acks.get(batch.records[acked].msg_id) if self._acks else None
            if want is not None and not want.done():
                want.set_result(f.result())
            acked += 1
        return acked

    def _publish_failed(self, record: Record, error: BaseException) -> None:
        if isinstance(error, nats.js.errors.NoStreamResponseError):
            # No stream takes the subject (deleted, or a new server): set it up again.
            self._pub_lost.set()
        log.warning(
            "event log: JetStream refused seq %d (%s): %r; retrying",
            record.seq,
            record.subject,
            error,
        )

    async def _idle(self) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that
        # arrives as the event fires, and close() would then wait on the relay forever.
        try:
            async with asyncio.timeout(self.adopt_interval):
                await self._wakeup.wait()
        except TimeoutError:
            assert self._outbox is not None
            if self._outbox.adopt_orphans():
                self._drained.clear()

    async def _backoff(self, failures: int) -> None:
        delay = min(self.reconnect_wait * 2 ** min(failures - 1, 8), _MAX_BACKOFF_S)
        await asyncio.sleep(delay)
