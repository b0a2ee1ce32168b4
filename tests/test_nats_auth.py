"""Least privilege, judged by effect: the embedded NATS server is never anonymous, and what
each credential may not do is checked by the state afterwards (the stream, the queue, the
consumers), on a real server started the way every command starts it
(`supervisor.daemon.node.nats_for` on a data dir)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext

from schemas import SupervisorStarted, encode_event
from schemas.connection import connect_options
from schemas.errors import NatsUnavailable
from schemas.streams import COMMANDS_STREAM, EVENTS_STREAM, TASKS_STREAM
from supervisor.daemon.nats_target import nats_for
from supervisor.eventlog.emitter import utcnow
from supervisor.eventlog.nats_auth import (
    AUTH_FILE,
    SERVER_CONF,
    read_credentials,
    redact,
    with_user,
)
from supervisor.eventlog.nats_client import MSG_ID_HEADER, connect_nats
from supervisor.execution.workqueue import ensure_consumers

pytestmark = pytest.mark.nats


def _event(i: int) -> bytes:
    return encode_event(
        SupervisorStarted(event_id=f"e-{i}", occurred_at=utcnow(), node_id="n1", instance_id="i-1")
    )


async def _connect(url: str, errors: list[str]) -> nats.NATS:
    """A client as the supervisor's own connect: with the role's reply prefix."""

    async def on_error(e: Exception) -> None:
        errors.append(str(e))

    return await nats.connect(**connect_options(url), error_cb=on_error, connect_timeout=5)


async def _admin(data: Path, node_url: str) -> nats.NATS:
    """The embedded server's admin, to look at the state after an attack."""
    creds = read_credentials(data)
    assert creds is not None
    return await nats.connect(with_user(redact(node_url), "admin", creds.admin))


async def _refused(call: Awaitable[object]) -> None:
    """A JetStream call the credential may not make: no answer (a permission violation)
    or an error answer. What counts is the state afterwards, checked by the caller (on
    loopback, an answer that comes at all comes within milliseconds)."""
    with contextlib.suppress(TimeoutError, nats.errors.Error):
        await asyncio.wait_for(call, 0.5)


async def _publish_events(js: JetStreamContext, n: int) -> None:
    for i in range(n):
        await js.publish(
            f"sup.supervisor.started.n1.t{i}", _event(i), headers={MSG_ID_HEADER: f"e-{i}"}
        )


async def test_the_embedded_server_refuses_anonymous_clients(tmp_dir: Path) -> None:
    data = tmp_dir / "data"
    async with nats_for(None, data) as node_url:
        creds = read_credentials(data)
        assert creds is not None and creds.admin
        for name in (AUTH_FILE, SERVER_CONF):
            assert stat.S_IMODE(os.stat(data / name).st_mode) == 0o600
        server = redact(node_url)
        assert node_url == with_user(server, "node", creds.node)
        with pytest.raises(NatsUnavailable, match="Authorization Violation"):
            await connect_nats(server, reconnect=False, timeout=2)
        errors: list[str] = []
        node = await _connect(node_url, errors)
        info = await node.jetstream().stream_info(EVENTS_STREAM)
        await node.close()
    # The admin made the streams at start-up, history append-only.
    assert (info.config.deny_delete, info.config.deny_purge) == (True, True)


async def test_the_node_can_erase_no_history_strand_no_queue_nor_make_streams(
    tmp_dir: Path,
) -> None:
    """Every attack of the node credential, judged by the state afterwards."""
    data = tmp_dir / "data"
    async with nats_for(None, data) as node_url:
        errors: list[str] = []
        node = await _connect(node_url, errors)
        js = node.jetstream()
        try:
            await _publish_events(js, 35)
            for prio in ("high", "normal", "low"):
                await js.publish(f"suptask.{prio}", b"{}")
            await ensure_consumers(js, ack_wait_s=30, max_deliveries=6)
            events = (await js.stream_info(EVENTS_STREAM)).config

            # History: a lower limit, then back (what erased 32 of 35 events), purge,
            # delete, a message delete, and the deny flags taken back.
            await _refused(js.update_stream(replace(events, max_msgs=3)))
            await _refused(js.update_stream(replace(events, deny_delete=False, deny_purge=False)))
            await _refused(js.purge_stream(EVENTS_STREAM))
            await _refused(js.delete_msg(EVENTS_STREAM, 2))
            await _refused(js.delete_stream(EVENTS_STREAM))
            # The queue: a purge, its consumers deleted, the stream deleted.
            await _refused(js.purge_stream(TASKS_STREAM))
            for prio in ("high", "normal", "low"):
                await _refused(js.delete_consumer(TASKS_STREAM, f"exec-{prio}"))
            await _refused(js.delete_stream(TASKS_STREAM))
            # Streams of its own making (a KV bucket is a stream).
            await _refused(js.create_key_value(bucket="anything"))
            await _refused(js.add_stream(name="OTHER", subjects=["other.>"]))
            # Subjects outside its own.
            await node.publish("elsewhere.subject", b"{}")
            await node.subscribe("elsewhere.>")
            await node.flush()
            await asyncio.sleep(0.3)

            # The state, as the admin sees it.
            admin = await _admin(data, node_url)
            ajs = admin.jetstream()
            after = await ajs.stream_info(EVENTS_STREAM)
            tasks = await ajs.stream_info(TASKS_STREAM)
            consumers = sorted(c.name or "" for c in await ajs.consumers_info(TASKS_STREAM))
            names = sorted(s.config.name or "" for s in await ajs.streams_info())
            await admin.close()
        finally:
            await node.close()
    assert (after.state.messages, after.state.first_seq) == (35, 1)
    assert (after.config.max_msgs, after.config.deny_delete, after.config.deny_purge) == (
        -1,
        True,
        True,
    )
    assert tasks.state.messages == 3
    assert consumers == ["exec-high", "exec-low", "exec-normal"]
    assert names == [COMMANDS_STREAM, EVENTS_STREAM, TASKS_STREAM]
    assert any('permissions violation for publish to "elsewhere.subject"' in e for e in errors)
    assert any('permissions violation for subscription to "elsewhere.>"' in e for e in errors)


