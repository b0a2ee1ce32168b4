"""The live projector's reader of `SUP_EVENTS`: an ephemeral pull consumer (nats-py's
public API) from the projection's watermark on, made again when the server loses it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from projections.errors import StreamUnavailable
from projections.stream.decode import parse_reply
from schemas.streams import EVENTS_SUBJECTS

log = logging.getLogger(__name__)

_POLL_S = 0.1
_REST_S = 0.005  # how long the fetch after the first message may wait for more
# At most this many messages a fetch: the server pushes a whole fetch at once, and one of a
# bulk batch's size (250,000) outruns the client's reading until the server drops it as a
# slow consumer.
_FETCH_MAX = 4096
_CHECK_IDLE_S = 5.0  # idle this long, the pull reader asks whether its consumer still exists
_INACTIVE_S = 300.0  # the server deletes a pull consumer unused this long


class PullReader:
    """`SUP_EVENTS` from a sequence on, through an ephemeral pull consumer (nats-py's public
    API): `fetch(n, timeout)` answers at most `n` messages as soon as one is there (with
    those already behind it), or none once `timeout` passed. Acknowledging is off: where to resume is the projection's
    watermark, not the consumer's. A consumer the server lost is made again from the
    sequence after the last one fetched (checked when fetches have come back empty for
    `_CHECK_IDLE_S`, and after any error)."""

    def __init__(self, nc: Any, stream: str, start: int, url: str) -> None:
        self.nc, self.stream, self.next_seq, self.url = nc, stream, start, url
        self._sub: Any = None
        self._name: str | None = None
        self._idle_since = time.monotonic()

    async def _open(self) -> None:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=self.next_seq,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=_INACTIVE_S,
            mem_storage=True,
        )
        js = self.nc.jetstream()
        try:
            # Made without a name (the server names it): an ephemeral consumer is all the
            # node's credential may make on SUP_EVENTS (supervisor.eventlog.nats_auth).
            config.filter_subject = EVENTS_SUBJECTS[0]
            info = await js.add_consumer(self.stream, config)
            self._name = info.name
            self._sub = await js.pull_subscribe_bind(info.name, stream=self.stream)
        except (OSError, TimeoutError, nats.errors.Error) as e:
            await self._drop()
            raise StreamUnavailable(self.url, repr(e)) from e
        self._idle_since = time.monotonic()

    async def fetch(self, n: int, timeout: float) -> list[Msg]:
        if self._sub is None:
            try:
                await self._open()
            except StreamUnavailable:
                if not self.nc.is_connected:  # reconnecting: the consumer is made after
                    await asyncio.sleep(min(timeout, _POLL_S))
                    return []
                raise
        try:
            msgs: list[Msg] = await self._fetch(min(max(1, n), _FETCH_MAX), timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            msgs = []
        except nats.errors.Error as e:
            log.debug("projector fetch: %r; making the consumer again", e)
            await self._drop()
            await asyncio.sleep(min(timeout, _POLL_S))  # never a busy loop of new consumers
            return []
        if msgs:
            self.next_seq = parse_reply(msgs[-1].reply)[0] + 1
            self._idle_since = time.monotonic()
        elif time.monotonic() - self._idle_since >= _CHECK_IDLE_S:
            await self._check()
        return msgs

    async def _fetch(self, n: int, timeout: float) -> list[Msg]:
        """At most `n` messages, as soon as one is there. nats-py's `fetch(n)` that has to
        wait for messages keeps waiting, once the first came, until `n` came or `timeout`
        passed: a live batch's first event would sit in it for the whole timeout. So what
        the stream holds already is asked for first (a fetch that asks without waiting);
        when there is none, the wait is for one message, then the rest is asked for again.
        Raises TimeoutError when none came."""
        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
            return list(await self._sub.fetch(n, timeout=_REST_S))
        msgs: list[Msg] = await self._sub.fetch(1, timeout=max(timeout - _REST_S, _REST_S))
        if n > 1:
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                msgs += await self._sub.fetch(n - 1, timeout=_REST_S)
        return msgs

    async def _check(self) -> None:
        """Make the consumer again if the server no longer has it."""
        self._idle_since = time.monotonic()
        try:
            await self._sub.consumer_info()
        except nats.js.errors.NotFoundError:
            log.info(
                "projector: the stream's consumer was lost; making it again at seq %d",
                self.next_seq,
            )
            await self._drop()
        except (OSError, TimeoutError, nats.errors.Error) as e:
            log.debug("projector consumer check: %r", e)

    async def _drop(self) -> None:
        """Unsubscribe, and delete the consumer rather than leave it to its threshold."""
        sub, self._sub = self._sub, None
        name, self._name = self._name, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if name is not None and self.nc.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.nc.jetstream().delete_consumer(self.stream, name), 2)

    async def close(self) -> None:
        await self._drop()
