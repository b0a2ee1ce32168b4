"""`supervisor serve`: the long-running daemon of one node.

Start-up order (teardown is the reverse, through one AsyncExitStack): what the parts
`prepare` (the projection's interpreter, unless `serve` started it already) -> NATS
(embedded when no URL is known) -> event log -> Docker runtime and watchers -> streams and
the shared work-queue consumers -> Docker breaker and resource monitor -> HTTP (health
answers from here on; readiness waits for the rest) -> the injected parts (projection,
reconciler) -> the scheduler's pull loop. The daemon writes its NATS URL and its HTTP URL
into the data dir so that the other commands find them.

Work is pulled only while the breaker is closed, the host is under its thresholds and the
concurrency bound and memory budget leave room; otherwise tasks wait in SUP_TASKS.
Shutdown (SIGTERM/SIGINT): stop pulling, let running tasks finish within the grace, then
kill and clean up the rest and leave their messages for redelivery, flush the outbox, publish
`supervisor.stopped`, exit 0. A second signal skips the grace; containers are still cleaned up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
from nats.js import JetStreamContext

from schemas import (
    PRIORITIES,
    ResourceAlert,
    ResourceRecovered,
    SupervisorSuperseded,
    TaskSpec,
)
from schemas.config import Config
from schemas.connection import anonymous
from schemas.errors import ApiError, NatsUnavailable, projection_unavailable
from schemas.http import Check, CheckFn
from schemas.streams import TASKS_STREAM
from supervisor.daemon.api import create_app, http_token
from supervisor.daemon.checks import daemon_checks, pool_check, runtime_check
from supervisor.daemon.datadir import DataDirLock, node_id_for, publish
from supervisor.daemon.error_counts import counting_node_errors
from supervisor.daemon.extension import DaemonContext, Part, Prepares, ReadSide
from supervisor.daemon.http_server import ConnectionGuard, HttpServer, start_http
from supervisor.daemon.monitor import HostSampler, PsutilSampler, ResourceMonitor
from supervisor.daemon.nats_target import stream_configs
from supervisor.daemon.node import Node, open_node
from supervisor.docker.engine_breaker import DockerBreaker
from supervisor.eventlog.emitter import new_id
from supervisor.eventlog.follow import follow_errors
from supervisor.eventlog.history import read_task_events, summarize
from supervisor.eventlog.nats_auth import redact
from supervisor.eventlog.nats_client import check_history_protected, ensure_streams
from supervisor.eventlog.nats_server import url_file
from supervisor.execution.cancellations import following_cancellations
from supervisor.execution.pool import WarmPool
from supervisor.execution.task_loop import Scheduler
from supervisor.execution.workqueue import WorkQueue, ensure_consumers
from supervisor.intake.cancel import request_cancel
from supervisor.intake.submit import Intake, Submission
from supervisor.intake.wait import EndWatcher, following_ends, view_when_durable
from supervisor.observability.metrics import Metrics
from supervisor.policy.breaker import counts
from supervisor.policy.capacity import can_pull_any, fits_budget
from supervisor.policy.classify import Classification

__all__ = ["Daemon"]

READ_YOUR_WRITES_S = 2.0
"""Longest a read waits for the projection to apply an end a `?wait` already answered."""

log = logging.getLogger("supervisor.daemon.daemon")

QUEUE_DEPTH_REFRESH_S = 1.0
DISK_CHECK_S = 0.5


class Daemon:
    """One node's daemon. `parts` are started in order before work is pulled (see
    `supervisor.daemon.extension`); `read_side` answers `GET /v1/tasks/{id}` and `/v1/query`
    (without it a task's state is read back from its events and queries answer 503)."""

    def __init__(
        self,
        config: Config,
        *,
        nats_url: str | None = None,
        parts: Sequence[Part] = (),
        read_side: ReadSide | None = None,
        sampler: HostSampler | None = None,
        pull: bool = True,
    ) -> None:
        self.config = config
        self.pull = pull
        """Whether this daemon runs tasks (the executor role); without, it pulls none."""
        self.nats_url = nats_url
        self.parts = list(parts)
        self.read_side = read_side
        self.sampler = sampler
        self.node: Node | None = None
        self.intake: Intake | None = None
        self.ends: EndWatcher | None = None
        self.scheduler: Scheduler | None = None
        self.breaker: DockerBreaker | None = None
        self.monitor: ResourceMonitor | None = None
        self.http: HttpServer | None = None
        self.ready = asyncio.Event()
        self._engine_check: asyncio.Future[None] | None = None
        self.wq: WorkQueue | None = None
        self.pool: WarmPool | None = None

    # --- scheduling decisions -------------------------------------------------------------

    def may_pull(self) -> bool:
        """Pull only while Docker's breaker is closed, the host is under its thresholds and
        some capacity is left."""
        assert self.scheduler is not None and self.breaker is not None and self.monitor
        sc = self.config.scheduling
        if self.node is not None and self.node.disk is not None and self.node.disk.reason():
            return False  # what it would run could not be recorded
        if self._engine_check is not None:
            return False  # an infrastructure failure: wait until the engine answers
        return can_pull_any(
            self.scheduler.running_memory(),
            concurrency=sc.concurrency,
            memory_budget_mb=sc.memory_budget_mb,
            pressure=self.monitor.alerting,
            breaker=self.breaker.state.status,
        ).ok

    def fits(self, memory_mb: int, running: list[int]) -> bool:
        sc = self.config.scheduling
        return fits_budget(
            memory_mb, running, concurrency=sc.concurrency, memory_budget_mb=sc.memory_budget_mb
        )

    def _poke(self) -> None:
        if self.scheduler is not None:
            self.scheduler.poke()

    def _on_attempt(self, c: Classification | None) -> None:
        """Docker carried out an attempt (whatever the task did) unless its classification
        is an engine failure: that is what the breaker counts. After any infrastructure
        failure (an engine failure, or a container killed or removed from outside, as an
        engine restart does) nothing new is pulled until the engine answers again, so a
        restart costs the queued tasks no attempt."""
        assert self.breaker is not None
        self.breaker.record(c if c is not None and counts(c) else None)
        if c is not None and c.type == "infrastructure" and self._engine_check is None:
            self._engine_check = asyncio.ensure_future(self._engine_back())

    async def _engine_back(self) -> None:
        assert self.node is not None
        try:
            while not await self.node.executor.wait_for_engine():
                pass
        finally:
            self._engine_check = None
            self._poke()

    def _gate(self) -> None:
        assert self.breaker is not None
        self.breaker.check()

    # --- the run ----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, force: asyncio.Event) -> int:
        data_dir = Path(self.config.data_dir).resolve()
        node_id = node_id_for(data_dir, self.config.node_id, keep=True)
        self.config = cfg = msgspec.structs.replace(self.config, node_id=node_id)
        instance_id = new_id()[:16]
        # Before anything is touched: a second daemon on this data dir stops here.
        lock = DataDirLock.acquire(
            Path(cfg.data_dir).resolve(), instance_id=instance_id, node_id=cfg.node_id
        )
        try:
            async with contextlib.AsyncExitStack() as early:
                for part in self.parts:
                    if isinstance(part, Prepares):
                        await part.prepare(early)
                return await self._run(stop, force, lock)
        finally:
            lock.release()

    async def _run(self, stop: asyncio.Event, force: asyncio.Event, lock: DataDirLock) -> int:
        """The daemon, built in the order of its data flow and torn down in reverse (the
        stack): the node (NATS, event log, Docker, executor), the work queue, the breaker
        and the monitor, the intake and the pull loop, HTTP, the parts; then it pulls work
        until `stop`, and drains."""
        cfg = self.config
        async with (
            open_node(
                cfg,
                nats_url=self.nats_url,
                role="serve",
                instance_id=lock.holder.instance_id,
                on_attempt=self._on_attempt,
                gate=self._gate,
            ) as node,
            contextlib.AsyncExitStack() as stack,
        ):
            self.node = node
            if lock.previous is not None:
                prev = lock.previous
                log.info(
                    "instance %s (pid %d) died holding the data dir; superseding it",
                    prev.instance_id,
                    prev.pid,
                )
                node.emitter.emit(
                    SupervisorSuperseded,
                    superseded_instance=prev.instance_id,
                    superseded_pid=prev.pid,
                )
            wq = await self._open_queue(node, stack)
            breaker, monitor = await self._open_control(node, stack)
            js = node.events.js
            self.ends = await stack.enter_async_context(following_ends(js, node.keyring))
            self.intake = Intake(
                js,
                node.emitter,
                node.events,
                cfg,
                metrics=node.metrics,
                disk_full=self._disk_reason,
                keyring=node.keyring,
                track=self.ends.track,
                ack_of=node.events.ack_of,
            )
            sc = cfg.scheduling
            self.scheduler = scheduler = Scheduler(
                wq,
                node.executor,
                max_deliver=sc.max_deliver,
                ack_progress_s=sc.ack_progress_s,
                may_pull=self.may_pull,
                fits=self.fits,
                superseded=frozenset([lock.previous.instance_id] if lock.previous else []),
                heartbeat_timeout_s=cfg.reconcile.heartbeat_timeout_s,
                terminal_wait_s=sc.ack_wait_s,
                keyring=node.keyring,
            )
            node.executor.attempts.removals.low_disk = lambda: "disk_pct" in monitor.alerting
            if self.pull:
                await stack.enter_async_context(following_cancellations(js, node.executor))
                self._open_pool(node, stack)
            await stack.enter_async_context(
                counting_node_errors(js, node.metrics, cfg.node_id, node.emitter.instance_id)
            )
            checks, scrape_hooks = await self._serve_http(node, breaker, monitor, stack)
            ctx = DaemonContext(
                node=node,
                nc=node.events.nc,
                js=js,
                breaker=breaker,
                monitor=monitor,
                scheduler=scheduler,
                checks=checks,
                scrape_hooks=scrape_hooks,
            )
            for part in self.parts:
                log.info("starting %s", part.name)
                await part.start(ctx, stack)
            await self._pull_until(stop, force, scheduler)
            await node.events.flush(10)
        return 0

    def _open_pool(self, node: Node, stack: contextlib.AsyncExitStack) -> None:
        """The warm pool, refilled in the background; at the end (after the scheduler has
        drained) its parked containers are retired."""
        pool = WarmPool(
            node.runtime,
            node.emitter,
            self.config,
            node.metrics,
            data_dir=node.data_dir,
            watcher=node.watcher,
            gate=self._gate,
            busy=self.scheduler.backlog if self.scheduler is not None else None,
        )
        node.executor.attempts.pool = pool
        self.pool = pool
        if self.monitor is not None:
            self.monitor.idle_containers = lambda: sum(pool.parked().values())
        pool.start()
        stack.push_async_callback(pool.close)

    async def _open_queue(self, node: Node, stack: contextlib.AsyncExitStack) -> WorkQueue:
        """NATS reached, the streams and consumers there, the NATS URL published in the data
        dir, and the work queue's wake-ups subscribed."""
        sc = self.config.scheduling
        if not await node.events.wait_connected(timeout=30):
            raise NatsUnavailable(node.nats_url, "the daemon needs NATS to pull work")
        js = node.events.js
        if not node.provisioned and anonymous(node.nats_url):
            # A NATS that asks no credential lets this connection configure the streams;
            # else its admin did (the embedded server's, at start-up: `node.provisioned`;
            # the operator's in a fleet), and the node only checks.
            await ensure_streams(js, stream_configs(self.config)[1:], url=node.nats_url)
        # Never write history anyone could erase (docs/fleet.md: who sets the flags).
        await check_history_protected(js, node.nats_url)
        await ensure_consumers(js, ack_wait_s=sc.ack_wait_s, max_deliveries=sc.max_deliver + 1)
        publish(stack, url_file(node.data_dir), redact(node.nats_url))
        wq = WorkQueue(
            node.events.nc, js, ack_wait_s=sc.ack_wait_s, max_deliveries=sc.max_deliver + 1
        )
        self.wq = wq
        await wq.start()
        stack.push_async_callback(wq.stop)
        return wq

    async def _open_control(
        self, node: Node, stack: contextlib.AsyncExitStack
    ) -> tuple[DockerBreaker, ResourceMonitor]:
        """The Docker breaker and the resource monitor (sampled once before work is pulled),
        with their background loops, and the queue depth gauge's."""
        cfg = self.config
        self.breaker = breaker = DockerBreaker(
            node.emitter, cfg.breaker, metrics=node.metrics, on_change=lambda _: self._poke()
        )
        self.monitor = monitor = ResourceMonitor(
            node.emitter,
            self.sampler or PsutilSampler(node.data_dir),
            runtime=node.runtime,
            thresholds=cfg.thresholds,
            config=cfg.monitor,
            metrics=node.metrics,
            on_change=lambda _: self._poke(),
            on_docker=breaker.record,
        )
        await monitor.tick()
        _background(stack, "monitor", lambda: _after(cfg.monitor.interval_s, monitor.run))
        _background(stack, "breaker", lambda: breaker.watch(node.runtime))
        js = node.events.js
        _background(stack, "queue depth", lambda: _refresh_queue_depth(js, node.metrics))
        return breaker, monitor

    async def _serve_http(
        self,
        node: Node,
        breaker: DockerBreaker,
        monitor: ResourceMonitor,
        stack: contextlib.AsyncExitStack,
    ) -> tuple[dict[str, CheckFn], list[Callable[[], Awaitable[None]]]]:
        """The readiness checks, the metrics' gauges and the HTTP endpoint, its URL
        published in the data dir. Returns the checks and the scrape hooks, which the parts
        add to."""
        cfg = self.config
        checks = daemon_checks(
            runtime=node.runtime,
            connected=lambda: node.events.connected,
            backlog=lambda: node.events.backlog,
            breaker=breaker,
            monitor=monitor,
            max_backlog=cfg.http.max_outbox_backlog,
            nats_down=lambda: node.nats_watch.down if node.nats_watch else None,
        )
        checks["disk"] = self._disk_check
        if self.wq is not None:
            checks["consumers"] = self.wq.check
            checks["runtime"] = runtime_check(node.runtime, cfg.sandbox)
        checks["started"] = self._started_check
        if self.pool is not None:
            checks["pool"] = pool_check(self.pool)
        node.metrics.disk_full.set_function(lambda: float(self._disk_reason() is not None))
        _background(stack, "disk", self._watch_disk)
        node.metrics.outbox_backlog.set_function(lambda: node.events.backlog)
        scrape_hooks: list[Callable[[], Awaitable[None]]] = []

        async def before_scrape() -> None:
            await asyncio.gather(*(hook() for hook in scrape_hooks))

        app = create_app(
            metrics=node.metrics,
            readiness=checks,
            handlers=_Api(self, node.events.js),
            token=http_token(cfg.http, node.data_dir),
            check_timeout_s=cfg.http.check_timeout_s,
            max_batch=cfg.http.max_batch,
            on_scrape=before_scrape,
            body_timeout_s=cfg.http.body_timeout_s,
            max_wait_s=cfg.http.max_wait_s,
        )
        guard = ConnectionGuard(
            max_connections=cfg.http.max_connections, header_timeout_s=cfg.http.header_timeout_s
        )
        self.http = await start_http(stack, app, cfg.http.listen, node.data_dir, guard)
        return checks, scrape_hooks

    async def _pull_until(
        self, stop: asyncio.Event, force: asyncio.Event, scheduler: Scheduler
    ) -> None:
        """Pull and run work until `stop` (or the loop fails); then stop pulling and let
        running tasks finish within the grace (or until `force`)."""
        node = self.node
        assert node is not None and self.http is not None
        log.info(
            "serving on node %s (NATS %s, HTTP %s)%s",
            self.config.node_id,
            redact(node.nats_url),
            self.http.url,
            "" if self.pull else ", running no tasks (no executor role)",
        )
        if not self.pull:
            self.ready.set()
            await stop.wait()
            self.ready.clear()
            return
        loop_task = asyncio.ensure_future(scheduler.loop())
        self.ready.set()
        stop_wait = asyncio.ensure_future(stop.wait())
        await asyncio.wait([stop_wait, loop_task], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if loop_task.done() and not loop_task.cancelled() and loop_task.exception():
            raise loop_task.exception()  # type: ignore[misc]
        self.ready.clear()
        log.info("stopping: no more pulls; %d task(s) running", len(scheduler.running))
        await scheduler.stop_pulling()
        loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop_task
        await scheduler.drain(self.config.scheduling.shutdown_grace_s, force)

    def _disk_reason(self) -> str | None:
        node = self.node
        if node is None or node.disk is None:
            return None
        down = node.nats_watch.down if node.nats_watch is not None else None
        if down is not None and down.startswith("DISK_FULL"):
            return down
        return node.disk.reason()

    async def _disk_check(self) -> Check:
        reason = self._disk_reason()
        return Check(ok=reason is None, reason=reason or "the data dir has room")

    async def _watch_disk(self) -> None:
        """Record each change of the data dir's room (a `resource.alert` when it is full, a
        `resource.recovered` when it is back), and look at the queues again on recovery."""
        assert self.node is not None and self.node.disk is not None
        node, disk = self.node, self.node.disk
        full = False
        while True:
            reason = self._disk_reason()
            if (reason is not None) != full:
                full = reason is not None
                cls = ResourceAlert if full else ResourceRecovered
                if full:
                    log.error("%s; refusing submissions and pulling nothing", reason)
                else:
                    log.warning("the data dir has room again; pulling work")
                node.emitter.emit(
                    cls,
                    metric="disk_free_bytes",
                    value=float(disk.free_bytes()),
                    threshold=float(disk.min_free_bytes),
                )
                self._poke()
            await asyncio.sleep(DISK_CHECK_S)

    async def _started_check(self) -> Check:
        if self.ready.is_set():
            return Check(
                ok=True, reason="pulling work" if self.pull else "serving (no executor role)"
            )
        return Check(ok=False, reason="starting up or shutting down")


class _Api:
    """The `/v1` handlers: intake for submissions; the read side (or the task's own events
    when there is none) for state and queries."""

    def __init__(self, daemon: Daemon, js: JetStreamContext) -> None:
        self.daemon = daemon
        self.js = js
        # Read your writes: the highest end answered from the stream before the projection
        # had applied it, and the highest sequence the projection is known to have applied.
        self.answered_seq = 0
        self.applied_seq = 0
        assert daemon.node is not None
        self.keyring = daemon.node.keyring

    def _saw(self, doc: Mapping[str, Any] | None) -> None:
        if doc is None:
            return
        applied = int(doc.get("projection_seq") or 0)
        self.applied_seq = max(self.applied_seq, applied)
        finished = int(doc.get("finished_seq") or 0)
        if finished > applied:  # answered from the stream, ahead of the projection
            self.answered_seq = max(self.answered_seq, finished)

    async def _caught_up(self) -> None:
        """Before a read: once a `?wait` was answered from the stream, wait (at most
        `READ_YOUR_WRITES_S`) until the projection has applied that end too, so that a
        client that saw the end sees it in every read that follows."""
        read_side = self.daemon.read_side
        if read_side is None or self.answered_seq <= self.applied_seq:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + READ_YOUR_WRITES_S
        while self.answered_seq > self.applied_seq and loop.time() < deadline:
            self._saw(await read_side.tasks({"limit": "1"}))
            if self.answered_seq > self.applied_seq:
                await asyncio.sleep(0.01)

    async def submit(self, spec: TaskSpec) -> Submission:
        assert self.daemon.intake is not None
        return await self.daemon.intake.submit(spec)

    async def task(self, task_id: str, wait_s: float = 0.0) -> Mapping[str, Any] | None:
        if self.daemon.read_side is not None:
            if wait_s <= 0:  # a wait lays any durable end of the task over its row itself
                await self._caught_up()
            read = self.daemon.read_side.task
            ends = self.daemon.ends
            doc = await view_when_durable(self.js, read, task_id, wait_s, self.keyring, ends)
            self._saw(doc)
            return doc
        events = await read_task_events(self.js, task_id, keyring=self.keyring)
        if not events:
            return None
        h = summarize(events)
        state = h.terminal or ("running" if h.open_attempt is not None else "queued")
        return {
            "task_id": task_id,
            "state": state,
            "attempts": h.last_attempt,
            "events": len(events),
        }

    def errors(self, params: Mapping[str, str]) -> AsyncIterator[bytes]:
        """Follow the error stream with `supervisor tail`'s filters, for one HTTP client."""
        assert self.daemon.node is not None
        return follow_errors(self.daemon.node.nats_url, params)

    async def cancel(self, task_id: str) -> Mapping[str, Any]:
        node = self.daemon.node
        assert node is not None
        return await request_cancel(
            self.js, node.events, node.emitter, task_id, keyring=self.keyring
        )

    async def tasks(self, params: Mapping[str, str]) -> Mapping[str, Any]:
        if self.daemon.read_side is None:
            raise projection_unavailable("this daemon runs without a projection")
        await self._caught_up()
        page = await self.daemon.read_side.tasks(params)
        self._saw(page)
        return page

    async def query(self, request: Mapping[str, Any]) -> Mapping[str, Any]:
        if self.daemon.read_side is None:
            raise ApiError(
                503, "infrastructure", "QUERY_UNAVAILABLE", "this daemon runs without a projection"
            )
        await self._caught_up()
        return await self.daemon.read_side.query(request)


def _background(
    stack: contextlib.AsyncExitStack, name: str, run: Callable[[], Awaitable[None]]
) -> None:
    """Run `run()` until the stack closes; a crash is logged, never silent."""

    async def guarded() -> None:
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the %s loop crashed", name)

    task = asyncio.ensure_future(guarded())

    async def cancel() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    stack.push_async_callback(cancel)


async def _after(delay_s: float, work: Callable[[], Awaitable[None]]) -> None:
    await asyncio.sleep(delay_s)
    await work()


async def _refresh_queue_depth(js: JetStreamContext, metrics: Metrics) -> None:
    """Keep `supervisor_queue_depth{priority}` current (tasks queued or in flight)."""
    while True:
        with contextlib.suppress(Exception):
            info = await js.stream_info(TASKS_STREAM, subjects_filter="suptask.>")
            subjects = info.state.subjects or {}
            for prio in PRIORITIES:
                metrics.queue_depth.labels(prio).set(subjects.get(f"suptask.{prio}", 0))
        await asyncio.sleep(QUEUE_DEPTH_REFRESH_S)