async def test_the_reader_only_reads(tmp_dir: Path) -> None:
    """The reader follows and reads SUP_EVENTS; it makes no durable consumer, deletes none,
    takes nothing from the callbacks consumer, and reads no other client's replies."""
    data = tmp_dir / "data"
    async with nats_for(None, data) as node_url:
        creds = read_credentials(data)
        assert creds is not None
        server = redact(node_url)
        node_errors: list[str] = []
        node = await _connect(node_url, node_errors)
        njs = node.jetstream()
        await _publish_events(njs, 3)
        await njs.add_consumer(
            EVENTS_STREAM,
            ConsumerConfig(durable_name="callbacks", filter_subject="sup.task.succeeded.>"),
        )
        errors: list[str] = []
        reader = await _connect(with_user(server, "reader", creds.reader), errors)
        rjs = reader.jetstream()
        snooped: list[str] = []
        try:
            # It reads: an ordered consumer over the whole history, and a message get.
            seen: list[str] = []
            done = asyncio.Event()

            async def on_msg(msg) -> None:  # type: ignore[no-untyped-def]
                seen.append(msg.subject)
                if msg.metadata.num_pending == 0:
                    done.set()

            sub = await rjs.subscribe(
                "sup.>", cb=on_msg, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
            )
            await asyncio.wait_for(done.wait(), 10)
            await sub.unsubscribe()
            got = await rjs.get_msg(EVENTS_STREAM, seq=1, next=True, subject="sup.*.*.*.t1")

            # It may not: a durable consumer, a delete, publishing, changing a stream.
            await _refused(rjs.add_consumer(EVENTS_STREAM, ConsumerConfig(durable_name="mine")))
            await _refused(rjs.delete_consumer(EVENTS_STREAM, "callbacks"))
            await _refused(rjs.purge_stream(EVENTS_STREAM))
            for subject in ("sup.task.succeeded.n1.t0", "suptask.normal", "supcmd.n1.cleanup"):
                await reader.publish(subject, b"{}")

            # Nor read the node's replies (a work-queue delivery comes on one).
            async def snoop(msg) -> None:  # type: ignore[no-untyped-def]
                snooped.append(msg.subject)

            for inbox in ("_INBOX.>", "_INBOX_node.>"):
                await reader.subscribe(inbox, cb=snoop)
            await reader.flush()
            await njs.get_msg(EVENTS_STREAM, seq=1)
            await asyncio.sleep(0.3)

            admin = await _admin(data, node_url)
            consumers = [c.name for c in await admin.jetstream().consumers_info(EVENTS_STREAM)]
            state = (await admin.jetstream().stream_info(EVENTS_STREAM)).state
            await admin.close()
        finally:
            await reader.close()
            await node.close()
    assert seen == [f"sup.supervisor.started.n1.t{i}" for i in range(3)]
    assert got.seq == 2
    assert "mine" not in consumers and "callbacks" in consumers
    assert state.messages == 3
    assert snooped == []
    assert any('subscription to "_inbox_node.>"' in e for e in errors)
    assert sum("permissions violation for publish" in e for e in errors) >= 3


def test_credentials_reader_hands_out_a_url_that_tail_can_follow(tmp_dir: Path) -> None:
    """`supervisor credentials reader` on a data dir whose embedded server runs; its URL
    works with `supervisor tail`."""
    data = tmp_dir / "data"

    async def scenario() -> tuple[int, str, str]:
        async with nats_for(None, data) as node_url:
            nc = await nats.connect(**connect_options(node_url))
            await nc.jetstream().publish(
                "sup.supervisor.started.n1._", _event(1), headers={MSG_ID_HEADER: "e-1"}
            )
            await nc.close()
            (data / "nats.url").write_text(redact(node_url) + "\n")  # as a daemon writes it
            creds = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "supervisor",
                    "credentials",
                    "reader",
                    "--json",
                    "--data-dir",
                    str(data),
                ],
                capture_output=True,
                check=False,
            )
            doc = json.loads(creds.stdout)
            tail = await asyncio.to_thread(
                subprocess.run,
                [
                    sys.executable,
                    "-m",
                    "supervisor",
                    "tail",
                    "--nats",
                    doc["url"],
                    "--since",
                    "1h",
                    "--limit",
                    "1",
                    "--data-dir",
                    str(tmp_dir / "other"),
                ],
                capture_output=True,
                check=False,
                timeout=30,
            )
            return tail.returncode, tail.stdout.decode(), doc["url"]

    rc, out, url = asyncio.run(scenario())
    creds = read_credentials(data)
    assert creds is not None
    assert url.startswith("nats://reader:") and creds.node not in url
    assert rc == 0
    assert json.loads(out)["event_id"] == "e-1"


def test_the_read_commands_start_the_embedded_server_with_its_users(tmp_dir: Path) -> None:
    """`replay` (like `audit` and `sql --db`) on a data dir where no daemon runs starts the
    embedded server the way every command does: never anonymous."""
    data = tmp_dir / "data"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor",
            "replay",
            "--db",
            str(tmp_dir / "p.duckdb"),
            "--data-dir",
            str(data),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert read_credentials(data) is not None
    assert "authorization" in (data / SERVER_CONF).read_text()
