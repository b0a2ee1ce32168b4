"""The projector: `SUP_EVENTS` -> the DuckDB projection, in batches.

It reads the stream with an ordered push consumer starting at `projector_state.seq + 1`
(deliver policy by start sequence), so where it resumes is decided by the projection file
alone and no durable consumer is needed for correctness. Messages are gathered into
batches bounded by size and by age, then go through a pipeline: while a worker thread
applies batch n to DuckDB (which releases the GIL), batch n+1 is decoded into Arrow tables
by a second worker and batch n+2 is read. Live, the decoding runs in a thread (small
batches, no start-up cost) and at most two batches are in flight. In bulk mode (replay) it
runs in two processes of their own (`projections.stream.worker`), because decoding and reading
are both Python and would otherwise share one core through the GIL: batches n+1 and n+2
are decoded side by side while n is applied and n+3 is read, so that neither the reader
nor the writer waits for one decoder. A batch is applied only after the one before it
succeeded, so the watermark never passes a batch that was not applied.

How it reads: through nats-py's public API only, an ephemeral pull consumer from the
watermark (`projections.stream.pull`), fetched in batches of at most what the pipeline has room for.
That is its flow control: the server sends no more than was asked, so a projector slower
than the stream holds a batch or two, never the backlog. When the consumer is lost (a
restarted server that forgot it, its inactivity threshold) it is made again after the last
sequence read. A bounded bulk run (a replay, a catch-up) may read through
`projections.stream.bulkread` instead, the one module that reaches into nats-py's
internals (pinned to one nats-py version, checked at run time, and falling back to the
public path), because it takes the messages at about twice the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Container
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from projections.errors import ProjectionError, StreamUnavailable
from projections.store.store import ApplyResult, ProjectionStore
from projections.stream.bulkread import BulkClient, Sink, lean_supported
from projections.stream.decode import Staged, parse_reply, stage_raw
from projections.stream.pull import PullReader
from projections.stream.worker import DecodePool
from schemas.connection import connect_options
from schemas.lifecycle import Keyring
from schemas.streams import EVENTS_STREAM, EVENTS_SUBJECTS

__all__ = ["Progress", "Projector", "to_ns"]

log = logging.getLogger(__name__)

_POLL_S = 0.1
STREAM_POLL_S = 0.5
_MIN_FETCH_S = 0.005
_SETTLE_POLL_S = 0.005
_IN_FLIGHT = 2
_BULK_DECODERS = 2
"""Decode processes of a bulk run: two batches are decoded side by side while a third is
applied, so neither the reader nor the writer waits for a single decoder."""
_BULK_CHECKPOINT = 2_000_000


@dataclass
class Progress:
    """Where a run is, after each applied batch: `seq` reached, from `from_seq` (the
    watermark it started at) towards `target` (0 when following live); `last` is what the
    latest batch did."""

    seq: int
    target: int
    from_seq: int = 0
    applied: int = 0
    duplicates: int = 0
    dead: int = 0
    batches: int = 0
    started: float = field(default_factory=time.monotonic)
    last: ApplyResult | None = None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def add(self, result: ApplyResult) -> None:
        self.seq = result.seq
        self.applied += result.applied
        self.duplicates += result.duplicates
        self.dead += result.dead
        self.batches += 1
        self.last = result


ProgressCallback = Callable[[Progress], None]


class _Skipped(ProjectionError):
    """A batch not applied because the one before it failed."""


def to_ns(moment: datetime) -> int:
    """Nanoseconds since the epoch; a naive datetime is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1_000_000) * 1000


_Raw = tuple[list[str], list[str], list[bytes]]
"""A batch as the decoders take it: reply subjects, subjects, payloads."""


def _unpack(msgs: list[Msg]) -> _Raw:
    return [m.reply for m in msgs], [m.subject for m in msgs], [m.data for m in msgs]


_TASK_ENDS = tuple(f"sup.task.{name}." for name in ("succeeded", "failed", "rejected"))


def ends_task(msg: Msg, awaited: Container[str]) -> bool:
    """Whether `msg` is the terminal event of a task in `awaited` (by its subject
    `sup.task.<end>.<node>.<task>`: no decoding)."""
    return msg.subject.startswith(_TASK_ENDS) and msg.subject.rsplit(".", 1)[-1] in awaited


