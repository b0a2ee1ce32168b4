"""A lean read of the event stream for bulk runs (replay, a catch-up far behind).

nats-py turns each delivered message into a `Msg` (its headers parsed into a dict, its
subject and reply subject decoded, its ack metadata tracked) and queues it for the
subscription: about 6 µs of the reading process's CPU per message, which a raw read pays
too, and in a replay the reading process is the busiest one. A bulk run needs only each
message's reply subject, subject and payload, in order. `BulkClient` is a nats-py client
whose `_process_msg` takes the data messages of one ordered push subscription straight
into a `Sink` (three lists), about twice as fast, and does what nats-py's own path does for
an ordered consumer:

- the delivery-sequence check: a message out of order goes down nats-py's path, which
  resets the consumer after the last stream sequence taken (and the sink drops anything
  at or before it, should the server send it again);
- the bookkeeping nats-py's heartbeat and flow-control logic read (`_dseq`, `_sseq`,
  `_fciseq`, `_cmeta`, `_active`).

Control messages (heartbeats, flow-control requests) and every other subscription take
nats-py's path, except a flow-control request that arrives while the sink already holds
`high_water` messages: its answer is held until the projector has taken a batch, so the
server stops sending while the pipeline is full (memory stays bounded by the pipeline, the
sink and the server's flow-control window).

This is the only module of the project that touches nats-py's internals, and it is
quarantined: `_process_msg` is nats-py's private method and the ordered consumer's
bookkeeping private state, so `pyproject.toml` pins nats-py to the one version this was
written against (`NATS_PY_VERSION`), `lean_supported` checks that version and the
method's signature, `BulkClient.attach` the state's fields, and the projector reads
through its public pull path (`projections.serve.projector._PullReader`) when any of
them differs. `bench/bench_replay.py --public` measures what this module gains.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import inspect
from typing import Any

import nats.errors
from nats.aio.client import Client

from projections.stream.decode import reply_tokens

_SIGNATURE = ["self", "sid", "subject", "reply", "data", "headers"]
_FLOW_CONTROL = b"NATS/1.0 100 FlowControl"
_ACK = b"$JS.ACK."
_JSI_FIELDS = ("_dseq", "_sseq", "_fciseq", "_cmeta", "_active")


NATS_PY_VERSION = "2.16.0"
"""The nats-py this module was written against (and `pyproject.toml` pins)."""


def lean_supported() -> bool:
    """Whether this nats-py is the pinned one and dispatches as `BulkClient` expects."""
    try:
        if importlib.metadata.version("nats-py") != NATS_PY_VERSION:
            return False
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        return list(inspect.signature(Client._process_msg).parameters) == _SIGNATURE
    except (AttributeError, TypeError, ValueError):
        return False


class Sink:
    """The messages of a bounded run, as three parallel lists, in stream order.

    Keeps what follows `seen` (the watermark), up to `until_seq` and to the last message
    stored at or before `until_ns`, and stops at the end of the stream (a message with
    nothing pending after it); `finished` then. `ready` is set once `want` messages wait
    or the run is finished.
    """

    def __init__(
        self, seen: int, until_seq: int | None, until_ns: int | None, high_water: int
    ) -> None:
        self.replies: list[str] = []
        self.subjects: list[str] = []
        self.datas: list[bytes] = []
        self.seen = seen
        self.until_seq = until_seq
        self.until_ns = until_ns
        self.high_water = high_water
        self.finished = False
        self.want = 1
        self.ready = asyncio.Event()
        self.held_reply: str | None = None
        """A flow-control request not answered yet (see the module docstring)."""
        self.sub: Any = None
        self.jsi: Any = None

    def __len__(self) -> int:
        return len(self.datas)

    def add(
        self, reply: str, subject: str, data: bytes, seq: int, tokens: list[str], base: int
    ) -> None:
        """One data message of the consumer: its stream sequence `seq`, its reply's
        `tokens` split (the sequence at `base`, then the stored time and the pending
        count two and three further)."""
        if self.finished:
            return
        if seq <= self.seen:
            return
        if (self.until_seq is not None and seq > self.until_seq) or (
            self.until_ns is not None and int(tokens[base + 2]) > self.until_ns
        ):
            self._finish()
            return
        self.replies.append(reply)
        self.subjects.append(subject)
        self.datas.append(data)
        self.seen = seq
        if tokens[base + 3] == "0" or seq == self.until_seq:
            self._finish()
        elif len(self.datas) >= self.want:
            self.ready.set()

    def take(self, n: int) -> tuple[list[str], list[str], list[bytes]]:
        """The first `n` messages (or fewer), removed."""
        taken = self.replies[:n], self.subjects[:n], self.datas[:n]
        del self.replies[:n], self.subjects[:n], self.datas[:n]
        return taken

    def _finish(self) -> None:
        self.finished = True
        self.ready.set()


class BulkClient(Client):
    """A nats-py client that feeds one ordered push subscription into a `Sink`."""

    def __init__(self) -> None:
        super().__init__()
        self.sink: Sink | None = None

    def attach(self, sink: Sink, psub: Any) -> bool:
        """Route the data messages of `psub` (a JetStream ordered push subscription
        without a callback) to `sink`, after those nats-py already queued for it. False,
        and nothing routed, if the subscription lacks the internals this relies on (a
        nats-py that changed them): the caller then reads nats-py's queue."""
        sub = getattr(psub, "_sub", None)
        jsi = getattr(sub, "_jsi", None)
        queue = getattr(sub, "_pending_queue", None)
        if sub is None or queue is None or not all(hasattr(jsi, name) for name in _JSI_FIELDS):
            return False
        while not queue.empty():  # no await in between: nothing arrives meanwhile
            m = queue.get_nowait()
            queue.task_done()
            sub._pending_size -= len(m.data)
            tokens, base = reply_tokens(m.reply)
            sink.add(m.reply, m.subject, m.data, int(tokens[base]), tokens, base)
        sink.sub, sink.jsi = sub, jsi
        self.sink = sink
        return True

    async def release(self) -> None:
        """Answer the held flow-control request once the sink is below its high water. A
        connection lost meanwhile is the reader's to notice (`is_closed`)."""
        sink = self.sink
        if sink is None or sink.held_reply is None or len(sink) >= sink.high_water:
            return
        reply, sink.held_reply = sink.held_reply, None
        with contextlib.suppress(nats.errors.Error, OSError):
            await self.publish(reply)

    async def _process_msg(
        self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
    ) -> None:
        sink = self.sink
        if sink is not None and reply and self._subs.get(sid) is sink.sub:
            if reply.startswith(_ACK):  # a stored message, even an empty one (a poison)
                text = reply.decode()
                tokens, base = reply_tokens(text)
                jsi = sink.jsi
                if len(tokens) >= 9 and int(tokens[base + 1]) == jsi._dseq:
                    jsi._dseq += 1
                    jsi._sseq = seq = int(tokens[base])
                    jsi._fciseq += 1
                    jsi._cmeta = text
                    jsi._active = True
                    sink.add(text, subject.decode(), data, seq, tokens, base)
                    return
            elif len(sink) >= sink.high_water and (headers or b"").startswith(_FLOW_CONTROL):
                sink.jsi._active = True
                sink.held_reply = reply.decode()
                return
        await super()._process_msg(sid, subject, reply, data, headers)  # type: ignore[arg-type]
