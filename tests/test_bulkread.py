"""The lean bulk read (`projections.stream.bulkread`): the sink's bounds as pure logic, then,
against a real nats-server, flow control held while the pipeline is full, the fallback
to nats-py's own path, and a server that dies mid-run (which ends any bounded catch-up,
bulk or not, with StreamUnavailable rather than a wait for ever)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import nats.js.client
import pytest

import projections.serve.projector as projector_module
import projections.stream.bulkread as bulkread
import projections.stream.pull as pull_module
from projections.errors import StreamUnavailable
from projections.serve.projector import Projector
from projections.serve.replay import replay
from projections.stream.bulkread import BulkClient, Sink, lean_supported
from supervisor.eventlog.nats_server import NatsServer
from testing.loadgen import publish
from testing.snapshot import tables
from testing.synthetic import mixed_history


def _reply(seq: int, ns: int, pending: int) -> str:
    return f"$JS.ACK.SUP_EVENTS.c.1.{seq}.{seq}.{ns}.{pending}"


def _feed(sink: Sink, *msgs: tuple[int, int, int]) -> None:
    for seq, ns, pending in msgs:
        reply = _reply(seq, ns, pending)
        sink.add(reply, "sup.x", str(seq).encode(), seq, reply.split("."), 5)


def test_the_sink_keeps_what_follows_the_watermark_up_to_the_bounds() -> None:
    sink = Sink(seen=2, until_seq=None, until_ns=None, high_water=10)
    _feed(sink, (1, 10, 9), (2, 20, 8), (3, 30, 7), (5, 50, 5))
    assert [d for d in sink.datas] == [b"3", b"5"] and not sink.finished
    _feed(sink, (3, 30, 7))  # a consumer reset sends it again: dropped
    assert len(sink) == 2
    _feed(sink, (6, 60, 0), (7, 70, 0))  # nothing pending after 6: the end of the stream
    assert sink.finished and sink.ready.is_set() and sink.seen == 6
    assert sink.take(2) == ([_reply(3, 30, 7), _reply(5, 50, 5)], ["sup.x"] * 2, [b"3", b"5"])
    assert sink.datas == [b"6"]

    by_seq = Sink(seen=0, until_seq=4, until_ns=None, high_water=10)
    _feed(by_seq, (1, 10, 9), (3, 30, 7), (4, 40, 6), (5, 50, 5))
    assert by_seq.finished and by_seq.datas == [b"1", b"3", b"4"]

    gap = Sink(seen=0, until_seq=4, until_ns=None, high_water=10)  # 4 was deleted
    _feed(gap, (3, 30, 7), (5, 50, 5))
    assert gap.finished and gap.datas == [b"3"]

    by_time = Sink(seen=0, until_seq=None, until_ns=35, high_water=10)
    _feed(by_time, (1, 10, 9), (3, 30, 7), (4, 40, 6))
    assert by_time.finished and by_time.datas == [b"1", b"3"]


def test_the_sink_is_ready_once_it_holds_what_is_wanted() -> None:
    sink = Sink(seen=0, until_seq=None, until_ns=None, high_water=10)
    sink.want = 3
    _feed(sink, (1, 10, 9), (2, 20, 8))
    assert not sink.ready.is_set()
    _feed(sink, (3, 30, 7))
    assert sink.ready.is_set() and not sink.finished


def test_this_nats_py_dispatches_as_the_lean_read_expects() -> None:
    # Fails when an upgrade of nats-py changes the private method the lean read overrides;
    # replays then still work, through nats-py's own path, at its speed.
    assert lean_supported()


@pytest.mark.nats
async def test_a_full_pipeline_holds_flow_control_and_loses_nothing(
    nats_url: str, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    last = await publish(nats_url, mixed_history(30_000, id_prefix="fc"))
    fast = tmp_dir / "fast.duckdb"
    await replay(fast, nats_url)

    peak = 0
    held = 0
    add, process = Sink.add, BulkClient._process_msg

    def counting_add(self: Sink, *args: Any) -> None:
        nonlocal peak
        add(self, *args)
        peak = max(peak, len(self))

    async def counting_process(self: BulkClient, *args: Any) -> None:
        nonlocal held
        before = self.sink.held_reply if self.sink else None
        await process(self, *args)
        if self.sink is not None and self.sink.held_reply is not None and before is None:
            held += 1

    monkeypatch.setattr(Sink, "add", counting_add)
    monkeypatch.setattr(BulkClient, "_process_msg", counting_process)
    slow = tmp_dir / "slow.duckdb"
    with Projector(slow, nats_url, batch_size=200, bulk=True) as p:
        apply = p.store.apply

        def slow_apply(staged: Any) -> Any:
            time.sleep(0.02)  # a writer far slower than the stream
            return apply(staged)

        p.store.apply = slow_apply  # type: ignore[method-assign]
        result = await p.catch_up()
    assert result.seq == last and result.applied == 30_000
    assert held > 0, "the sink never held a flow-control answer"
    # The server's flow-control window is a few thousand of these messages; without the
    # held answers, the sink takes in the whole stream while the writer works.
    assert peak < 12_000, f"the sink held {peak} messages: flow control did not bound it"
    assert tables(slow) == tables(fast)


@pytest.mark.nats
async def test_without_the_lean_read_a_replay_is_the_same(
    nats_url: str, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = mixed_history(3_000, id_prefix="fb")
    await publish(nats_url, history)
    lean = tmp_dir / "lean.duckdb"
    await replay(lean, nats_url, batch_size=700)
    # Replays up to a point, each read its own way, must cut at the same message.
    lean_seq, lean_time = tmp_dir / "lean-seq.duckdb", tmp_dir / "lean-time.duckdb"
    await replay(lean_seq, nats_url, until_seq=1_234, batch_size=700)
    (stored_at,) = [r[2] for r in tables(lean)["events"] if r[0] == 2_001]
    await replay(lean_time, nats_url, until_time=stored_at, batch_size=700)
    assert len(tables(lean_seq)["events"]) == 1_234
    assert max(r[0] for r in tables(lean_time)["events"]) >= 2_001

    # The ordered consumer's private state lacks a field the lean read writes: the
    # BulkClient connects, routes nothing, and the projector reads nats-py's queue.
    with monkeypatch.context() as m:
        m.setattr(bulkread, "_JSI_FIELDS", (*bulkread._JSI_FIELDS, "_not_in_this_nats_py"))
        m.setattr(projector_module.Projector, "_read_bulk", _refuse)
        unrouted = tmp_dir / "unrouted.duckdb"
        result = await replay(unrouted, nats_url, batch_size=700)
    assert result.applied == len(history)
    assert tables(unrouted) == tables(lean)

    # The private method's signature differs: no BulkClient at all.
    monkeypatch.setattr(projector_module, "lean_supported", lambda: False)
    monkeypatch.setattr(bulkread.BulkClient, "__init__", _refuse)
    plain = tmp_dir / "plain.duckdb"
    result = await replay(plain, nats_url, batch_size=700)
    assert result.applied == len(history)
    assert tables(plain) == tables(lean)
    plain_seq, plain_time = tmp_dir / "plain-seq.duckdb", tmp_dir / "plain-time.duckdb"
    await replay(plain_seq, nats_url, until_seq=1_234, batch_size=700)
    await replay(plain_time, nats_url, until_time=stored_at, batch_size=700)
    assert tables(plain_seq) == tables(lean_seq)
    assert tables(plain_time) == tables(lean_time)


@pytest.mark.nats
async def test_an_empty_message_is_a_dead_letter_even_the_last_one(
    nats_url: str, tmp_dir: Path
) -> None:
    # Control messages are empty too: a stored message is told apart by its reply subject.
    history = mixed_history(500, id_prefix="em")
    empty = ("sup.task.submitted.n1.t-empty", b"")
    last = await publish(nats_url, [*history[:200], empty, *history[200:], empty])
    result = await asyncio.wait_for(replay(tmp_dir / "p.duckdb", nats_url), 30)
    assert (result.seq, result.applied, result.dead) == (last, 500, 2)
    dead = tables(tmp_dir / "p.duckdb")["dead_letters"]
    assert [(row[0], row[4]) for row in dead] == [(201, "undecodable"), (last, "undecodable")]


def _refuse(self: Any, *args: Any) -> None:
    raise AssertionError("the lean read used although this nats-py does not support it")


@pytest.mark.nats
@pytest.mark.parametrize("bulk", [True, False], ids=["bulk", "live-sized"])
async def test_a_server_that_dies_mid_catch_up_is_stream_unavailable(
    tmp_dir: Path, bulk: bool
) -> None:
    server = NatsServer(tmp_dir / "dying")
    url = server.start()
    try:
        await publish(url, mixed_history(20_000, id_prefix="dy"))
        killed = asyncio.Event()

        def kill_on_first_batch(progress: Any) -> None:
            if not killed.is_set() and server.proc is not None:
                server.proc.kill()
                killed.set()

        with Projector(tmp_dir / "p.duckdb", url, batch_size=1000, bulk=bulk) as p:
            with pytest.raises(StreamUnavailable):
                await asyncio.wait_for(p.catch_up(progress=kill_on_first_batch), 30)
            assert killed.is_set()
            assert 0 < p.last_seq < 20_000
    finally:
        server.stop()


@pytest.mark.nats
async def test_the_public_path_never_asks_for_more_than_a_fetch_can_carry(
    nats_url: str, tmp_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk batch is 250,000 messages; a pull request that large is pushed at once and
    outruns the client until the server drops it as a slow consumer (what a 1M-event
    replay on the public path met). The reader asks in fetches of at most `_FETCH_MAX`."""
    history = mixed_history(9_000, id_prefix="fx")
    await publish(nats_url, history)
    asked: list[int] = []
    original = nats.js.client.JetStreamContext.PullSubscription.fetch

    async def recording(self, batch: int = 1, *args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(batch)
        return await original(self, batch, *args, **kwargs)

    monkeypatch.setattr(nats.js.client.JetStreamContext.PullSubscription, "fetch", recording)
    monkeypatch.setattr(projector_module, "lean_supported", lambda: False)
    result = await replay(tmp_dir / "public.duckdb", nats_url)
    assert result.applied == len(history)
    assert asked and max(asked) == pull_module._FETCH_MAX
