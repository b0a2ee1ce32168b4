"""The daemon's watch over its embedded nats-server (`supervisor.eventlog.nats_server.NatsWatch`),
against a real server: killed with SIGKILL, it is started again on the same port and store;
while it cannot be started, `down` says why (what `/readyz` shows); each restart is
reported with the exit code."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import nats
import pytest

from supervisor.eventlog.nats_server import NatsServer, NatsWatch

pytestmark = pytest.mark.nats


async def _wait(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def test_a_killed_server_is_restarted_and_the_cause_named_meanwhile(tmp_dir: Path) -> None:
    server = NatsServer(tmp_dir / "store")
    url = server.start()
    good_conf = server.conf
    restarts: list[tuple[int | None, int]] = []
    watch = NatsWatch(
        server, lambda code, n, _: restarts.append((code, n)), poll_s=0.05, max_backoff_s=0.2
    )
    watching = asyncio.ensure_future(watch.run())
    try:
        # While the server cannot start (its configuration is unreadable), the watch
        # keeps trying and says so.
        server.conf = tmp_dir / "missing.conf"
        assert server.proc is not None
        server.proc.send_signal(signal.SIGKILL)
        await _wait(lambda: watch.down is not None and "could not be started" in watch.down)
        assert watch.down is not None and watch.down.startswith(
            "the embedded nats-server exited (killed by SIGKILL)"
        )
        assert restarts == []

        server.conf = good_conf
        await _wait(lambda: restarts != [])

        assert restarts == [(-signal.SIGKILL, 1)]
        assert watch.down is None
        assert server.url == url  # the same port: clients reconnect to the same URL
        nc = await nats.connect(url)
        await nc.close()
    finally:
        watching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watching
        server.stop()
