"""The embedded NATS server is never anonymous, and its roles are NATS's to enforce: a real
server started the way every command starts it (`supervisor.daemon.node.nats_for` on a data dir),
an anonymous client refused, the node's credentials found by the data dir's commands, and
a reader that can follow and read `SUP_EVENTS` but publish nothing and change no stream."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js.api import DeliverPolicy

from schemas import SupervisorStarted, encode_event
from schemas.errors import NatsUnavailable
from schemas.streams import EVENTS_STREAM
from supervisor.daemon.node import nats_for
from supervisor.eventlog.emitter import utcnow
from supervisor.eventlog.nats_auth import (
    AUTH_FILE,
    SERVER_CONF,
    read_credentials,
    redact,
    with_user,
)
from supervisor.eventlog.nats_client import MSG_ID_HEADER, connect_nats, ensure_streams

pytestmark = pytest.mark.nats


def _event(i: int) -> bytes:
    return encode_event(
        SupervisorStarted(event_id=f"e-{i}", occurred_at=utcnow(), node_id="n1", instance_id="i-1")
    )


async def test_the_embedded_server_refuses_anonymous_clients_and_readers_that_write(
    tmp_dir: Path,
) -> None:
    data = tmp_dir / "data"
    async with nats_for(None, data) as node_url:
        creds = read_credentials(data)
        assert creds is not None
        for name in (AUTH_FILE, SERVER_CONF):
            assert stat.S_IMODE(os.stat(data / name).st_mode) == 0o600
        server = redact(node_url)
        assert node_url == with_user(server, "node", creds.node)

        with pytest.raises(NatsUnavailable, match="Authorization Violation"):
            await connect_nats(server, reconnect=False, timeout=2)

        node = await nats.connect(node_url)
        js = node.jetstream()
        await ensure_streams(js, url=server)
        for i in range(3):
            await js.publish(
                f"sup.supervisor.started.n1.t{i}", _event(i), headers={MSG_ID_HEADER: f"e-{i}"}
            )

        violations: list[str] = []

        async def on_error(e: Exception) -> None:
            violations.append(str(e))

        reader = await nats.connect(with_user(server, "reader", creds.reader), error_cb=on_error)
        try:
            rjs = reader.jetstream()
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
            assert seen == [f"sup.supervisor.started.n1.t{i}" for i in range(3)]
            got = await rjs.get_msg(EVENTS_STREAM, seq=1, next=True, subject="sup.*.*.*.t1")
            assert got.seq == 2

            # It publishes nothing and changes no stream.
            for subject in ("sup.task.succeeded.n1.t0", "suptask.normal", "supcmd.n1.cleanup"):
                await reader.publish(subject, b"{}")
            await reader.flush()
            for admin in (rjs.purge_stream, rjs.delete_stream):
                with pytest.raises((TimeoutError, nats.errors.Error)):
                    await asyncio.wait_for(admin(EVENTS_STREAM), 3)
            await asyncio.sleep(0.2)
        finally:
            await reader.close()
        # (nats-py lower-cases the subjects it reports)
        assert [v for v in violations if "permissions violation for publish" in v] == [
            f'nats: permissions violation for publish to "{s.lower()}"'
            for s in (
                "sup.task.succeeded.n1.t0",
                "suptask.normal",
                "supcmd.n1.cleanup",
                f"$JS.API.STREAM.PURGE.{EVENTS_STREAM}",
                f"$JS.API.STREAM.DELETE.{EVENTS_STREAM}",
            )
        ]
        assert (await js.stream_info(EVENTS_STREAM)).state.messages == 3
        await node.close()


async def test_a_node_may_not_erase_history_nor_reach_outside_its_subjects(
    tmp_dir: Path,
) -> None:
    """The node's credential is least privilege too: it runs streams and publishes the
    supervisor's subjects, but `SUP_EVENTS` is append-only for it as well, and a subject
    outside `sup.>`/`suptask.>`/`supcmd.>` is refused by the server."""
    data = tmp_dir / "data"
    async with nats_for(None, data) as node_url:
        violations: list[str] = []

        async def on_error(e: Exception) -> None:
            violations.append(str(e))

        node = await nats.connect(node_url, error_cb=on_error)
        try:
            js = node.jetstream()
            await ensure_streams(js, url=redact(node_url))
            ack = await js.publish(
                "sup.supervisor.started.n1.t0", _event(0), headers={MSG_ID_HEADER: "e-0"}
            )
            for admin in (js.purge_stream, js.delete_stream):
                with pytest.raises((TimeoutError, nats.errors.Error)):
                    await asyncio.wait_for(admin(EVENTS_STREAM), 3)
            with pytest.raises((TimeoutError, nats.errors.Error)):
                await asyncio.wait_for(js.delete_msg(EVENTS_STREAM, ack.seq), 3)
            await node.publish("elsewhere.subject", b"{}")
            await node.subscribe("elsewhere.>")
            await node.flush()
            await asyncio.sleep(0.2)
            assert (await js.stream_info(EVENTS_STREAM)).state.messages == 1
        finally:
            await node.close()
        published = [v for v in violations if "permissions violation for publish" in v]
        assert published == [
            f'nats: permissions violation for publish to "{s.lower()}"'
            for s in (
                f"$JS.API.STREAM.PURGE.{EVENTS_STREAM}",
                f"$JS.API.STREAM.DELETE.{EVENTS_STREAM}",
                f"$JS.API.STREAM.MSG.DELETE.{EVENTS_STREAM}",
                "elsewhere.subject",
            )
        ]
        assert [v for v in violations if "permissions violation for subscription" in v] == [
            'nats: permissions violation for subscription to "elsewhere.>"'
        ]


def test_credentials_reader_hands_out_a_url_that_tail_can_follow(tmp_dir: Path) -> None:
    """`supervisor credentials reader` on a data dir whose embedded server runs; its URL
    works with `supervisor tail`."""
    data = tmp_dir / "data"

    async def scenario() -> tuple[int, str, str]:
        async with nats_for(None, data) as node_url:
            nc = await nats.connect(node_url)
            await ensure_streams(nc.jetstream(), url=redact(node_url))
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
