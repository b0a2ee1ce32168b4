"""Following `SUP_EVENTS` live, filtered, one raw JSON object a line: what `supervisor tail`
prints and what `GET /v1/errors` streams.

The filters map onto subject tokens (`sup.<category>.<name>.<node>.<task>`) so the server
does the narrowing: `--errors` is `sup.error.>`, `--type T` is `sup.error.T.>`, `--task ID`
fixes the last token. `--code` (error events only) needs the payload; it is read with a
tolerant decoder (just the `code` field), so event types this version does not know yet
pass through.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
import nats.errors
from nats.js.api import ConsumerConfig, DeliverPolicy

from schemas.errors import NatsUnavailable
from schemas.params import point_in_time, whole_number
from schemas.streams import EVENTS_STREAM
from supervisor.eventlog.nats_client import close_quietly, connect_nats

_TOKEN_RE = re.compile(r"^[^.\s*>]+$")


class Writer(Protocol):
    """Where `tail` writes its lines (a text stream, or the daemon's queue)."""

    def write(self, text: str, /) -> object: ...

    def flush(self) -> object: ...


class _Coded(msgspec.Struct):
    code: str | None = None


_code_decoder = msgspec.json.Decoder(_Coded)


def parse_since(text: str) -> datetime:
    """`--since` / `since`: a duration back from now (`10m`, `2h`, `1.5h`) or an ISO-8601
    time (`schemas.params.point_in_time`). Raises `ValueError` naming `--since`."""
    return point_in_time("since", text, datetime.now(UTC))


def subject_filter(
    *, errors: bool = False, type_: str | None = None, task: str | None = None
) -> str:
    """The `SUP_EVENTS` subject filter for the given options (see the module docstring)."""
    for name, value in (("--type", type_), ("--task", task)):
        if value is not None and not _TOKEN_RE.match(value):
            raise ValueError(f"{name} {value!r} is not a single subject token")
    category = "error" if errors or type_ else "*"
    name = type_ or "*"
    if task is not None:
        return f"sup.{category}.{name}.*.{task}"
    if type_:
        return f"sup.error.{type_}.>"
    return "sup.error.>" if errors else "sup.>"


def _start_time(since: datetime) -> datetime:
    return since if since.tzinfo is not None else since.replace(tzinfo=UTC)


async def tail(
    nats_url: str,
    *,
    errors: bool = False,
    type_: str | None = None,
    code: str | None = None,
    task: str | None = None,
    since: datetime | None = None,
    out: Writer,
    stop: asyncio.Event | None = None,
    limit: int | None = None,
    connect_timeout: float = 5.0,
) -> int:
    """Write each matching event of `SUP_EVENTS` to `out` as it arrives, as the raw JSON
    it was published as, one a line. From `since` (a time, or a duration back from now)
    if given, else only events published from now on. Runs until `stop` is set, `limit`
    events were written, or the task is cancelled; returns how many were written.

    Raises `ValueError` for a filter that is not a subject token, `NatsUnavailable` when
    NATS cannot be reached or the stream does not exist.
    """
    # Only error events carry a `code`, so --code also narrows to sup.error.>.
    subject = subject_filter(errors=errors or code is not None, type_=type_, task=task)
    if since is None:
        config = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
    else:
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=_start_time(since)
        )
    if limit is not None and limit <= 0:
        return 0
    nc = await connect_nats(
        nats_url, reconnect=True, timeout=connect_timeout, name="supervisor-tail"
    )
    written = 0
    try:
        js = nc.jetstream()
        try:
            sub = await js.subscribe(
                subject, stream=EVENTS_STREAM, ordered_consumer=True, config=config
            )
        except nats.errors.Error as e:
            raise NatsUnavailable(nats_url, f"cannot follow {EVENTS_STREAM}: {e!r}") from e

        async def _pump() -> None:
            nonlocal written
            async for msg in sub.messages:
                if code is not None:
                    try:
                        if _code_decoder.decode(msg.data).code != code:
                            continue
                    except msgspec.DecodeError:
                        continue
                out.write(msg.data.decode(errors="replace") + "\n")
                out.flush()
                written += 1
                if limit is not None and written >= limit:
                    return

        pump = asyncio.create_task(_pump())
        waiters: set[asyncio.Future[Any]] = {pump}
        if stop is not None:
            waiters.add(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    finally:
        await close_quietly(nc)
    return written


async def follow_errors(nats_url: str, params: Mapping[str, str]) -> AsyncIterator[bytes]:
    """`GET /v1/errors`: the error stream with `supervisor tail`'s filters (`type`, `code`,
    `task`, `since`, `limit`), one JSON line at a time, for one HTTP client. Raises
    ValueError for an unknown parameter or value."""
    unknown = set(params) - {"type", "code", "task", "since", "limit"}
    if unknown:
        raise ValueError(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    since = parse_since(params["since"]) if "since" in params else None
    limit = whole_number("limit", params["limit"], 1, 10**9) if "limit" in params else None
    subject_filter(errors=True, type_=params.get("type"), task=params.get("task"))
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()
    follow = asyncio.ensure_future(
        tail(
            nats_url,
            errors=True,
            type_=params.get("type"),
            code=params.get("code"),
            task=params.get("task"),
            since=since,
            limit=limit,
            out=_QueueWriter(lines),
        )
    )
    follow.add_done_callback(lambda _: lines.put_nowait(None))
    try:
        while (line := await lines.get()) is not None:
            yield line
        if not follow.cancelled() and follow.exception() is not None:
            raise follow.exception()  # type: ignore[misc]
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await follow


class _QueueWriter:
    """A text sink for `tail` that hands each line to a queue. A client too slow to read
    `MAX_BUFFERED` lines loses the newest ones rather than growing the daemon's memory
    (the stream keeps them all: `since` reads them again)."""

    MAX_BUFFERED = 10_000

    def __init__(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.queue = queue

    def write(self, text: str) -> int:
        line = text.rstrip("\n")
        if line and self.queue.qsize() < self.MAX_BUFFERED:
            self.queue.put_nowait(line.encode())
        return len(text)

    def flush(self) -> None:
        pass
