"""`supervisor serve`: the long-running daemon of one node.

Start-up order (teardown is the reverse, through one AsyncExitStack): NATS (embedded when
no URL is known) -> event log -> Docker runtime and watchers -> streams and the shared
work-queue consumers -> resource monitor and Docker breaker -> scheduler -> HTTP. The
daemon writes its NATS URL into the data dir so that the other commands find it.

Shutdown (SIGTERM/SIGINT): stop pulling, let running tasks finish within the grace, then
kill and clean up the rest and leave their messages for redelivery, flush the outbox,
publish `supervisor.stopped`, exit 0. A second signal skips the grace; containers are still
cleaned up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from schemas import Result
from supervisor.config import Config
from supervisor.errors import NatsUnavailable
from supervisor.eventlog import ensure_streams
from supervisor.intake import Intake
from supervisor.natsserver import url_file
from supervisor.node import Node, open_node
from supervisor.scheduler import Scheduler
from supervisor.streams import commands_stream_config, tasks_stream_config
from supervisor.workqueue import WorkQueue, ensure_consumers

log = logging.getLogger("supervisor.daemon")


class Daemon:
    def __init__(self, config: Config, *, nats_url: str | None = None) -> None:
        self.config = config
        self.nats_url = nats_url
        self.node: Node | None = None
        self.intake: Intake | None = None
        self.scheduler: Scheduler | None = None
        self.ready = asyncio.Event()

    def may_pull(self) -> bool:
        """Pull work only while Docker's breaker allows it and the host is not under pressure."""
        return True

    def fits(self, memory_mb: int, running: list[int]) -> bool:
        sc = self.config.scheduling
        return len(running) < sc.concurrency and sum(running) + memory_mb <= sc.memory_budget_mb

    def on_result(self, result: Result) -> None:
        pass

    async def run(self, stop: asyncio.Event, force: asyncio.Event) -> int:
        cfg = self.config
        sc = cfg.scheduling
        async with (
            open_node(cfg, nats_url=self.nats_url, role="serve") as node,
            contextlib.AsyncExitStack() as stack,
        ):
            self.node = node
            if not await node.events.wait_connected(timeout=30):
                raise NatsUnavailable(node.nats_url, "the daemon needs NATS to pull work")
            js = node.events.js
            await ensure_streams(
                js,
                [tasks_stream_config(sc.queue_bound_per_priority), commands_stream_config()],
                url=node.nats_url,
            )
            await ensure_consumers(js, ack_wait_s=sc.ack_wait_s, max_deliveries=sc.max_deliver + 1)
            url_path = url_file(node.data_dir)
            url_path.write_text(node.nats_url + "\n")
            stack.callback(_unlink, url_path)
            wq = WorkQueue(node.events.nc, js)
            await wq.start()
            stack.push_async_callback(wq.stop)
            self.intake = Intake(js, node.emitter, node.events, cfg)
            self.scheduler = scheduler = Scheduler(
                wq,
                node.executor,
                max_deliver=sc.max_deliver,
                ack_progress_s=sc.ack_progress_s,
                may_pull=self.may_pull,
                fits=self.fits,
                on_result=self.on_result,
            )
            loop_task = asyncio.ensure_future(scheduler.loop())
            self.ready.set()
            log.info("serving on node %s (NATS %s)", cfg.node_id, node.nats_url)
            stop_wait = asyncio.ensure_future(stop.wait())
            await asyncio.wait([stop_wait, loop_task], return_when=asyncio.FIRST_COMPLETED)
            if loop_task.done() and not loop_task.cancelled() and loop_task.exception():
                raise loop_task.exception()  # type: ignore[misc]
            log.info("stopping: no more pulls; %d task(s) running", len(scheduler.running))
            await scheduler.stop_pulling()
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            await scheduler.drain(sc.shutdown_grace_s, force)
            await node.events.flush(10)
        return 0


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