class Projector:
    """Applies `SUP_EVENTS` to the DuckDB file `db_path`; the only writer of that file.

    `catch_up` applies what the stream holds now (or up to a point) and returns;
    `run` follows the stream until `stop` is set. Both resume after the projection's
    watermark. `batch_size` and `batch_age_s` bound a batch: live, a batch is applied at
    the latest `batch_age_s` after its first message arrived, once the batch before it is
    applied, and, with `max_busy` below 1, once the writer has rested long enough to have
    been busy at most that fraction of the time (each live batch costs a few tens of ms of
    CPU, taken from the tasks on a busy host) or the batch's first message has waited
    `rest_lag_s`. A live batch that holds the terminal event of a task in `awaited` (a
    client waits for its outcome: `GET /v1/tasks/{id}?wait`) does not wait for its age. `bulk=True` (replay) makes batches by size only (the first one a fifth
    of `batch_size`), defers checkpoints to `close`, and pauses Python's cyclic garbage
    collector for the run: a batch's objects (messages, decoded events, rows) hold no
    cycles and are freed by reference counting, while collecting a heap of a hundred
    thousand buffered messages again and again cost a third of the replay time.
    `threads` sets DuckDB's worker threads for the file, `memory_limit` and `temp_limit`
    its memory and its spill to disk (`store_config`).
    """

    def __init__(
        self,
        db_path: str | Path,
        nats_url: str,
        *,
        batch_size: int = 20_000,
        batch_age_s: float = 0.2,
        stream: str = EVENTS_STREAM,
        connect_timeout: float = 5.0,
        bulk: bool = False,
        max_busy: float = 1.0,
        rest_lag_s: float = math.inf,
        threads: int | None = None,
        memory_limit: str | None = None,
        temp_limit: str | None = None,
        keyring: Keyring | None = None,
    ) -> None:
        if not 0 < max_busy <= 1:
            raise ValueError(f"max_busy must be in (0, 1], not {max_busy}")
        self.nats_url = nats_url
        self.batch_size = batch_size
        self.batch_age_s = batch_age_s
        self.stream = stream
        self.connect_timeout = connect_timeout
        self.bulk = bulk
        self.max_busy = max_busy
        self.rest_lag_s = rest_lag_s
        # The tasks someone waits for (`GET /v1/tasks/{id}?wait`): a live batch that holds
        # the end of one of them does not wait for its age. Only those: under load every
        # batch holds some task's end, and batches cut early cost the host CPU.
        self.awaited: Container[str] = ()
        self._rest_until = 0.0
        self.store = ProjectionStore(
            db_path,
            stream=stream,
            bulk=bulk,
            threads=threads,
            memory_limit=memory_limit,
            temp_limit=temp_limit,
            keyring=keyring,
        )
        self._workers: DecodePool | None = DecodePool(_BULK_DECODERS) if bulk else None
        decoders = len(self._workers) if self._workers is not None else 1
        self._decoder = ThreadPoolExecutor(decoders, thread_name_prefix="projector-decode")
        self._max_in_flight = decoders + 1 if bulk else _IN_FLIGHT
        self._unflushed = 0
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="projector-apply")
        self._inflight: deque[asyncio.Task[ApplyResult]] = deque()

    def close(self) -> None:
        """Release the workers and close the file (checkpointed)."""
        self._decoder.shutdown()
        if self._workers is not None:
            self._workers.close()
        self._writer.shutdown()
        self.store.close()

    def __enter__(self) -> Projector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_seq(self) -> int:
        return self.store.last_seq()

    async def catch_up(
        self,
        until_seq: int | None = None,
        until_time: datetime | None = None,
        progress: ProgressCallback | None = None,
    ) -> Progress:
        """Apply every message after the watermark up to the end of the stream as it is now,
        or up to `until_seq` (inclusive), or up to the last message stored at or before
        `until_time` (the stream's own timestamp: what the system knew at that moment).
        Returns the totals. Raises StreamUnavailable, ProjectionStoreError."""
        # Stored times have nanoseconds; TIME is taken to the microsecond, inclusive.
        until_ns = to_ns(until_time) + 999 if until_time is not None else None
        return await self._consume(
            until_seq=until_seq, until_ns=until_ns, stop=None, progress=progress
        )

    async def run(self, stop: asyncio.Event, progress: ProgressCallback | None = None) -> Progress:
        """Follow the stream until `stop` is set; then apply what was gathered and return.
        Creates `SUP_EVENTS` if it does not exist yet. Raises as `catch_up`."""
        return await self._consume(until_seq=None, until_ns=None, stop=stop, progress=progress)

    # --- the loop ---------------------------------------------------------------------------

    async def _consume(
        self,
        *,
        until_seq: int | None,
        until_ns: int | None,
        stop: asyncio.Event | None,
        progress: ProgressCallback | None,
    ) -> Progress:
        collecting = gc.isenabled()
        if self.bulk:
            gc.disable()
        try:
            return await self._consume_stream(until_seq, until_ns, stop, progress)
        finally:
            if collecting:
                gc.enable()

    async def _consume_stream(
        self,
        until_seq: int | None,
        until_ns: int | None,
        stop: asyncio.Event | None,
        progress: ProgressCallback | None,
    ) -> Progress:
        follow = stop is not None
        start = self.store.last_seq() + 1
        state = Progress(seq=start - 1, target=0, from_seq=start - 1)
        nc = await self._connect(follow, lean=self.bulk and not follow and lean_supported())
        try:
            last = await self._stream_last_seq(nc, wait=stop)
            if last is None:  # stopped while waiting for the stream
                return state
            if not follow:
                state.target = last if until_seq is None else min(until_seq, last)
                if state.target < start:
                    return state
                until_seq = state.target  # what the stream holds now, not what comes later
            try:
                if not (
                    isinstance(nc, BulkClient)
                    and await self._bulk_read(nc, state, until_seq, until_ns, progress)
                ):
                    reader = PullReader(nc, self.stream, start, self.nats_url)
                    try:
                        await self._read(reader, nc, state, until_seq, until_ns, stop, progress)
                    finally:
                        await reader.close()
                while self._inflight:
                    await self._settle_oldest(state, progress)
            finally:
                await self._abandon()
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
        return state

    async def _bulk_read(
        self,
        nc: BulkClient,
        state: Progress,
        until_seq: int | None,
        until_ns: int | None,
        progress: ProgressCallback | None,
    ) -> bool:
        """Read a bounded run through `projections.stream.bulkread`; False (nothing read)
        when this nats-py does not look as that module expects."""
        sub = await self._subscribe(nc, state.seq + 1)
        try:
            sink = Sink(state.seq, until_seq, until_ns, high_water=self.batch_size)
            if not nc.attach(sink, sub):
                return False
            await self._read_bulk(nc, sink, state, progress)
            return True
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _read(
        self,
        reader: PullReader,
        nc: Any,
        state: Progress,
        until_seq: int | None,
        until_ns: int | None,
        stop: asyncio.Event | None,
        progress: ProgressCallback | None,
    ) -> None:
        buf: list[Msg] = []
        born = 0.0
        urgent = False  # the batch holds a task's end: someone may be waiting for it
        finished = False
        seen = state.seq
        # A bulk run's first batch is a fifth of the others: the decoders and the writer
        # start while the second is read, instead of the cores idling while it is read.
        limit = max(1, self.batch_size // 5) if self.bulk else self.batch_size
        while not finished:
            while self._inflight and self._inflight[0].done():
                await self._settle_oldest(state, progress)
            if (
                buf
                and self._inflight
                and not self.bulk
                and not (stop is not None and stop.is_set())
            ):
                # Live, a batch waits for the writer to be free, growing at the server
                # meanwhile (a fetch now and again would cost both sides CPU for nothing).
                await asyncio.wait([self._inflight[0]], timeout=_POLL_S)
                continue
            wait = self._wait(buf, born, urgent)
            if buf and not (self.bulk or urgent or self.awaited) and wait > _MIN_FETCH_S:
                # Live, a batch not due yet grows at the server until it is: one fetch
                # then, rather than a round trip each time an event arrives.
                if stop is None:
                    await asyncio.sleep(wait)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), wait)
                wait = _MIN_FETCH_S
            fetched_at = time.monotonic()
            chunk = await reader.fetch(limit - len(buf), wait)
            if not chunk and stop is None and nc.is_closed:
                raise StreamUnavailable(self.nats_url, "the connection closed during the run")
            if chunk:
                chunk, finished, seen = _bound(chunk, seen, until_seq, until_ns, stop is None)
                if chunk and not buf:
                    born = fetched_at
                buf.extend(chunk)
                urgent = urgent or (not self.bulk and self._awaits(chunk))
            stopping = stop is not None and stop.is_set()
            # Live, an aged batch waits for the writer to be free, and grows meanwhile: cut
            # early, it would queue behind the batch being applied and its events would wait
            # for two applications instead of one (each has a fixed cost).
            now = time.monotonic()
            aged = (
                bool(buf)
                and not self.bulk
                and not self._inflight
                and (urgent or now - born >= self.batch_age_s)
                and now >= self._rested(born)
            )
            if buf and (len(buf) >= limit or aged or finished or stopping):
                # A chunk may overshoot the bound: the batch is cut there and the rest
                # starts the next one (or goes too, in batches, when the run ends).
                while buf:
                    await self._submit(_unpack(buf[:limit]), state, progress)
                    buf, limit = buf[limit:], self.batch_size
                    urgent = self._awaits(buf)
                    if len(buf) < limit and not (finished or stopping):
                        break  # the rest keeps its `born`: it has waited as long
            finished = finished or stopping

    async def _read_bulk(
        self, nc: BulkClient, sink: Sink, state: Progress, progress: ProgressCallback | None
    ) -> None:
        """`_read` for a bounded bulk run: the messages come through `sink` (see
        `projections.stream.bulkread`), in batches of `batch_size` (the first a fifth of it)."""
        limit = max(1, self.batch_size // 5)
        while True:
            while self._inflight and self._inflight[0].done():
                await self._settle_oldest(state, progress)
            if len(sink) >= limit or (sink.finished and len(sink)):
                batch = sink.take(limit)
                await nc.release()
                await self._submit(batch, state, progress)
                limit = self.batch_size
                continue
            if sink.finished:
                return
            if nc.is_closed:
                raise StreamUnavailable(self.nats_url, "the connection closed during the run")
            sink.want = limit
            sink.ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sink.ready.wait(), _POLL_S)

    def _awaits(self, msgs: list[Msg]) -> bool:
        return bool(self.awaited) and any(ends_task(m, self.awaited) for m in msgs)

    def _wait(self, buf: list[Msg], born: float, urgent: bool = False) -> float:
        """How long the next fetch may wait for messages: with no batch, `batch_age_s` (so a
        batch is never older than that when its fetch returns; live, also the time to look
        at `stop`) or `_POLL_S` in bulk; with a batch, until it is due (an urgent one is due
        once the writer has rested)."""
        if not buf:
            if self._inflight and not self.bulk:
                # A batch is being applied: look again soon, to settle it (and wake who
                # waits for it) as soon as it is done, not when this fetch gives up.
                return _SETTLE_POLL_S
            return _POLL_S if self.bulk else self.batch_age_s
        if self.bulk:
            return _POLL_S
        aged = born if urgent else born + self.batch_age_s
        due = max(aged, self._rested(born)) - time.monotonic()
        return max(due, _MIN_FETCH_S)

    def _rested(self, born: float) -> float:
        """When the writer's rest ends for a batch born at `born`: at `_rest_until`, but
        never more than `rest_lag_s` after the batch's first message arrived (a long
        batch is not followed by a rest as long: its events have waited enough)."""
        return min(self._rest_until, born + self.rest_lag_s)

    async def _submit(
        self, batch: _Raw, state: Progress, progress: ProgressCallback | None
    ) -> None:
        """Start `batch` down the pipeline, after waiting for room in it."""
        while len(self._inflight) >= self._max_in_flight:
            await self._settle_oldest(state, progress)
        previous = self._inflight[-1] if self._inflight else None
        self._inflight.append(asyncio.ensure_future(self._process(batch, previous)))

    async def _process(
        self, batch: _Raw, previous: asyncio.Task[ApplyResult] | None
    ) -> ApplyResult:
        loop = asyncio.get_running_loop()
        decode = self._workers.stage if self._workers is not None else stage_raw
        staged = await loop.run_in_executor(self._decoder, decode, *batch)
        del batch  # the messages are not kept while the batch waits for its turn
        if previous is not None:
            await asyncio.wait([previous])
            if previous.cancelled() or previous.exception() is not None:
                raise _Skipped("an earlier batch was not applied")
        return await loop.run_in_executor(self._writer, self._apply, staged)

    def _apply(self, staged: Staged) -> ApplyResult:
        """Writer thread. In bulk mode, checkpoint every `_BULK_CHECKPOINT` events: that
        bounds the WAL (and what waits in memory for the checkpoint) on long histories.
        Not more often: each checkpoint rewrites the tables' open row groups."""
        result = self.store.apply(staged)
        if self.bulk:
            self._unflushed += staged.events
            if self._unflushed >= _BULK_CHECKPOINT:
                self.store.checkpoint()
                self._unflushed = 0
        return result

    async def _settle_oldest(self, state: Progress, progress: ProgressCallback | None) -> None:
        result = await asyncio.shield(self._inflight[0])
        self._inflight.popleft()
        if self.max_busy < 1 and not self.bulk:
            self._rest_until = time.monotonic() + result.apply_s * (1 / self.max_busy - 1)
        state.add(result)
        if progress is not None:
            progress(state)

    async def _abandon(self) -> None:
        """Leave nothing running: on an error or a cancellation, interrupt the batch being
        applied (it is rolled back) and wait for every batch in flight to end."""
        if not self._inflight:
            return
        self.store.interrupt()
        tasks = list(self._inflight)
        self._inflight.clear()
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
        with contextlib.suppress(BaseException):
            await asyncio.wrap_future(self._writer.submit(lambda: None))

    # --- NATS -----------------------------------------------------------------------------

    async def _connect(self, follow: bool, *, lean: bool = False) -> Any:
        """A connection; with `lean`, a `BulkClient` (a bounded bulk run)."""

        async def _quiet(e: Exception) -> None:
            log.debug("projector nats: %r", e)

        nc = BulkClient() if lean else nats.NATS()
        try:
            await nc.connect(
                **connect_options(self.nats_url),
                connect_timeout=self.connect_timeout,  # type: ignore[arg-type]  # a float works
                allow_reconnect=follow,
                max_reconnect_attempts=-1 if follow else 0,
                error_cb=_quiet,
                name="supervisor-projector",
            )
        except (OSError, TimeoutError, nats.errors.Error) as e:
            raise StreamUnavailable(self.nats_url, repr(e)) from e
        return nc

    async def _stream_last_seq(self, nc: Any, *, wait: asyncio.Event | None) -> int | None:
        """The stream's last sequence; 0 while it does not exist, or, when following
        (`wait` given), once it exists: the streams are the operator's (or the daemon's)
        to make, never the projection's. None when `wait` was set first."""
        js = nc.jetstream()
        missing = False
        try:
            while True:
                try:
                    info = await js.stream_info(self.stream)
                    return int(info.state.last_seq)
                except nats.js.errors.NotFoundError:
                    if wait is None:
                        return 0
                if wait.is_set():
                    return None
                if not missing:
                    log.info("stream %s does not exist yet; waiting for it", self.stream)
                    missing = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wait.wait(), STREAM_POLL_S)
        except (OSError, TimeoutError, nats.errors.Error) as e:
            raise StreamUnavailable(self.nats_url, repr(e)) from e

    async def _subscribe(self, nc: Any, start: int) -> Any:
        """The ordered push consumer `projections.stream.bulkread` reads."""
        js = nc.jetstream()
        try:
            return await js.subscribe(
                EVENTS_SUBJECTS[0],
                stream=self.stream,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                config=ConsumerConfig(opt_start_seq=start),
                pending_msgs_limit=0,
                pending_bytes_limit=0,
            )
        except (OSError, TimeoutError, nats.errors.Error) as e:
            raise StreamUnavailable(self.nats_url, repr(e)) from e


def _bound(
    chunk: list[Msg], seen: int, until_seq: int | None, until_ns: int | None, bounded: bool
) -> tuple[list[Msg], bool, int]:
    """Cut `chunk` at the bounds of a bounded run and drop anything at or before `seen`
    (a consumer reset never re-delivers, but the watermark must only move forward).
    Returns (kept, finished, last seq kept)."""
    seq, ns, pending = parse_reply(chunk[-1].reply)
    first_seq = parse_reply(chunk[0].reply)[0]
    over = (until_seq is not None and seq > until_seq) or (until_ns is not None and ns > until_ns)
    if not over and first_seq > seen:
        finished = bounded and (pending == 0 or (until_seq is not None and seq >= until_seq))
        return chunk, finished, seq
    kept: list[Msg] = []
    finished = False
    for m in chunk:
        seq, ns, pending = parse_reply(m.reply)
        if seq <= seen:
            continue
        if (until_seq is not None and seq > until_seq) or (until_ns is not None and ns > until_ns):
            finished = True
            break
        kept.append(m)
        seen = seq
        if bounded and (pending == 0 or seq == until_seq):
            finished = True
            break
    return kept, finished and bounded, seen
